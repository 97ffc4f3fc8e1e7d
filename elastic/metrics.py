"""Prometheus metrics of the coordinator, with ``/healthz`` and ``/readyz``.

Served on ``--metrics-port`` from a thread of its own. Two sources, so that a scrape
never touches state the event loop is changing:

* events, through the same hooks any observer plugin gets: round and checkpoint
  durations, abandoned rounds (histograms and counters that are thread-safe);
* a snapshot of the coordinator's state that its main loop takes once a second:
  rounds, versions, updates and rejections by reason, bytes and the compression
  ratio, staleness, members by device, leadership.

``/healthz`` is liveness (the main loop ran in the last ``stall_after`` seconds);
``/readyz`` is readiness (serving: leading, or the only coordinator), 503 otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector

from elastic.hookspecs import hookimpl

__all__ = ["Metrics"]

log = logging.getLogger("elastic.metrics")

ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CHECKPOINT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        # At debug level, not on stderr: scrapes every few seconds would drown the
        # daemon's own log.
        log.debug("metrics request %s %s", self.address_string(), format % args)


class _Snapshot(Collector):
    def __init__(self, owner: Metrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Any]:
        snap = self.owner.snapshot
        jobs: dict[str, dict[str, Any]] = snap.get("jobs", {})
        gauges = {
            "round": GaugeMetricFamily(
                "elastic_job_round",
                "Last committed round (model versions for asynchronous rules)",
                labels=["job"],
            ),
            "version": GaugeMetricFamily("elastic_model_version", "Model version", labels=["job"]),
            "rounds": GaugeMetricFamily(
                "elastic_job_rounds", "Rounds the job runs in all", labels=["job"]
            ),
        }
        state = GaugeMetricFamily(
            "elastic_job_state", "1 for the job's current state", labels=["job", "state"]
        )
        updates = CounterMetricFamily(
            "elastic_updates_accepted", "Updates folded into a model", labels=["job"]
        )
        wire = CounterMetricFamily(
            "elastic_update_bytes_wire", "Update bytes as they arrived (compressed)", labels=["job"]
        )
        raw = CounterMetricFamily(
            "elastic_update_bytes_raw", "Update bytes once decoded", labels=["job"]
        )
        ratio = GaugeMetricFamily(
            "elastic_update_compression_ratio", "Decoded over received update bytes", labels=["job"]
        )
        sent = CounterMetricFamily(
            "elastic_model_bytes_sent", "Model bytes sent to workers", labels=["job"]
        )
        clipped = CounterMetricFamily(
            "elastic_samples_clipped",
            "Updates whose sample count was clipped to the job's bound",
            labels=["job"],
        )
        figures = GaugeMetricFamily(
            "elastic_rule_figure",
            "A figure the job's rule reports: the privacy spent (epsilon at dp_delta), "
            "noise_multiplier, clip_norm...",
            labels=["job", "name"],
        )
        staleness = HistogramMetricFamily(
            "elastic_update_staleness",
            "Versions an applied update was behind (asynchronous rules)",
            labels=["job"],
        )
        for job_id, job in jobs.items():
            totals = job["totals"]
            for key, family in gauges.items():
                family.add_metric([job_id], job[key])
            for name in (
                "waiting",
                "running",
                "paused",
                "finished",
                "budget_spent",
                "failed",
                "cancelled",
            ):
                state.add_metric([job_id, name], 1.0 if job["state"] == name else 0.0)
            updates.add_metric([job_id], totals.get("updates", 0))
            wire.add_metric([job_id], totals.get("update_bytes_wire", 0))
            raw.add_metric([job_id], totals.get("update_bytes_raw", 0))
            ratio.add_metric(
                [job_id],
                totals.get("update_bytes_raw", 0) / max(totals.get("update_bytes_wire", 0), 1),
            )
            sent.add_metric([job_id], totals.get("bytes_sent", 0))
            clipped.add_metric([job_id], totals.get("samples_clipped", 0))
            for name, value in job.get("figures", {}).items():
                figures.add_metric([job_id, name], float(value))
            histogram = {int(k): v for k, v in totals.get("staleness_histogram", {}).items()}
            if histogram:
                buckets, running = [], 0
                for bound in range(max(histogram) + 1):
                    running += histogram.get(bound, 0)
                    buckets.append((str(float(bound)), running))
                buckets.append(("+Inf", running))
                staleness.add_metric(
                    [job_id], buckets, sum_value=float(sum(k * v for k, v in histogram.items()))
                )
        yield from (
            *gauges.values(),
            *(state, updates, wire, raw, ratio, sent, clipped, figures, staleness),
        )
        rejected = CounterMetricFamily(
            "elastic_updates_rejected", "Messages and updates refused, by reason", labels=["reason"]
        )
        for reason, count in snap.get("rejected", {}).items():
            rejected.add_metric([reason], count)
        yield rejected
        members = GaugeMetricFamily(
            "elastic_members", "Workers taking part, by device kind", labels=["device"]
        )
        for device, count in snap.get("members", {}).items():
            members.add_metric([device], count)
        yield members
        for name, help_text in (
            ("bytes_in", "Bytes received by the coordinator socket"),
            ("bytes_out", "Bytes sent by the coordinator socket"),
        ):
            yield CounterMetricFamily(f"elastic_socket_{name}", help_text, value=snap.get(name, 0))
        yield GaugeMetricFamily(
            "elastic_leader",
            "1 while this coordinator serves (leads)",
            value=1.0 if snap.get("serving") else 0.0,
        )


class Metrics:
    """The coordinator's metrics: register it as an observer, feed it snapshots, serve it."""

    def __init__(self, stall_after: float = 30.0) -> None:
        self.registry = CollectorRegistry()
        self.round_seconds = Histogram(
            "elastic_round_duration_seconds",
            "Time from a round's start to its commit",
            ["job"],
            buckets=ROUND_BUCKETS,
            registry=self.registry,
        )
        self.checkpoint_seconds = Histogram(
            "elastic_checkpoint_duration_seconds",
            "Time to write a checkpoint",
            ["job"],
            buckets=CHECKPOINT_BUCKETS,
            registry=self.registry,
        )
        self.abandoned = Counter(
            "elastic_rounds_abandoned",
            "Rounds ended without a commit (run again)",
            ["job"],
            registry=self.registry,
        )
        self.rounds = Counter(
            "elastic_rounds_committed",
            "Rounds (or asynchronous versions) committed",
            ["job"],
            registry=self.registry,
        )
        self.registry.register(_Snapshot(self))
        self.snapshot: dict[str, Any] = {}  # replaced whole, never changed in place
        self.stall_after = stall_after
        self._beat = time.monotonic()
        self._server: _Server | None = None

    # ------------------------------------------------------------- events --

    @hookimpl
    def elastic_round_completed(
        self, job_id: str, round: int, version: int, metrics: dict[str, Any]
    ) -> None:  # noqa: A002
        self.rounds.labels(job_id).inc()
        if "seconds" in metrics:
            self.round_seconds.labels(job_id).observe(float(metrics["seconds"]))

    @hookimpl
    def elastic_round_abandoned(self, job_id: str, round: int, reason: str) -> None:  # noqa: A002
        self.abandoned.labels(job_id).inc()

    @hookimpl
    def elastic_checkpoint_saved(self, job_id: str, round: int, path: str, seconds: float) -> None:  # noqa: A002
        self.checkpoint_seconds.labels(job_id).observe(seconds)

    # ------------------------------------------------------------- state --

    def update(self, snapshot: dict[str, Any]) -> None:
        """A new picture of the coordinator, from its main loop (which proves it alive)."""
        self.snapshot = snapshot
        self._beat = time.monotonic()

    def beat(self) -> None:
        self._beat = time.monotonic()

    # ------------------------------------------------------------- serving --

    def serve(self, host: str, port: int) -> int:
        """Start serving in a thread; the port bound (``port`` 0 picks a free one)."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "")
            if path in ("/healthz", "/readyz"):
                stalled = time.monotonic() - self._beat
                if path == "/healthz":
                    ok, text = stalled < self.stall_after, f"main loop ran {stalled:.1f}s ago"
                else:
                    ok = bool(self.snapshot.get("serving"))
                    text = "serving" if ok else "not serving (standing by, or starting)"
                start_response(
                    "200 OK" if ok else "503 Service Unavailable",
                    [("Content-Type", "text/plain; charset=utf-8")],
                )
                return [f"{'ok' if ok else 'unavailable'}: {text}\n".encode()]
            return metrics_app(environ, start_response)

        self._server = make_server(host, port, app, server_class=_Server, handler_class=_Quiet)
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

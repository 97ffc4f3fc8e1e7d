"""The metrics endpoint on its own: liveness follows the main loop, readiness the role."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from elastic.metrics import Metrics


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_health_and_readiness() -> None:
    metrics = Metrics(stall_after=0.3)
    port = metrics.serve("127.0.0.1", 0)
    try:
        assert status(port, "/healthz") == 200 and status(port, "/readyz") == 503  # starting
        metrics.update({"serving": True, "jobs": {}})
        assert status(port, "/readyz") == 200
        time.sleep(0.4)  # the main loop stopped feeding it
        assert status(port, "/healthz") == 503
        metrics.update({"serving": False})  # alive again, but standing by
        assert (status(port, "/healthz"), status(port, "/readyz")) == (200, 503)
        metrics.elastic_checkpoint_saved("j", 1, "/x", 0.02)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert (
            'elastic_checkpoint_duration_seconds_count{job="j"} 1.0' in text
            and "elastic_leader 0.0" in text
        )
    finally:
        metrics.close()

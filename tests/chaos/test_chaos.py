"""The chaos suite: etcd, 2 coordinators and 4 workers, each on a host of its own
(a network namespace on a bridge), run a FedAvg job while faults are injected in a
seeded random order:

* a worker SIGKILLed (and started again), a worker frozen with SIGSTOP;
* a worker partitioned from both coordinators (it still reaches etcd);
* the leader SIGKILLed (started again as a standby), the leader frozen for twice its
  lease TTL (another leads meanwhile);
* the leader partitioned from etcd for twice its lease TTL;
* all along, one worker's link has 200 ms latency and 5 % packet loss each way.

The job has no end of its own: each fault starts a fixed number of rounds after the
previous one healed, so every one lands while the job runs however fast rounds go
(a round takes 0.03-0.5 s here, depending on who takes part), and the operator
ends the job (``elastic job finish``, through etcd) some rounds after the last.

This kernel has no netem qdisc, so the latency comes from a transparent relay in the
worker's namespace (``delay_relay.py``) and the loss from iptables ``statistic``;
partitions are iptables DROP rules. Afterwards the invariants in ``invariants.py`` must hold:
versions strictly increase, every committed version is in a checkpoint, no update is
applied twice, no NaN, and the job finished.

``CHAOS_SEEDS=0,1,2`` runs more orders (CI runs seed 0).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.invariants import check_run
from tests.etcd_server import etcd_binary
from tests.integration.conftest import wait_for
from tests.netns import Hosts, hosts_up

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.xdist_group("chaos")]
ROOT = Path(__file__).parents[2]
TTL = 3
JOB_ID = "chaos"
RELAY_PORT, RELAY_MARK = 15000, 7
ENDLESS = 1_000_000  # rounds: the job ends when the test finishes it


class Scenario:
    """A job with no end of its own, and the rounds between faults: ``first`` before
    the first, ``every`` from one fault healed to the next, ``tail`` after the last
    before the job is told to finish."""

    def __init__(
        self, rule: str, first: int, every: int, tail: int, epochs: int, rule_table: str = ""
    ) -> None:
        self.rule, self.first, self.every, self.tail = rule, first, every, tail
        self.job = f"""
[job]
id = "{JOB_ID}"
task = "digits"
rule = "{rule}"
rounds = {ENDLESS}
min_workers = 2
partitions = 4
round_timeout = 8
eval_every = 30
[train]
local_epochs = {epochs}
[rule]
{rule_table}
[checkpoint]
every = 1
keep = 100000
"""


# FedAvg rounds, and the asynchronous rule (a version per 4 buffered updates, stale
# ones refused), where "applied twice" has more ways to happen.
SCENARIOS = {
    "fedavg": Scenario("fedavg", first=10, every=8, tail=6, epochs=5),
    "async": Scenario(
        "async",
        first=15,
        every=20,
        tail=12,
        epochs=25,
        rule_table="buffer = 4\nmax_staleness = 20\nmixing = 0.5",
    ),
}
COORDINATORS = ("c1", "c2")
WORKERS = ("w1", "w2", "w3", "w4")
LOSSY = "w4"  # the worker behind the slow, lossy link
SEEDS = [int(s) for s in os.environ.get("CHAOS_SEEDS", "0").split(",")]


class ChaosCluster:
    """The processes on their hosts, restartable, and the faults to inflict on them."""

    def __init__(self, hosts: Hosts, root: Path, rng: random.Random, scenario: Scenario) -> None:
        self.hosts, self.root, self.rng, self.scenario = hosts, root, rng, scenario
        self.state = root / "state"
        self.procs: dict[str, subprocess.Popen] = {}
        self.extra: list[subprocess.Popen] = []
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "ELASTIC_INSECURE": "1",
        }  # CURVE has its own tests
        self.url = f"etcd://etcd:2379/{JOB_ID}"
        self.timeline: list[str] = []
        self.inflicted_after_finish: list[str] = []
        self.started = time.monotonic()

    # ------------------------------------------------------------ processes --

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str) -> None:
        elastic = [sys.executable, "-m", "elastic"]
        if name in COORDINATORS:
            argv = elastic + [
                "coordinator",
                "--id",
                name,
                "--bind",
                "tcp://0.0.0.0:5555",
                "--state-dir",
                str(self.state),
                "--membership",
                self.url,
                "--lease-ttl",
                str(TTL),
                "--heartbeat-interval",
                "0.3",
                "--heartbeat-timeout",
                "2",
                "--log-level",
                "debug",
            ]
            if (
                name == "c1" and name not in self.procs
            ):  # the first one publishes the job; etcd keeps it
                argv += ["--job", str(self.root / "job.toml")]
        else:
            argv = elastic + [
                "worker",
                "--id",
                name,
                "--membership",
                self.url,
                "--lease-ttl",
                str(TTL),
                "--device",
                "cpu",
                "--threads",
                "1",
                "--coordinator-timeout",
                "5",
            ]
        self.procs[name] = self.hosts.spawn(name, argv, self.env, self.log(name))

    def start_all(self) -> None:
        (self.root / "job.toml").write_text(self.scenario.job)
        etcd = [
            str(etcd_binary()),
            "--name",
            "etcd",
            "--data-dir",
            str(self.root / "etcd-data"),
            "--listen-client-urls",
            "http://0.0.0.0:2379",
            "--advertise-client-urls",
            "http://etcd:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "etcd=http://127.0.0.1:2380",
            "--log-level",
            "warn",
        ]
        self.extra.append(self.hosts.spawn("etcd", etcd, self.env, self.log("etcd")))
        for name in [*COORDINATORS, *WORKERS]:
            self.hosts.exec(name, "iptables", "-N", "CHAOS")  # the faults' rules; flushed to heal
            self.hosts.exec(name, "iptables", "-I", "INPUT", "-j", "CHAOS")
            self.hosts.exec(name, "iptables", "-I", "OUTPUT", "-j", "CHAOS")
        self.slow_lossy_link(LOSSY)
        self.start("c1")
        wait_for(lambda: "leading cluster=" in self.log("c1").read_text(), 60, "c1 to lead")
        self.start("c2")
        wait_for(lambda: "standing by cluster=" in self.log("c2").read_text(), 60, "c2 to stand by")
        for w in WORKERS:
            self.start(w)

    def slow_lossy_link(self, name: str) -> None:
        """200 ms more on everything ``name`` sends to the other hosts, 5 % of its
        packets lost each way."""
        relay = [
            sys.executable,
            "-m",
            "tests.chaos.delay_relay",
            "--port",
            str(RELAY_PORT),
            "--delay",
            "0.2",
            "--mark",
            str(RELAY_MARK),
        ]
        self.extra.append(
            self.hosts.spawn(
                name, relay, {**self.env, "PYTHONPATH": str(ROOT)}, self.root / "relay.log"
            )
        )
        wait_for(
            lambda: "listening" in (self.root / "relay.log").read_text(), 30, "the delay relay"
        )
        self.hosts.exec(
            name,
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            self.hosts.subnet,
            "-m",
            "mark",
            "!",
            "--mark",
            str(RELAY_MARK),
            "-j",
            "REDIRECT",
            "--to-ports",
            str(RELAY_PORT),
        )
        for chain, way in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.hosts.exec(
                name,
                "iptables",
                "-A",
                chain,
                way,
                "eth0",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.05",
                "-j",
                "DROP",
            )

    def stop_all(self) -> None:
        procs = [*self.procs.values(), *self.extra]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # ---------------------------------------------------------------- state --

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state / JOB_ID / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def round(self) -> int:
        s = self.status()
        return s["round"] if s else 0

    def finish(self) -> bool:
        """``elastic job finish`` from the etcd host, through whoever leads; True if taken."""
        argv = [
            "ip",
            "netns",
            "exec",
            self.hosts.ns["etcd"],
            sys.executable,
            "-m",
            "elastic",
            "job",
            "finish",
            JOB_ID,
            "--membership",
            self.url,
            "--timeout",
            "5",
        ]
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        self.note(f"elastic job finish: rc {done.returncode} {(done.stdout + done.stderr).strip()}")
        return done.returncode == 0

    def leader(self) -> str:
        """The coordinator whose newest election line says it leads."""
        newest: list[tuple[str, str]] = []
        for name in COORDINATORS:
            for line in reversed(self.log(name).read_text(errors="replace").splitlines()):
                if "leading cluster=" in line or "standing by cluster=" in line:
                    if "leading cluster=" in line and self.procs[name].poll() is None:
                        newest.append((line[:23], name))
                    break
        assert newest, "no coordinator leads"
        return max(newest)[1]

    def leads(self, name: str, since: int) -> bool:
        lines = self.log(name).read_text(errors="replace").splitlines()[since:]
        return any("leading cluster=" in line for line in lines)

    def lines(self, name: str) -> int:
        return len(self.log(name).read_text(errors="replace").splitlines())

    def note(self, what: str, fault: bool = False) -> None:
        s = self.status() or {}
        self.timeline.append(
            f"{time.monotonic() - self.started:6.1f}s round {s.get('round', 0):3d}: {what}"
        )
        if fault and s.get("state") == "finished":
            self.inflicted_after_finish.append(what)

    # --------------------------------------------------------------- faults --

    def kill_worker(self) -> None:
        name = self.rng.choice(WORKERS)
        self.note(f"SIGKILL {name}", fault=True)
        self.procs[name].kill()
        self.procs[name].wait()
        time.sleep(2)
        self.start(name)

    def stop_worker(self) -> None:
        name = self.rng.choice(WORKERS)
        self.note(f"SIGSTOP {name} for 4 s", fault=True)
        self.procs[name].send_signal(signal.SIGSTOP)
        time.sleep(4)
        self.procs[name].send_signal(signal.SIGCONT)

    def partition_worker(self) -> None:
        name = self.rng.choice(WORKERS)
        self.note(
            f"partition {name} from both coordinators for 6 s (etcd still reachable)", fault=True
        )
        for c in COORDINATORS:
            self.hosts.exec(name, "iptables", "-A", "CHAOS", "-d", self.hosts.ip[c], "-j", "DROP")
            self.hosts.exec(name, "iptables", "-A", "CHAOS", "-s", self.hosts.ip[c], "-j", "DROP")
        time.sleep(6)
        self.hosts.exec(name, "iptables", "-F", "CHAOS")

    def _failover(
        self,
        old: str,
        what: str,
        inflict: Callable[[], None],
        heal: Callable[[], None],
        hold: float = 0.0,
    ) -> None:
        """Inflict a fault on the leader ``old``; once the other coordinator leads, and
        ``hold`` seconds after the fault began, heal it: ``old`` must stand by."""
        new = "c2" if old == "c1" else "c1"
        mark = self.lines(new)
        self.note(f"{what} {old} (leader)", fault=True)
        began = time.monotonic()
        inflict()
        wait_for(lambda: self.leads(new, mark), TTL + 10, f"{new} to lead after {what} {old}")
        self.note(f"{new} leads")
        time.sleep(max(0.0, began + hold - time.monotonic()))  # both think they lead, meanwhile
        mark_old = self.lines(old)
        heal()
        wait_for(
            lambda: (
                "standing by cluster="
                in "\n".join(self.log(old).read_text(errors="replace").splitlines()[mark_old:])
            ),
            60,
            f"{old} to stand by again",
        )
        self.note(f"{old} stands by")

    def kill_leader(self) -> None:
        old = self.leader()
        self._failover(
            old,
            "SIGKILL",
            lambda: (self.procs[old].kill(), self.procs[old].wait()),
            lambda: self.start(old),
        )

    def stop_leader(self) -> None:
        old = self.leader()
        p = self.procs[old]
        self._failover(
            old,
            "SIGSTOP",
            lambda: p.send_signal(signal.SIGSTOP),
            lambda: p.send_signal(signal.SIGCONT),
            hold=TTL + 3,
        )

    def cut_leader_from_etcd(self) -> None:
        old = self.leader()
        etcd = self.hosts.ip["etcd"]

        def cut() -> None:
            self.hosts.exec(old, "iptables", "-A", "CHAOS", "-d", etcd, "-j", "DROP")
            self.hosts.exec(old, "iptables", "-A", "CHAOS", "-s", etcd, "-j", "DROP")

        self._failover(
            old,
            "partition from etcd:",
            cut,
            lambda: self.hosts.exec(old, "iptables", "-F", "CHAOS"),
            hold=TTL + 3,
        )

    def faults(self) -> list[Callable[[], None]]:
        order: list[Callable[[], None]] = [
            self.kill_worker,
            self.stop_worker,
            self.partition_worker,
            self.kill_leader,
            self.stop_leader,
            self.cut_leader_from_etcd,
        ]
        self.rng.shuffle(order)
        return order

    def dump(self) -> str:
        out = ["timeline:", *self.timeline]
        for log in sorted(self.root.glob("*.log")):
            out.append(f"----- {log.name}\n{log.read_text(errors='replace')[-2500:]}")
        return "\n".join(out)


@pytest.fixture
def chaos_hosts() -> Iterator[Hosts]:
    with hosts_up(["etcd", *COORDINATORS, *WORKERS], "iptables") as h:
        yield h


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", sorted(SCENARIOS))
def test_the_job_survives_chaos_with_nothing_lost(
    chaos_hosts: Hosts, tmp_path: Path, rule: str, seed: int
) -> None:
    cluster = ChaosCluster(chaos_hosts, tmp_path, random.Random(f"{rule}-{seed}"), SCENARIOS[rule])
    try:
        cluster.start_all()
        scenario, mark = cluster.scenario, cluster.scenario.first
        for fault in cluster.faults():
            try:
                wait_for(
                    lambda mark=mark: cluster.round() >= mark, 120, f"round {mark}", interval=0.2
                )
            except AssertionError:
                raise AssertionError(
                    f"the job stalled before round {mark}\n{cluster.dump()}"
                ) from None
            fault()
            mark = cluster.round() + scenario.every
        cluster.note("faults done")
        mark = cluster.round() + scenario.tail
        try:
            wait_for(lambda: cluster.round() >= mark, 120, f"round {mark}", interval=0.2)
        except AssertionError:
            raise AssertionError(f"the job stalled before round {mark}\n{cluster.dump()}") from None
        try:
            wait_for(cluster.finish, 60, "the finish to be taken", interval=1)
            status = wait_for(
                lambda: (s := cluster.status()) is not None and s["state"] == "finished" and s,
                60,
                "the job to finish",
                interval=0.5,
            )
        except AssertionError:
            raise AssertionError(f"the job did not finish\n{cluster.dump()}") from None
        cluster.note("finished")
    finally:
        cluster.stop_all()
    assert not cluster.inflicted_after_finish, (
        f"faults came after the job finished: {cluster.inflicted_after_finish}\n{cluster.dump()}"
    )
    assert status["round"] < ENDLESS, "the job ended when told to, not by running out of rounds"
    logs = [cluster.log(c) for c in COORDINATORS]
    problems = check_run(cluster.state, JOB_ID, status, logs)
    assert not problems, "\n".join(problems) + "\n" + cluster.dump()
    text = "\n".join(log.read_text(errors="replace") for log in logs)
    leaderships = len(re.findall(r"leading cluster=", text))
    assert leaderships >= 4, (
        f"three leader faults should make three failovers: {leaderships} terms\n{cluster.dump()}"
    )
    folded = {w: len(re.findall(rf"update folded job={JOB_ID} worker={w} ", text)) for w in WORKERS}
    assert all(n > 0 for n in folded.values()), (
        f"every worker, the lossy one too, contributed: {folded}"
    )
    assert (tmp_path / "relay.log").exists()
    print("\n".join(cluster.timeline))
    print(
        f"{rule} seed {seed}: {status['round']} rounds, {leaderships} leadership terms, updates "
        f"folded per worker {folded}, final {status.get('final')}"
    )

"""Plugin loading through real entry points, including out-of-tree distributions."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from elastic.errors import PluginError
from elastic.plugins import Plugins


def fake_distribution(root: Path, dist: str, module: str, source: str, entry: str | None = None) -> None:
    """An installed distribution as importlib.metadata sees it: a module plus dist-info."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[elastic]\n{entry or module} = {module}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("tp_")]:
        del sys.modules[name]


def test_builtins_come_through_entry_points() -> None:
    p = Plugins()
    assert {"fedavg", "syncavg"} <= set(p.aggregators.names())
    assert {"digits", "linreg"} <= set(p.tasks.names())
    assert "embedded" in p.membership.names()
    assert all(item.distribution.startswith("elastic ") for item in p.provided())


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(PluginError) as err:
        Plugins().aggregators.get("fedavgg")
    assert "unknown aggregator 'fedavgg'" in str(err.value)
    known = str(err.value).split("(known: ")[1].split(")")[0].split(", ")
    assert {"fedavg", "syncavg", "async", "fedadam"} <= set(known) and known == sorted(known)


def test_third_party_plugin_is_discovered(site: Path) -> None:
    fake_distribution(site, "tp-median", "tp_median", """
        from elastic.hookspecs import hookimpl
        from elastic_plugins.fedavg import FedAvg

        class Median(FedAvg):
            name = "tp_median"

        @hookimpl
        def elastic_aggregators():
            return {"tp_median": Median}
    """)
    p = Plugins()
    assert p.aggregators.get("tp_median").__name__ == "Median"
    assert [i.distribution for i in p.provided() if i.name == "tp_median"] == ["tp-median 1.0"]


def test_failing_import_names_the_distribution(site: Path) -> None:
    fake_distribution(site, "tp-broken", "tp_broken", "raise RuntimeError('boom')\n")
    with pytest.raises(PluginError) as err:
        Plugins()
    assert "tp-broken 1.0" in str(err.value) and "boom" in str(err.value)


def test_duplicate_name_names_both_distributions(site: Path) -> None:
    fake_distribution(site, "tp-dup", "tp_dup", """
        from elastic.hookspecs import hookimpl
        from elastic_plugins.fedavg import FedAvg

        @hookimpl
        def elastic_aggregators():
            return {"fedavg": FedAvg}
    """)
    with pytest.raises(PluginError) as err:
        Plugins()
    text = str(err.value)
    assert "aggregator 'fedavg' is provided twice" in text and "tp-dup 1.0" in text and "elastic 0.1.0" in text


def test_wrong_class_is_refused_at_load(site: Path) -> None:
    fake_distribution(site, "tp-wrong", "tp_wrong", """
        from elastic.hookspecs import hookimpl

        @hookimpl
        def elastic_tasks():
            return {"tp_wrong": dict}
    """)
    with pytest.raises(PluginError, match="task 'tp_wrong' must be a subclass of Task"):
        Plugins()


def test_a_failing_observer_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    seen = []

    class Bad:
        from elastic.hookspecs import hookimpl

        @hookimpl
        def elastic_worker_left(self, worker_id):
            raise RuntimeError("observer bug")

    class Good:
        from elastic.hookspecs import hookimpl

        @hookimpl
        def elastic_worker_left(self, worker_id, reason):
            seen.append((worker_id, reason))

    p = Plugins(extra=[Bad(), Good()])
    p.notify("elastic_worker_left", worker_id="w", reason="bye")
    assert seen == [("w", "bye")]
    assert "observer plugin failed" in caplog.text

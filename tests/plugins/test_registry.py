"""Plugin loading through real entry points, including out-of-tree distributions."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from elastic.errors import PluginError
from elastic.plugins import Plugins


def fake_distribution(
    root: Path, dist: str, module: str, source: str, entry: str | None = None
) -> None:
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
    assert {"embedded", "etcd", "zk"} <= set(p.backends.names())
    assert all(item.distribution.startswith("elastic ") for item in p.provided())


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(PluginError) as err:
        Plugins().aggregators.get("fedavgg")
    assert "unknown aggregator 'fedavgg'" in str(err.value)
    known = str(err.value).split("(known: ")[1].split(")")[0].split(", ")
    assert {"fedavg", "syncavg", "async", "fedadam"} <= set(known) and known == sorted(known)


def test_third_party_plugin_is_discovered(site: Path) -> None:
    fake_distribution(
        site,
        "tp-median",
        "tp_median",
        """
        from elastic.hookspecs import hookimpl
        from elastic_plugins.fedavg import FedAvg

        class Median(FedAvg):
            name = "tp_median"

        @hookimpl
        def elastic_aggregators():
            return [Median]
    """,
    )
    p = Plugins()
    assert p.aggregators.get("tp_median").__name__ == "Median"
    assert [i.distribution for i in p.provided() if i.name == "tp_median"] == ["tp-median 1.0"]


def test_failing_import_names_the_distribution(site: Path) -> None:
    fake_distribution(site, "tp-broken", "tp_broken", "raise RuntimeError('boom')\n")
    with pytest.raises(PluginError) as err:
        Plugins()
    assert "tp-broken 1.0" in str(err.value) and "boom" in str(err.value)


def test_duplicate_name_names_both_distributions(site: Path) -> None:
    fake_distribution(
        site,
        "tp-dup",
        "tp_dup",
        """
        from elastic.hookspecs import hookimpl
        from elastic_plugins.fedavg import FedAvg

        @hookimpl
        def elastic_aggregators():
            return [FedAvg]
    """,
    )
    with pytest.raises(PluginError) as err:
        Plugins()
    text = str(err.value)
    assert (
        "aggregator 'fedavg' is provided twice" in text
        and "tp-dup 1.0" in text
        and "elastic 0.1.0" in text
    )


def test_wrong_class_is_refused_at_load(site: Path) -> None:
    fake_distribution(
        site,
        "tp-wrong",
        "tp_wrong",
        """
        from elastic.hookspecs import hookimpl

        @hookimpl
        def elastic_tasks():
            return [dict]
    """,
    )
    with pytest.raises(
        PluginError, match="tp-wrong 1.0: task <class 'dict'> must be a subclass of Task"
    ):
        Plugins()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (
            "return {'fedavg2': FedAvg2}",
            "elastic_aggregators must return a list of classes \\(each one's `name` is its "
            "key\\), not dict",
        ),
        ("return [Nameless]", "aggregator Nameless has no `name`"),
    ],
)
def test_a_class_is_contributed_once_under_its_own_name(site: Path, body: str, why: str) -> None:
    fake_distribution(
        site,
        "tp-named",
        "tp_named",
        f"""
        from elastic.api import hookimpl
        from elastic_plugins.fedavg import FedAvg

        class FedAvg2(FedAvg):
            name = "fedavg2"

        class Nameless(FedAvg):
            name = ""

        @hookimpl
        def elastic_aggregators():
            {body}
    """,
    )
    with pytest.raises(PluginError, match=f"tp-named 1.0: {why}"):
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


def test_the_first_validator_to_answer_decides_and_the_rest_are_not_asked() -> None:
    """``elastic_validate_update`` is a ``firstresult`` hook: pluggy's order (the last
    registered first), the first reason wins; one that raises refuses too."""
    from elastic.api import hookimpl

    asked: list[str] = []

    class Validator:
        def __init__(self, name: str, answer: object) -> None:
            self.name, self.answer = name, answer

        @hookimpl
        def elastic_validate_update(self, worker_id: str) -> object:
            asked.append(self.name)
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    p = Plugins(entrypoints=False)
    p.register(Validator("lenient", None), name="lenient")
    p.register(Validator("strict", "too big"), name="strict")
    p.register(Validator("quiet", None), name="quiet")
    assert p.first_answer("elastic_validate_update", job_id="j", worker_id="w", update=None) == (
        "strict",
        "too big",
    )
    assert asked == ["quiet", "strict"]  # lenient was never asked
    p.register(Validator("broken", RuntimeError("bug")), name="broken")
    plugin, answer = p.first_answer(
        "elastic_validate_update", job_id="j", worker_id="w", update=None
    )
    assert plugin == "broken" and isinstance(answer, RuntimeError)
    with pytest.raises(PluginError, match="not a firstresult hook"):
        p.first_answer("elastic_worker_left", worker_id="w", reason="bye")

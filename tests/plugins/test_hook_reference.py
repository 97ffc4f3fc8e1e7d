"""The plugin API tests itself: every hook documented, typed, and exercised."""

from __future__ import annotations

import inspect
from pathlib import Path

from elastic import hookspecs

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
SPECS = {
    n: f for n, f in vars(hookspecs).items() if n.startswith("elastic_") and inspect.isfunction(f)
}
COMPONENT_HOOKS = {
    "elastic_aggregators",
    "elastic_tasks",
    "elastic_codecs",
    "elastic_cluster_backends",
    "elastic_privacy_mechanisms",
}


def test_every_hook_has_a_full_docstring() -> None:
    for name, func in SPECS.items():
        doc = inspect.getdoc(func) or ""
        assert len(doc) > 40, name
        params = inspect.signature(func).parameters
        if params:
            assert "Args:" in doc, name
            for p in params:
                assert f"{p}:" in doc, (name, p)
        if name in COMPONENT_HOOKS:
            assert "Returns:" in doc, name


def test_every_hook_is_typed() -> None:
    for name, func in SPECS.items():
        sig = inspect.signature(func)
        assert sig.return_annotation is not inspect.Signature.empty, name
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, (name, p.name)


def test_the_reference_is_the_hookspecs_in_full() -> None:
    """Signatures and docstrings, bodies too: made by ``python -m elastic.hookreference``."""
    from elastic.hookreference import HEADING, reference

    text = DOC.read_text()
    assert text[text.index(HEADING) :] == reference(), (
        "docs/plugins.md is stale: run python -m elastic.hookreference docs/plugins.md"
    )


def test_every_hook_is_in_the_reference_with_its_exact_signature() -> None:
    text = DOC.read_text()
    for name, func in SPECS.items():
        assert f"### `{name}{inspect.signature(func)}`" in text, (
            f"docs/plugins.md lacks {name}{inspect.signature(func)}"
        )
    documented = {
        line.split("`")[1].split("(")[0]
        for line in text.splitlines()
        if line.startswith("### `elastic_")
    }
    assert documented == set(SPECS), documented ^ set(SPECS)


def test_every_event_hook_is_exercised_by_a_daemon_test() -> None:
    from tests.integration.test_event_hooks import EXPECTED_EVENTS

    assert set(EXPECTED_EVENTS) == set(SPECS) - COMPONENT_HOOKS

"""The hook reference of ``docs/plugins.md``, made from ``elastic.hookspecs``.

The hookspecs' docstrings are the reference; the page carries them verbatim, each
under its exact signature, and a test checks it does. After changing a hookspec::

    python -m elastic.hookreference docs/plugins.md     # rewrites the page's reference
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from elastic import hookspecs

__all__ = ["HEADING", "reference", "update_page"]

HEADING = "## Hook reference"
INTRO = (
    "Made from `elastic/hookspecs.py` by `python -m elastic.hookreference docs/plugins.md`;\n"
    "the test suite checks that it matches, signatures and docstrings in full.\n"
)


def reference() -> str:
    """Every hook, in the order ``hookspecs`` declares them: its signature as a
    heading, its docstring as the text, and a word when only the first answer counts."""
    sections = [f"{HEADING}\n\n{INTRO}"]
    for name, func in vars(hookspecs).items():
        if not (name.startswith("elastic_") and inspect.isfunction(func)):
            continue
        text = f"### `{name}{inspect.signature(func)}`\n\n{inspect.getdoc(func)}\n"
        if getattr(func, "elastic_spec", {}).get("firstresult"):
            text += (
                "\n*firstresult*: the first implementation that answers decides; the rest "
                "are not called.\n"
            )
        sections.append(text)
    return "\n".join(sections)


def update_page(page: Path) -> bool:
    """Replace the page's reference (its heading to the end) with ``reference()``;
    True when that changed it."""
    text = page.read_text()
    head, found, _ = text.partition(HEADING)
    if not found:
        raise SystemExit(f"{page} has no {HEADING!r} section")
    new = head + reference()
    page.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update_page(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/plugins.md"))
    print("updated" if changed else "already up to date")

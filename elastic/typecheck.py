"""The one rule for checking a value against the type a schema expects.

Job specs (TOML), plugin parameters, wire headers (msgpack) and control requests all
hold plain values, and all follow it: ``bool`` is never taken for ``int`` (TOML and
msgpack keep them apart, and ``True`` as a worker count is a mistake), and an ``int``
is taken where a ``float`` is wanted (``lr = 1`` means 1.0). Each caller wraps the
mismatch in its own error, with its own words for where the value came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from elastic.errors import JobSpecError

__all__ = ["Expected", "coerce", "type_names", "check_params"]

Expected = type | tuple[type, ...]


def type_names(expected: Expected) -> str:
    """``"int/float"`` for ``(int, float)``: for messages."""
    wanted = expected if isinstance(expected, tuple) else (expected,)
    return "/".join(t.__name__ for t in wanted)


def coerce(value: Any, expected: Expected) -> Any:
    """``value`` if it is of ``expected`` (an int widened to float where only a float
    would do); ``TypeError`` naming both types when it is not."""
    wanted = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        ok = bool in wanted
    elif isinstance(value, int) and float in wanted and int not in wanted:
        return float(value)
    else:
        ok = isinstance(value, wanted)
    if not ok:
        raise TypeError(f"must be {type_names(wanted)}, got {type(value).__name__}")
    return value


def check_params(
    owner: str, params: Mapping[str, Any], allowed: Mapping[str, Expected]
) -> dict[str, Any]:
    """Check a plugin's parameters: no unknown keys, the right types. Returns a copy.

    Raises ``JobSpecError`` naming the key, what was expected and what is known.
    """
    out = dict(params)
    for key, value in out.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise JobSpecError(f"{owner}: unknown parameter {key!r} (known: {known})")
        try:
            out[key] = coerce(value, allowed[key])
        except TypeError:
            names = type_names(allowed[key])
            raise JobSpecError(
                f"{owner}: parameter {key!r} must be {names}, got {value!r}"
            ) from None
    return out

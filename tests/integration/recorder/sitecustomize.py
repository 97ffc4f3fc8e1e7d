"""Loaded by every Python process that has this folder on its PYTHONPATH: records
each message type a process packs, and each meta key with its value's type, as JSON
lines ``[type, key, value type]`` (``[type, "", ""]`` for the type itself) under
``$ELASTIC_RECORD_HEADERS/<pid>.jsonl``, each the first time it is seen.

``tests/integration/test_header_schema.py`` starts real daemons with it, to check that what
they send is what the protocol declares.
"""

import json
import os

_out = os.environ.get("ELASTIC_RECORD_HEADERS")
if _out:
    import elastic.wire.header as _header

    _pack = _header.pack
    _seen: set[tuple[str, str, str]] = set()

    def _record(entry: tuple[str, str, str]) -> None:
        if entry not in _seen:
            _seen.add(entry)
            with open(os.path.join(_out, f"{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _recording_pack(msg, specs, placement=None):  # type: ignore[no-untyped-def]
        _record((str(msg.type), "", ""))
        for key, value in msg.meta.items():
            _record((str(msg.type), str(key), type(value).__name__))
        return _pack(msg, specs, placement)

    _header.pack = _recording_pack  # before transport and frames import it

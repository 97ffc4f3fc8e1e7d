import io
import json
import logging

from elastic.logs import setup_logging


def test_json_and_key_value_logs() -> None:
    log = logging.getLogger("elastic.test")
    for fmt in ("json", "kv"):
        stream = io.StringIO()
        setup_logging(fmt, "info", stream)
        log.info("worker joined worker=%s slot=%d", "w1", 3)
        log.debug("hidden")
        line = stream.getvalue().strip()
        assert "\n" not in line
        if fmt == "json":
            record = json.loads(line)
            assert record["level"] == "info" and record["msg"] == "worker joined worker=w1 slot=3"
        else:
            assert "level=info logger=elastic.test msg='worker joined worker=w1 slot=3'" in line
    logging.getLogger("elastic").handlers.clear()
    logging.getLogger("elastic").propagate = True

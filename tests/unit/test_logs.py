"""Log formats (text and JSON) and the serve command's logging and metrics wiring."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from tokenwire_server import logs, main


def record(msg="Generate OK", fields=None, name="tokenwire.requests", level=logging.INFO, exc_info=None):
    r = logging.LogRecord(name, level, __file__, 1, msg, (), exc_info)
    if fields is not None:
        r.fields = fields
    return r


FIELDS = {"request_id": "abc", "method": "Generate", "status": "OK", "prompt_tokens": 7, "total_seconds": 0.25,
          "peer": "ipv4:127.0.0.1:5000", "prompt": 'say "hi"\nthen = stop'}


def test_text_shows_fields_as_key_value_on_one_line():
    line = logs.TextFormatter().format(record(fields=FIELDS))
    assert "\n" not in line
    assert line.split(": ", 1)[0].endswith("INFO tokenwire.requests")
    assert line.split(": ", 1)[1] == ('request_id=abc method=Generate status=OK prompt_tokens=7 total_seconds=0.25 '
                                      'peer=ipv4:127.0.0.1:5000 prompt="say \\"hi\\"\\nthen = stop"')


def test_text_leaves_other_lines_and_the_record_as_they_were():
    r = record("loaded %s", name="tokenwire_server.engine")
    r.args = ("model.gguf",)
    assert logs.TextFormatter().format(r).endswith(" INFO tokenwire_server.engine: loaded model.gguf")
    with_fields = record(fields={"a": 1})
    logs.TextFormatter().format(with_fields)
    assert with_fields.getMessage() == "Generate OK" and with_fields.message == "Generate OK"


def test_json_is_one_object_per_line_with_the_fields_as_keys():
    obj = json.loads(logs.JsonFormatter().format(record(fields=FIELDS)))
    assert {k: obj[k] for k in ("level", "logger", "message")} == \
        {"level": "INFO", "logger": "tokenwire.requests", "message": "Generate OK"}
    assert obj["timestamp"].endswith("+00:00") and "T" in obj["timestamp"]
    assert {k: obj[k] for k in FIELDS} == FIELDS
    try:
        raise ValueError("boom")
    except ValueError:
        line = logs.JsonFormatter().format(record("failed", name="x", level=logging.ERROR, exc_info=sys.exc_info()))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "ERROR" and "ValueError: boom" in obj["exception"]


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_configure_json_makes_every_line_json(restore_root_logger):
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    logging.getLogger("tokenwire_server.server").info("listening on %s", "x:1")
    logging.getLogger("tokenwire.requests").info("Tokenize OK", extra={"fields": {"request_id": "r1"}})
    logging.getLogger("anything").debug("not shown at INFO")
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["listening on x:1", "Tokenize OK"]
    assert json.loads(lines[1])["request_id"] == "r1"


def test_serve_passes_logging_and_metrics_flags(monkeypatch, restore_root_logger):
    seen = {}

    async def fake_serve(path, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr("tokenwire_server.server.serve", fake_serve)
    monkeypatch.setattr(main.registry, "resolve", lambda name: name)
    assert main.main(["serve", "--log-format", "json", "--log-prompts", "--metrics-port", "9123"]) == 0
    assert isinstance(logging.getLogger().handlers[0].formatter, logs.JsonFormatter)
    assert (seen["metrics_port"], seen["log_prompts"]) == (9123, True)
    assert main.main(["serve", "--metrics-port", "0"]) == 0
    assert isinstance(logging.getLogger().handlers[0].formatter, logs.TextFormatter)
    assert (seen["metrics_port"], seen["log_prompts"]) == (None, False)  # 0: no metrics endpoint

"""Log formats: human-readable text, or one JSON object per line.

A record may carry `fields` (a dict, passed as `extra={"fields": ...}`; the request log lines
of api/calls.py do): text renders them as key=value pairs, JSON as keys of the object."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _text_value(value) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in '"=\\' or not c.isprintable()
                                                    for c in value):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False)  # quoted and escaped: one line, whatever the text


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`; a record with fields shows them instead of its message."""

    def __init__(self):
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if not isinstance(fields, dict):
            return super().formatMessage(record)
        message = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return self._fmt % dict(record.__dict__, message=message)  # the record itself is left as it was


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC, ISO 8601), level, logger, message, the
    record's fields, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update((k, v) for k, v in fields.items() if k not in ("timestamp", "level", "logger", "message"))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str | int = "INFO", fmt: str = "text", stream=None) -> None:
    """Route every logger through one handler on the root logger, in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)

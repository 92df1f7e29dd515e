"""Structured logging: one JSON object per line, fields passed with ``extra={"fields": ...}``."""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import time
from typing import Any

# A write(2) of at most this many bytes to a pipe is never interleaved with another
# process's (POSIX): worker processes share their stdout/stderr pipe, so every line is
# written whole in one call, and shortened to fit when a field is huge.
LINE_LIMIT = select.PIPE_BUF
FIELD_LIMIT = 256  # characters kept of a long field when a line must be shortened


class JSONFormatter(logging.Formatter):
    """Formats a record as one line of JSON: time, level, logger, message, then fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class LineHandler(logging.Handler):
    """Writes each record as one line with one write(2) of at most LINE_LIMIT bytes, so
    that lines from several processes on one pipe never interleave."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            if len(data) > LINE_LIMIT:
                data = shorten(data)
            os.write(self.fd, data)
        except Exception:
            self.handleError(record)


def shorten(line: bytes) -> bytes:
    """A JSON line over LINE_LIMIT bytes with its long string fields cut (and marked), or,
    if that is not enough, its message and time alone."""
    entry = json.loads(line)
    for key, value in entry.items():
        if isinstance(value, str) and len(value) > FIELD_LIMIT:
            entry[key] = value[:FIELD_LIMIT] + f"...[{len(value) - FIELD_LIMIT} more]"
    entry["truncated"] = True
    data = (json.dumps(entry, default=str) + "\n").encode("utf-8", "backslashreplace")
    if len(data) <= LINE_LIMIT:
        return data
    short = {k: str(entry.get(k))[:FIELD_LIMIT] for k in ("time", "level", "logger", "msg")}
    return (json.dumps({**short, "truncated": True}) + "\n").encode()


def setup(level: str = "info", stream: Any = None) -> None:
    """Send every log record to stream (stderr by default) as JSON lines."""
    handler: logging.Handler
    try:
        handler = LineHandler((stream or sys.stderr).fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: a StringIO
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates ours and kopf's own handlers would double-print.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def fields(**values: Any) -> dict[str, Any]:
    """The ``extra`` argument that attaches structured fields to a log record."""
    return {"fields": values}

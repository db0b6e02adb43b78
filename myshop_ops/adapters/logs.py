"""Logging: JSON lines (default) or console lines; structured fields come from ``extra``."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from myshop_ops.adapters.config import redact
from myshop_ops.base.printable import printable

_C1 = re.compile("[\x7f-\x9f\u2028\u2029]")  # raw in JSON text; a terminal (journalctl) would act on C1
_SPACES = re.compile(r"\s{2,}")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def _redacted(value: object) -> object:
    """``value`` with every secret masked in its text (nested lists and dicts included; other types as text)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redacted(v) for v in value]
    return value if value is None or isinstance(value, bool | int | float) else redact(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        line = json.dumps(_redacted(doc), ensure_ascii=False)  # escapes C0; C1 and separators below
        return _C1.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def _value(value: object) -> str:
    """A console field's value: as is when it is one plain word, else in double quotes with ``\\`` and ``"``
    escaped, so no value can end its field early or add one (``u1 level=CRITICAL`` stays one value)."""
    text = printable(redact(value if isinstance(value, str) else str(value)))
    if text and not any(c.isspace() or c in '="\\' for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL   message  key=value key="two words"``: the message starts after the level padded to 7
    characters and a space, and holds no double space (runs of spaces become one, none at its ends), so the first
    double space after it starts the fields; values are quoted as ``_value`` says."""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{printable(k)}={_value(v)}" for k, v in _fields(record).items())
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        message = _SPACES.sub(" ", printable(redact(record.getMessage()))).strip()
        line = f"{ts} {record.levelname:<7} {message}" + (f"  {extra}" if extra else "")
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def setup(fmt: str = "json", level: int | str = logging.INFO) -> None:
    """Route every log record to stderr in ``fmt`` ("json" or "console")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pymongo", "httpx", "httpcore", "httpx2", "httpcore2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # our code reports every broker error, once, in one line

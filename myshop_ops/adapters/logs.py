"""Logging: JSON lines (default) or console lines; structured fields come from ``extra``."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from myshop_ops.base.printable import printable

_C1 = re.compile("[\x7f-\x9f\u2028\u2029]")  # raw in JSON text; a terminal (journalctl) would act on C1
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


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
        line = json.dumps(doc, default=str, ensure_ascii=False)  # escapes C0; C1 and separators below
        return _C1.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{printable(k)}={printable(v)}" for k, v in _fields(record).items())
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{ts} {record.levelname:<7} {printable(record.getMessage())}" + (f"  {extra}" if extra else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
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

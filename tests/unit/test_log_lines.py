"""Log lines cannot be forged by the data they carry, and carry no secret: the console format parses back to exactly
the fields logged, whatever their values; both formats mask every configured secret, in any text."""

from __future__ import annotations

import json
import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from myshop_ops.adapters.config import load_settings, redact
from myshop_ops.adapters.logs import ConsoleFormatter, JsonFormatter
from myshop_ops.base.printable import printable

KEY = "sk-proj-Hyg1eneTestKey0123456789abcdefWXYZ"


def parse_console(line: str) -> tuple[str, str, dict[str, str]]:
    """(level, message, fields) of one console line: the fields start at the first double space; a value is one
    word, or double-quoted with \\\\ and \\" escaped."""
    _ts, rest = line.split(" ", 1)
    level = rest.split(" ", 1)[0]
    message, _, tail = rest[max(len(level), 7) + 1:].partition("  ")
    fields: dict[str, str] = {}
    i = 0
    while i < len(tail):
        eq = tail.index("=", i)
        key, i = tail[i:eq], eq + 1
        if tail[i:i + 1] == '"':
            value, i = [], i + 1
            while tail[i] != '"':
                if tail[i] == "\\":
                    i += 1
                value.append(tail[i])
                i += 1
            value, i = "".join(value), i + 1
        else:
            end = tail.find(" ", i)
            end = len(tail) if end < 0 else end
            value, i = tail[i:end], end
        assert key not in fields, f"field {key} twice in {line!r}"
        fields[key] = value
        assert tail[i:i + 1] in ("", " "), f"junk after {key} in {line!r}"
        i += 1
    return level, message, fields


def record(message: str = "event failed", level: str = "INFO", **extra: object) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": message, "levelname": level, "levelno": logging.getLevelName(level),
                                  **extra})


def test_a_user_id_cannot_add_a_level_field():
    """The attack: a user id `u1 level=CRITICAL` added a forged `level=CRITICAL` field to the line."""
    line = ConsoleFormatter().format(record(user_id="u1 level=CRITICAL"))
    level, _, fields = parse_console(line)
    assert level == "INFO" and fields == {"user_id": "u1 level=CRITICAL"}, line


def test_a_message_cannot_start_the_fields():
    line = ConsoleFormatter().format(record("applied  level=CRITICAL user_id=admin", user_id="u1"))
    assert parse_console(line)[2] == {"user_id": "u1"}, line


values = st.one_of(st.text(), st.text(alphabet=' ="\\=\n\tabc'), st.integers(), st.none(), st.floats())


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True), values, max_size=4),
       message=st.text(max_size=40))
def test_any_field_value_parses_back_as_one_field(fields, message):
    fields = {k: v for k, v in fields.items() if k not in vars(logging.makeLogRecord({}))}
    line = ConsoleFormatter().format(record(message, **fields))
    assert "\n" not in line
    _, _, parsed = parse_console(line)
    assert parsed == {k: printable(redact(str(v))) for k, v in fields.items()}, line


def test_log_lines_mask_the_api_key_and_passwords():
    load_settings({"OPENAI_API_KEY": KEY, "REDIS_URL": "redis://:redis-Hyg1ene-pw@127.0.0.1:6379/0"}, env_file=None)
    said = f"Error code: 401 - Incorrect API key provided: {KEY}. auth redis-Hyg1ene-pw"
    try:
        raise RuntimeError(said)
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    rec = record(said, error=said, nested={"reply": [said]}, exc=RuntimeError(said), exc_info=exc_info)
    for formatter in (ConsoleFormatter(), JsonFormatter()):
        line = formatter.format(rec)
        assert KEY not in line and "redis-Hyg1ene-pw" not in line and "***WXYZ" in line, line
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["nested"] == {"reply": ["Error code: 401 - Incorrect API key provided: ***WXYZ. auth ***"]}

"""Text from data (messages, the catalog, the store) made safe for a terminal: control characters shown, never sent.

A user id, product name or error message reaches the operator's terminal through tables, log lines and errors. Raw,
its ESC / C1 CSI (``\\x9b``) sequences could rewrite the screen, set the clipboard (OSC 52) or hide later output,
and its newlines could forge a log line. ``printable`` shows each such character as an escape instead.
"""

from __future__ import annotations

import re

from myshop_ops.base.contract import CONTROL as UNSAFE  # C0, DEL, C1, line separators, bidirectional controls

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match) -> str:
    ch = m.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def printable(value: object) -> str:
    """``str(value)`` with every control character escaped (``\\x1b``, ``\\x9b``, ``\\n``, ``\\u202e``)."""
    text = value if isinstance(value, str) else str(value)
    return UNSAFE.sub(_escape, text) if UNSAFE.search(text) else text

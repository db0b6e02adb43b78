"""Fault injection for the tests of resumable commands: a process that kills itself (SIGKILL, no cleanup) right after
a named step, when the environment variable the command reads names that step."""

from __future__ import annotations

import os
import signal


def killed_after(variable: str, step: str) -> None:
    """SIGKILL this process when the environment variable ``variable`` is ``step``; otherwise nothing."""
    if os.environ.get(variable) == step:
        os.kill(os.getpid(), signal.SIGKILL)

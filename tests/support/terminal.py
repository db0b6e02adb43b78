"""Run `myshop ...` attached to a pseudo-terminal: for prompts (typer.confirm) and terminal-only output."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from dataclasses import dataclass

from tests.support.services import ROOT


@dataclass(frozen=True)
class TerminalRun:
    returncode: int
    output: str  # stdout and stderr as the terminal showed them (with the echo of what was typed)


def run_in_terminal(*args: str, env: dict[str, str], typed: str = "", timeout: float = 60) -> TerminalRun:
    """Run the CLI with stdin, stdout and stderr on a pty; ``typed`` is typed ahead (the tty buffers it)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "myshop_ops", *args], stdin=slave, stdout=slave, stderr=slave,
                            env={**env, "TERM": "xterm", "COLUMNS": "120"}, cwd=ROOT, start_new_session=True)
    os.close(slave)
    if typed:
        os.write(master, typed.encode())
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            raise AssertionError(f"myshop {' '.join(args)} still running after {timeout}s: {b''.join(chunks)!r}")
        return TerminalRun(proc.wait(timeout=10), b"".join(chunks).decode(errors="replace"))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

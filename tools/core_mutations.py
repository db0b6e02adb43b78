"""Break the worker core on purpose, one change at a time, and check that its stand-in tests notice (`make mutations`).

Each mutation below flips one decision of the core (what is marked processed, what is retried or failed, what is
acked, when the window releases, when the loop stops). It is applied to a copy of the package in a temporary
directory (the work tree is never touched) and the core's fast tests run against that copy; a mutation they do not
fail is a decision nobody tests. Exit 0 when every mutation was caught, 1 otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/unit/test_core_pipeline.py", "tests/unit/test_core_worker.py", "tests/unit/test_window.py",
         "tests/unit/test_limits.py", "tests/unit/test_pipeline_conflicts.py", "tests/unit/test_core_claims.py"]
# (module, text, replacement): each text occurs in the module
MUTATIONS = [
    ("core/pipeline.py", "(i.status == Status.DUPLICATE and not i.second_copy)",
     "(i.status == Status.DUPLICATE and i.second_copy)"),
    ("core/pipeline.py", "if current.seen(item.event.message_id):", "if False:"),
    ("core/pipeline.py", "newest = None  # only late events", "pass  # only late events"),
    ("core/pipeline.py", "if item.event.key in known:", "if False:"),
    ("core/pipeline.py", "its events fail\n            self._mark(pending.pop(user_id), Status.FAILED, problem)",
     "its events fail\n            self._mark(pending.pop(user_id), Status.RETRY, problem)"),
    ("core/pipeline.py", "Status.RETRY if got.transient else Status.FAILED",
     "Status.FAILED if got.transient else Status.RETRY"),
    ("core/pipeline.py", "return {u: groups[u] for u in outcome.conflicted}", "return {}"),
    ("core/settlement.py", "if item.status not in (Status.RETRY, Status.FAILED):",
     "if item.status not in (Status.FAILED,):"),
    ("core/settlement.py", "transient=item.status == Status.RETRY", "transient=True"),
    ("core/settlement.py", "if copy.failed else None", "if False else None"),
    ("core/settlement.py", "for d in batch] if ack_each", "for d in batch] if not ack_each"),
    ("core/worker.py", "free = d.user is None or d.user in granted or", "free = True or"),
    ("core/worker.py", "self.pipeline.forget(u for u, c in zip(users, claimed.codes, strict=True) if c == 1)",
     "self.pipeline.forget(u for u, c in zip(users, claimed.codes, strict=True) if c == 0)"),
    ("core/settlement.py", "if lowest_open is None or t < lowest_open", "if True"),
    ("core/window.py", "return now - held.last >= self.window or now - held.first >= self.cap",
     "return now - held.last >= self.window"),
    ("core/limits.py", "self.processed >= self.messages", "self.processed > self.messages"),
    ("core/limits.py", "self.failures is not None and self.failed >= self.failures", "False"),
]


def run(tests_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
                          cwd=tests_root, capture_output=True, text=True)


def main() -> int:
    survived = []
    with tempfile.TemporaryDirectory(prefix="myshop-mutations-") as tmp:
        copy = Path(tmp)
        for name in ("myshop_ops", "tests", "pyproject.toml"):
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / name)
        if run(copy).returncode != 0:
            print("the core's tests fail without any mutation: fix them first", file=sys.stderr)
            return 1
        for module, text, replacement in MUTATIONS:
            path = copy / "myshop_ops" / module
            original = path.read_text()
            if original.count(text) != 1:
                print(f"{module}: {text!r} not found once: update this list", file=sys.stderr)
                return 1
            path.write_text(original.replace(text, replacement))
            started = time.monotonic()
            done = run(copy)
            path.write_text(original)
            caught = done.returncode != 0
            last = (done.stdout.strip().splitlines() or ["?"])[-1]
            print(f"{'caught  ' if caught else 'SURVIVED'} {time.monotonic() - started:5.1f} s  {module}: "
                  f"{text[:60]!r} -> {replacement[:40]!r}  ({last})")
            if not caught:
                survived.append((module, text))
    print(f"{len(MUTATIONS) - len(survived)} of {len(MUTATIONS)} mutations caught by the core's stand-in tests")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`, the README's main command, run as written (tools/demo.py) on the real services, at the default
1,536 dimensions and in the shop layout, in this test's own queue, database and Redis prefix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.services import ROOT
from tests.support.workers import one_line

pytestmark = pytest.mark.integration

CATEGORY = {"demo-audio-fan": "audio", "demo-runner": "sports", "demo-home-cook": "kitchen"}


def test_the_demo_runs_end_to_end_and_ranks_each_story_in_its_category(env):
    demo_env = env.subprocess_env(COLUMNS="200")
    del demo_env["EMBEDDING_DIMENSIONS"]  # the demo's own size: a catalog write of 1,536-d products once stalled it
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py")], env=demo_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = one_line(done.stdout)
    assert "imported catalog.jsonl: 240 embedded, 0 already stored, 0 bad (hash-v1, 1536d)" in out
    for user, category in CATEGORY.items():
        top = out.split(f"top 5 for user {user}")[1].split("$ myshop")[0]
        assert top.count(f"│ {category}") == 5, (user, top)

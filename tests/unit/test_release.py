"""Which release runs: `myshop --version`, preflight and the metrics' build info say the same version."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client import generate_latest

from myshop_ops.adapters.metrics import Metrics, QueueExporter
from myshop_ops.adapters.release import version
from myshop_ops.tools import preflight


def test_version_names_the_build_in_every_place_an_operator_looks():
    v = version()
    assert v and v != "unknown"  # the build's version (setuptools-scm, from git)
    done = subprocess.run([sys.executable, "-m", "myshop_ops", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == f"myshop-ops {v}\n", done
    for registry in (Metrics().registry, QueueExporter(5).registry):
        assert f'myshop_build_info{{version="{v}"}} 1.0' in generate_latest(registry).decode()
    release = next(c for c in preflight._packages() if c.name == "release")
    assert (release.status, release.detail) == ("PASS", f"myshop-ops {v}")

"""Which release runs: the version the build wrote (setuptools-scm, from git), shown by `myshop --version`,
preflight and the metrics' ``myshop_build_info``."""

from __future__ import annotations

import importlib.metadata

UNKNOWN = "unknown"


def version() -> str:
    """The version written into the package at build time, else the installed distribution's, else ``unknown``
    (a source tree that was never built)."""
    try:
        from myshop_ops.adapters._version import version as built  # written by the build, not in git
    except ImportError:
        pass
    else:
        return str(built)
    try:
        return importlib.metadata.version("myshop-ops")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN

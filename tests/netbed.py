"""The namespace test bed for tests: exo.tools.netbed, skipped only off CI without root."""

from __future__ import annotations

import os

import pytest

from exo.tools.netbed import Bed

__all__ = ["Bed", "need_root"]


def need_root() -> None:
    """Skip without root, but never when CI is set: there the test must run."""
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("needs root for network namespaces")

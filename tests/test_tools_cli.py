"""exo-tools' command tree, as an operator sees it in --help."""

from __future__ import annotations

import subprocess
import sys


def tools(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "exo.tools.main", *args], capture_output=True, text=True, check=True
    )
    return out.stdout


def test_every_command_group_is_wired() -> None:
    top = tools("--help")
    for cmd in ("up", "linkstat", "models", "instances", "bench", "api"):
        assert f"  {cmd} " in top, top
    bench = tools("bench", "--help")
    for cmd in ("overhead", "cancel", "stall", "churn", "pipeline", "links"):
        assert f"  {cmd} " in bench, bench
    # the options shared between command groups reach each of them
    assert "--models-dir" in tools("bench", "stall", "--help")
    assert "--models-dir" in tools("models", "list", "--help")

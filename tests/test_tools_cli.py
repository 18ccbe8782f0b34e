"""exo-tools' command tree, as an operator sees it in --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


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
    for cmd in ("overhead", "cancel", "stall", "churn", "pipeline", "links", "lane"):
        assert f"  {cmd} " in bench, bench
    # the options shared between command groups reach each of them
    assert "--models-dir" in tools("bench", "stall", "--help")
    assert "--models-dir" in tools("models", "list", "--help")


def test_bench_lane_measures_steps_with_the_lane_held_and_working(models_dir: Path) -> None:
    from tests.conftest import TINY

    out = tools(
        "bench", "lane", "--model", TINY, "--models-dir", str(models_dir),
        "--long-tokens", "300", "--blocks", "4", "--block-steps", "3", "--json",
    )  # fmt: skip
    r = json.loads(out.strip().splitlines()[-1])
    # Both kinds of block measured (what holding does is test_engine's paused-lane
    # test); how far a lane at nice 19 gets beside the tiny model's 10 ms steps is
    # not this test's business.
    assert r["steps_held"] >= 2 and r["steps_working"] >= 2
    assert r["step_held_s"] > 0 and r["working_over_held"] > 0

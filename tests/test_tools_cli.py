"""exo-tools' command tree, as an operator sees it in --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


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
    for cmd in (
        "overhead", "cancel", "stall", "churn", "pipeline", "links", "lane", "grammar",
        "curve", "weights", "failover", "prefix",
    ):  # fmt: skip
        assert f"  {cmd} " in bench, bench
    # the options shared between command groups reach each of them
    assert "--models-dir" in tools("bench", "stall", "--help")
    assert "--models-dir" in tools("models", "list", "--help")


def test_bench_grammar_steps_each_library_through_a_valid_document(tiny_path: Path) -> None:
    from exo.tools.bench_grammar import libraries

    rows = {r["library"]: r for r in libraries(tiny_path)}
    for name in ("llguidance", "outlines-core"):  # (each accepts every token of it)
        assert rows[name]["tokens"] > 50 and rows[name]["median_us"] > 0, rows[name]
    assert "torch" in rows["xgrammar"]["skipped"]


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


def test_bench_stall_report_shows_each_rounds_median_during_and_median_before(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from exo.tools.bench_stall import report

    def round_(before: float, during: float) -> dict[str, float]:
        return {
            "itl_median_before_s": before,
            "itl_max_during_s": 1.5 * before,
            "itl_p99_during_s": 1.4 * before,
            "itl_median_during_s": during,
            "stall_ratio": 1.5,
            "itl_max_joined_s": 1.6 * before,
            "joined_ratio": 1.6,
            "control_ratio": 1.3,
            "long_ttft_s": 25.0,
            "long_ttft_alone_s": 14.0,
            "ttft_ratio": 25 / 14,
            "p99_ratio": 1.4,
        }

    rounds = [round_(0.2, 0.22), {**round_(0.16, 0.2), "busy": True, "ttft_ratio": 2.5}]
    report(
        {
            "model": "m",
            "streams": 4,
            "long_prompt_tokens": 2048,
            "machine": "here",
            "floor_max_ratio": 1.42,
            "floor_p99_ratio": 1.31,
            "exo": rounds[0],
            "exo_rounds": rounds,
            "batchgen": {"itl_median_before_s": 0.2, "itl_max_during_s": 40.0, "stall_ratio": 200},
            "throughput": [],
            "worst_ttft_ratio": 2.5,
            "median_p99_ratio": 1.4,
        }
    )
    out = capsys.readouterr().out
    assert "median ITL during, s" in out and "0.220" in out
    # per round: max / p99 / median during over the median before, and that median
    assert "1: 1.50 / 1.40 / 1.10, 1.60, 1.30; 0.200s; 25.0s (x1.8)" in out, out
    assert "2: 1.50 / 1.40 / 1.25, 1.60, 1.30; 0.160s; 25.0s (x2.5) busy" in out, out
    assert "worst round's TTFT ratio 2.50; median round's p99 / median before 1.40" in out
    assert "fixed work, idle: max / median            1.42   (p99 1.31" in out, out


def test_bench_stall_machine_floor_times_one_fixed_computation() -> None:
    from exo.tools.streams import machine_floor

    r = machine_floor(1.0, step_s=0.02)
    assert r["floor_max_ratio"] >= r["floor_p99_ratio"] >= 1.0

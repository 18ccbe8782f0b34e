"""`exo-tools doctor` on a healthy machine and on broken ones: each problem
reported with its fix, as an operator runs it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from exo.tools import doctor


def run_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "exo.tools.main", "doctor", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_healthy_machine_has_nothing_to_fix(tmp_path: Path) -> None:
    from exo.tools.cluster import free_ports

    api, router, pub = free_ports(3)
    got = run_doctor(
        "--models-dir", str(tmp_path), "--api-port", str(api), "--port", str(router),
        "--pub-port", str(pub),
    )  # fmt: skip
    assert got.returncode == 0, got.stdout + got.stderr
    assert "nothing to fix" in got.stdout and "FIX" not in got.stdout


def test_a_partial_model_and_a_taken_port_are_reported_with_their_fix(tmp_path: Path) -> None:
    (tmp_path / "org--half.partial").mkdir()
    (tmp_path / "org--broken").mkdir()
    (tmp_path / "org--broken" / "weights.safetensors.partial").write_bytes(b"x")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        got = run_doctor("--models-dir", str(tmp_path), "--api-port", str(port))
    assert got.returncode == 1
    out = got.stdout
    assert "FIX   model org--half.partial" in out and "FIX   model org--broken" in out
    assert "partial files" in out and "exo-tools models rm" in out
    assert f"FIX   port {port} (api)" in out and "--api-port" in out


def test_the_cluster_check_reports_skew_pressure_and_links_down() -> None:
    state: dict[str, Any] = {
        "nodes": [
            {"name": "a", "info": {"memory_pressure": {"level": "critical"}}},
            {"name": "b", "info": {}, "clock_skew_s": -4.2},
            {"name": "c", "info": {}, "clock_skew_s": 0.01},
        ],
        "version_skew": {"mlx": {"0.32.4": ["a"], "0.31.0": ["b"]}},
        "links": [{"up": False, "a": {"address": "10.0.0.1"}, "b": {"address": "10.0.0.2"}}],
    }
    found = [f for f in doctor.findings(state) if f.problem]
    text = "\n".join(f.line() for f in found)
    assert "versions: mlx" in text and "memory pressure critical" in text and "down" in text
    assert "node b: its clock is -4.2 s from the broker's" in text and "node c" not in text


def test_doctor_reads_a_running_cluster(cluster: Any, tmp_path: Path) -> None:
    from exo.tools.cluster import free_ports

    api, router, pub = free_ports(3)
    got = run_doctor(
        "--models-dir", str(tmp_path), "--api", cluster.url, "--api-port", str(api),
        "--port", str(router), "--pub-port", str(pub),
    )  # fmt: skip
    assert f"ok    cluster at {cluster.url}: 1 node(s)" in got.stdout, got.stdout
    assert got.returncode == 0, got.stdout
    (node,) = cluster.cluster_state()["nodes"]
    assert abs(node["clock_skew_s"]) < 0.5  # measured, one machine: one clock

"""`exo-tools up`: the one command in the README, as a person runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from exo.tools.cluster import free_port


def test_up_serves_the_default_model_and_stops_everything_on_ctrl_c(
    models_dir: Path, tmp_path: Path
) -> None:
    api, router, pub = free_port(), free_port(), free_port()
    env = {**os.environ, "EXO_HOME": str(tmp_path / "home")}
    # models_dir already holds the default model: up must find it and not re-import it.
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exo.tools.main",
            "up",
            "--nodes",
            "2",
            "--models-dir",
            str(models_dir),
            "--api-port",
            str(api),
            "--port",
            str(router),
            "--pub-port",
            str(pub),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # As a shell without job control starts a background command: SIGINT ignored.
        # Ctrl-C (SIGINT below) must stop it all the same.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    out: list[str] = []
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            out.append(line)
            if "Ctrl-C stops" in line or not line:
                break
        text = "".join(out)
        assert f"OpenAI base URL: http://127.0.0.1:{api}/v1" in text, text
        curl = re.search(r"^curl .*$", text, re.M)
        assert curl is not None
        r = httpx.post(
            f"http://127.0.0.1:{api}/v1/chat/completions",
            timeout=120,
            json={
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "max_tokens": 16,
                "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
        )
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        assert len(httpx.get(f"http://127.0.0.1:{api}/v1/cluster", timeout=10).json()["nodes"]) == 2
        children = psutil.Process(p.pid).children(recursive=True)
        assert len(children) == 3  # broker and two nodes
        assert text.count(" layers [") == 2  # one instance, a stage on each node
        p.send_signal(signal.SIGINT)
        p.wait(30)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, alive
    finally:
        if p.poll() is None:
            # its broker and nodes too, or a failure here leaves them running
            for c in psutil.Process(p.pid).children(recursive=True):
                c.kill()
            p.kill()


def up_process(models_dir: Path, tmp_path: Path, nodes: int) -> tuple[subprocess.Popen, int]:
    api, router, pub = free_port(), free_port(), free_port()
    env = {**os.environ, "EXO_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "exo.tools.main", "up", "--nodes", str(nodes)]
    cmd += ["--models-dir", str(models_dir), "--api-port", str(api)]
    cmd += ["--port", str(router), "--pub-port", str(pub)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return p, api


def test_up_killed_outright_takes_its_broker_and_nodes_along(
    models_dir: Path, tmp_path: Path
) -> None:
    p, _ = up_process(models_dir, tmp_path, 1)
    children: list[psutil.Process] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            if "Ctrl-C stops" in line:
                break
        children = psutil.Process(p.pid).children(recursive=True)
        assert len(children) == 2  # the broker and a node
        p.kill()  # no chance to stop them itself
        p.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, alive
    finally:
        for c in children:
            if c.is_running():
                c.kill()
        if p.poll() is None:
            p.kill()


def test_an_instance_a_request_placed_first_is_what_up_wanted(
    models_dir: Path, tmp_path: Path, capsys: object
) -> None:
    from exo.tools.cluster import LocalCluster, wait_ready
    from exo.tools.up import place_and_greet

    with LocalCluster.on_free_ports(models_dir, log_dir=tmp_path) as c:
        # a request arriving before up places the model: the cluster places it itself
        body = {"model": "test/tiny-llama", "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{c.url}/v1/completions", json=body, timeout=60).is_success
        (first,) = httpx.get(f"{c.url}/v1/instances", timeout=10).json()["data"]
        wait_ready(c.url, first["id"], timeout=60)
        place_and_greet(c, "test/tiny-llama", 1)  # no placement_impossible
        (inst,) = httpx.get(f"{c.url}/v1/instances", timeout=10).json()["data"]
        assert inst["id"] == first["id"]

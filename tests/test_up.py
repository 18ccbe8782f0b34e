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

"""Small helpers the process-level tests share."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from exo.tools.cluster import LocalCluster


def wait_until(cond: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll until `cond` returns something true, and return it; fail after `timeout`.
    (Node status travels in heartbeats, so tests poll rather than read once.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


def linkstat_json(c: LocalCluster) -> dict[str, Any]:
    """`exo-tools linkstat --once --json` against the cluster's PUB socket, as an operator runs it."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo.tools.main",
            "linkstat",
            "--broker",
            "127.0.0.1",
            "--pub-port",
            str(c.pub_port),
            "--once",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(json.loads(out.stdout))


def stream_while(
    c: LocalCluster, path: str, body: dict[str, Any], poll: Callable[[], None]
) -> list[str]:
    """POST a streaming request and call `poll` every 0.2 s until the stream ends;
    the stream's non-empty lines."""
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{c.url}{path}", timeout=120, json=body) as resp:
            lines.extend(line for line in resp.iter_lines() if line)

    t = threading.Thread(target=stream)
    t.start()
    while t.is_alive():
        poll()
        time.sleep(0.2)
    t.join()
    return lines

"""`exo-tools doctor`: what is wrong with this machine (or the cluster), and the
command that fixes it.

Each check gives a line: ok, or the problem and its fix. On one machine: Python,
the virtual environment, MLX's backend and the BLAS it actually loaded, the
memory-pressure source, the ports (free, or held by exo), the models folder
(writable, its model folders complete), disk space, the cluster's keys. With
`--api URL`, the cluster as its broker sees it: nodes, the versions they
disagree on, nodes under memory pressure, links down.
"""

from __future__ import annotations

import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from exo.tools.options import models_dir_option, resolve_models_dir

MIN_PYTHON = (3, 11)
MIN_DISK = 2 << 30  # a small model and its download's room


@dataclass
class Finding:
    check: str
    problem: str | None = None  # None: fine
    fix: str = ""

    def line(self) -> str:
        if self.problem is None:
            return f"ok    {self.check}"
        return f"FIX   {self.check}: {self.problem}\n      -> {self.fix}"


def python() -> Finding:
    if sys.version_info < MIN_PYTHON:
        found = ".".join(map(str, sys.version_info[:3]))
        return Finding(
            "python", f"{found} is older than 3.11", "install Python 3.11+, then `make install`"
        )
    if sys.prefix == sys.base_prefix:
        return Finding(
            "python", "not in a virtual environment", "`make install`, then use .venv/bin/"
        )
    return Finding("python")


def mlx() -> Finding:
    try:
        from exo.nodes.engine.mlxenv import blas, mx
    except Exception as e:  # an import that fails says what is missing
        return Finding("mlx", f"MLX does not import: {e}", "`make install`")
    device = str(mx.default_device())
    if "cpu" in device and not blas.startswith(("openblas", "native")):
        return Finding(
            "mlx",
            f"on the CPU with the {blas} BLAS: 3-10x slower than OpenBLAS",
            "`make system-deps` (installs libopenblas0-pthread), or set EXO_OPENBLAS",
        )
    return Finding("mlx")


def pressure() -> Finding:
    from exo.nodes.machine.pressure import read_pressure

    got = read_pressure()
    if sys.platform == "linux" and "psi_some_avg10" not in got:
        return Finding(
            "memory pressure",
            "/proc/pressure/memory is not readable: placement sees no pressure",
            "a kernel with PSI (CONFIG_PSI=y, psi=1 on the command line), or EXO_PSI_FILE",
        )
    return Finding("memory pressure")


def port(number: int, name: str) -> Finding:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", number))
        except OSError:
            owner = holder(number)
            if owner and "exo" in owner:
                return Finding(f"port {number} ({name})")  # exo's own, running
            return Finding(
                f"port {number} ({name})",
                f"taken by {owner or 'another process'}",
                f"stop it, or start exo with another port (--{name}-port)",
            )
    return Finding(f"port {number} ({name})")


def holder(number: int) -> str | None:
    """The command line of the process listening on `number`, where it can be read."""
    import psutil

    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == number and c.status == psutil.CONN_LISTEN and c.pid:
                return " ".join(psutil.Process(c.pid).cmdline())[:200]
    except (psutil.Error, OSError):
        return None
    return None


def models(models_dir: Path) -> list[Finding]:
    from exo.nodes.store.store import incomplete_reason

    out = []
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        probe = models_dir / ".exo-doctor"
        probe.write_text("ok")
        probe.unlink()
        out.append(Finding(f"models folder {models_dir}"))
    except OSError as e:
        out.append(
            Finding(
                f"models folder {models_dir}",
                f"not writable: {e}",
                "fix its owner, or pass --models-dir",
            )
        )
        return out
    for d in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        why = incomplete_reason(d)
        if d.name.endswith(".partial") or why is not None:
            out.append(
                Finding(
                    f"model {d.name}",
                    why or "an interrupted build or download",
                    f"`exo-tools models rm {d.name.replace('--', '/')}` or pull it again",
                )
            )
    free = shutil.disk_usage(models_dir).free
    if free < MIN_DISK:
        out.append(Finding("disk", f"{free >> 20} MiB free under {models_dir}", "free some space"))
    return out


def keys() -> Finding:
    from exo.common import keys as k

    try:
        k.Cluster.load()
    except k.KeysMissing as e:
        return Finding(
            "cluster keys",
            str(e),
            "on the broker's machine: `exo-broker` makes them; elsewhere `exo-node --join ...`",
        )
    except Exception as e:
        return Finding(
            "cluster keys", f"unreadable: {e}", "check their files' owner and mode (0600)"
        )
    return Finding("cluster keys")


# Beyond this, logs and timestamps from different machines no longer line up.
MAX_SKEW_S = 1.0


def cluster(url: str, headers: dict[str, str]) -> list[Finding]:
    """The cluster as its broker sees it."""
    import httpx

    try:
        state: dict[str, Any] = httpx.get(f"{url}/v1/cluster", headers=headers, timeout=5).json()
    except (httpx.HTTPError, ValueError) as e:
        return [
            Finding(
                f"cluster at {url}", f"no answer: {e}", "start it: `exo-broker` (or `make run`)"
            )
        ]
    return [Finding(f"cluster at {url}: {len(state.get('nodes', []))} node(s)"), *findings(state)]


def findings(state: dict[str, Any]) -> list[Finding]:
    """What is wrong in a cluster state (the broker's /v1/cluster)."""
    out: list[Finding] = []
    if not state.get("nodes"):
        out.append(
            Finding("nodes", "none connected", "start one: `exo-node --broker tcp://HOST:52416`")
        )
    for key, by in (state.get("version_skew") or {}).items():
        seen = "; ".join(f"{v} on {', '.join(n)}" for v, n in by.items())
        out.append(
            Finding(
                f"versions: {key}",
                f"nodes disagree ({seen})",
                "`make install` on each, from one commit",
            )
        )
    for n in state.get("nodes", []):
        level = (n.get("info", {}).get("memory_pressure") or {}).get("level", "normal")
        if level != "normal":
            out.append(
                Finding(
                    f"node {n.get('name')}",
                    f"memory pressure {level}",
                    "free memory there, or unload a model",
                )
            )
    for n in state.get("nodes", []):
        skew = n.get("clock_skew_s")
        if isinstance(skew, int | float) and abs(skew) > MAX_SKEW_S:
            out.append(
                Finding(
                    f"node {n.get('name')}",
                    f"its clock is {skew:+.1f} s from the broker's",
                    "keep both in sync: `timedatectl set-ntp true` (Linux), "
                    "`sntp -sS time.apple.com` (macOS)",
                )
            )
    for lk in state.get("links", []):
        if not lk.get("up", True):
            ends = f"{lk['a'].get('address')} - {lk['b'].get('address')}"
            out.append(Finding(f"link {ends}", "down", "check its cable or interface"))
    return out


def run(
    models_dir: Path, ports: dict[str, int], url: str | None, headers: dict[str, str]
) -> list[Finding]:
    found = [python(), mlx(), pressure(), keys()]
    found += [port(p, name) for name, p in ports.items()]
    found += models(models_dir)
    if url:
        found += cluster(url, headers)
    return found


@click.command("doctor")
@click.option("--api", "url", default=None, help="The cluster's API too (http://HOST:52415).")
@click.option("--api-port", default=52415, show_default=True)
@click.option("--port", default=52416, show_default=True, help="The broker's ROUTER port.")
@click.option("--pub-port", default=52417, show_default=True)
@models_dir_option
def doctor(
    url: str | None, api_port: int, port: int, pub_port: int, models_dir: Path | None
) -> None:
    """What is wrong with this machine (and the cluster), with the fix for each."""
    from exo.tools.cluster import api_headers

    ports = {"api": api_port, "router": port, "pub": pub_port}
    found = run(resolve_models_dir(models_dir), ports, url, api_headers())
    for f in found:
        click.echo(f.line())
    bad = [f for f in found if f.problem is not None]
    click.echo(f"\n{len(bad)} to fix" if bad else "\nnothing to fix")
    if bad:
        raise SystemExit(1)

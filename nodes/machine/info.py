"""What a node tells the broker about its machine."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil


def sysctl(name: str) -> str | None:
    """A macOS sysctl value, or None where there is none."""
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def chip() -> str:
    system = platform.system()
    if system == "Darwin" and (brand := sysctl("machdep.cpu.brand_string")):
        return brand
    if system == "Linux":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return platform.processor() or platform.machine()


def gather(models: list[str], blas: str, models_dir: Path | None = None) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    disk_free = 0
    if models_dir is not None:
        probe = models_dir if models_dir.exists() else models_dir.parent
        with contextlib.suppress(OSError):
            disk_free = shutil.disk_usage(probe).free
    return {
        "hostname": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "chip": chip(),
        "cores": os.cpu_count() or 1,
        "memory_total": vm.total,
        "memory_available": vm.available,
        "blas": blas,
        "models": models,
        "disk_free": disk_free,
        "versions": versions(blas),
    }


def versions(blas: str) -> dict[str, str]:
    """The versions that matter: the project, the wire, Python, MLX (and its
    backend), mlx-lm, the BLAS library, the OS. The broker flags those the nodes
    disagree on, and splits no model across nodes whose MLX, mlx-lm or protocol
    differ (broker/deploy.py: the same step could give other tokens)."""
    from importlib.metadata import PackageNotFoundError, version

    from exo.broker.protocol import VERSION
    from exo.nodes.engine.mlxenv import mx

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return ""

    return {
        "exo": of("exo-zmq") or of("exo"),
        "protocol": str(VERSION),
        "python": platform.python_version(),
        "mlx": of("mlx"),
        "mlx_backend": str(mx.default_device()),
        "mlx_lm": of("mlx-lm"),
        "blas": blas.split(" ")[0],
        "os": f"{platform.system()} {platform.release()}",
    }

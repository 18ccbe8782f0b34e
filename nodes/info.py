"""What a node tells the broker about its machine."""

from __future__ import annotations

import os
import platform
import socket
import subprocess

import psutil


def chip() -> str:
    system = platform.system()
    if system == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=2,
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    if system == "Linux":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return platform.processor() or platform.machine()


def gather(models: list[str], blas: str) -> dict:
    vm = psutil.virtual_memory()
    return {
        "hostname": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "chip": chip(),
        "cores": os.cpu_count() or 1,
        "memory_total": vm.total,
        "memory_available": vm.available,
        "blas": blas,
        "models": models,
    }

"""Memory pressure, read where the OS tells it.

Linux: PSI, `/proc/pressure/memory`, the share of the last 10 seconds in which
some task stalled on memory (`some avg10`). MemAvailable alone stays flat while
a cgroup is squeezed, PSI does not. macOS: `sysctl kern.memorystatus_vm_pressure_level`,
1 normal, 2 warn, 4 critical. Both raw figures and a level are reported.

EXO_PSI_FILE names another PSI file (a container's cgroup `memory.pressure`, or
a recorded one in tests); EXO_MACOS_PRESSURE_LEVEL stands in for the sysctl.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

PSI_FILE = Path("/proc/pressure/memory")
# `some avg10` thresholds (percent of time stalled): the kernel's own OOM-avoidance
# tools (systemd-oomd) start acting at a few tens of percent.
WARN_AVG10 = 10.0
CRITICAL_AVG10 = 40.0
MACOS_LEVELS = {1: "normal", 2: "warn", 4: "critical"}


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """'some avg10=0.00 avg60=0.00 avg300=0.00 total=0' lines -> {'some': {...}, ...}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind not in ("some", "full"):
            continue
        fields = {}
        for item in rest.split():
            key, _, value = item.partition("=")
            try:
                fields[key] = float(value)
            except ValueError:
                continue
        out[kind] = fields
    return out


def level_from_psi(some_avg10: float) -> str:
    if some_avg10 >= CRITICAL_AVG10:
        return "critical"
    return "warn" if some_avg10 >= WARN_AVG10 else "normal"


def macos_level() -> int | None:
    forced = os.environ.get("EXO_MACOS_PRESSURE_LEVEL")
    if forced:
        return int(forced)
    if platform.system() != "Darwin":
        return None
    from exo.nodes.machine.info import sysctl

    value = sysctl("kern.memorystatus_vm_pressure_level")
    return int(value) if value and value.isdigit() else None


def read_pressure() -> dict[str, Any]:
    """{'level': ..., and 'psi_some_avg10' / 'macos_level' where the OS has them}."""
    out: dict[str, Any] = {"level": "normal"}
    levels = ["normal"]
    path = Path(os.environ.get("EXO_PSI_FILE") or PSI_FILE)
    try:
        psi = parse_psi(path.read_text())
    except OSError:
        psi = {}
    if "some" in psi and "avg10" in psi["some"]:
        out["psi_some_avg10"] = psi["some"]["avg10"]
        levels.append(level_from_psi(psi["some"]["avg10"]))
    mac = macos_level()
    if mac is not None:
        out["macos_level"] = mac
        levels.append(MACOS_LEVELS.get(mac, "normal"))
    order = ["normal", "warn", "critical"]
    out["level"] = max(levels, key=order.index)
    return out

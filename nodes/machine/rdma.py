"""RDMA devices, from `ibv_devinfo`. A device is usable only with a port in PORT_ACTIVE."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Port:
    port: int
    state: str
    link_layer: str
    active_mtu: int


@dataclass
class Device:
    name: str
    transport: str
    ports: list[Port] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return any(p.state == "PORT_ACTIVE" for p in self.ports)

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "usable": self.usable}


def parse_ibv_devinfo(text: str) -> list[Device]:
    devices: list[Device] = []
    port: Port | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if m := re.match(r"hca_id:\s*(\S+)", line):
            devices.append(Device(m.group(1), ""))
            port = None
        elif not devices:
            continue
        elif m := re.match(r"transport:\s*(.+?)\s*(\(\d+\))?$", line):
            devices[-1].transport = m.group(1)
        elif m := re.match(r"port:\s*(\d+)", line):
            port = Port(int(m.group(1)), "", "", 0)
            devices[-1].ports.append(port)
        elif port is not None and (m := re.match(r"state:\s*(\S+)", line)):
            port.state = m.group(1)
        elif port is not None and (m := re.match(r"link_layer:\s*(\S+)", line)):
            port.link_layer = m.group(1)
        elif port is not None and (m := re.match(r"active_mtu:\s*(\d+)", line)):
            port.active_mtu = int(m.group(1))
    return devices


def rdma_devices() -> list[Device]:
    """[] where ibv_devinfo is missing or finds nothing."""
    exe = shutil.which("ibv_devinfo")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_ibv_devinfo(out.stdout)

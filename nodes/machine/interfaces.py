"""The node's network interfaces and what kind of link each one is.

An explicit type always wins, in this order: a `--link-types` JSON file
({ifname: type}), then an interface alias `linktype=TYPE` (`ip link set dev X
alias linktype=wifi`; how tests make a virtual link pose as WiFi or
Thunderbolt), then detection from the OS. Detection is a set of pure functions
over what the OS shows (a sysfs tree, `networksetup` output) so that it is
tested on recorded outputs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

TYPES = ("thunderbolt5", "thunderbolt", "ethernet", "wifi", "vpn", "loopback", "other")
VPN_PREFIXES = ("wg", "tun", "tap", "utun", "tailscale", "zt", "ppp", "ipsec")
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
ARPHRD_NONE = 65534  # wireguard, tun


@dataclass
class Interface:
    name: str
    type: str
    up: bool
    mtu: int
    addresses: list[str] = field(default_factory=list)
    source: str = "detected"  # file | alias | detected
    networks: list[str] = field(default_factory=list)  # "addr/prefix", to pair ends into links

    def public(self) -> dict[str, Any]:
        return asdict(self)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def alias_type(alias: str) -> str | None:
    m = re.fullmatch(r"\s*linktype=(\w+)\s*", alias or "")
    return m.group(1) if m and m.group(1) in TYPES else None


def detect_linux(name: str, sysfs: Path = Path("/sys/class/net")) -> str:
    """The link type of `name` from a sysfs tree."""
    d = sysfs / name
    uevent = dict(line.split("=", 1) for line in _read(d / "uevent").splitlines() if "=" in line)
    arphrd = int(_read(d / "type") or 0)
    if arphrd == ARPHRD_LOOPBACK or name == "lo":
        return "loopback"
    if (d / "wireless").is_dir() or (d / "phy80211").exists() or uevent.get("DEVTYPE") == "wlan":
        return "wifi"
    driver = (
        os.path.basename(os.readlink(d / "device" / "driver"))
        if (d / "device" / "driver").is_symlink()
        else ""
    )
    if driver in ("thunderbolt-net", "thunderbolt_net", "thunderbolt"):
        return "thunderbolt"
    if (
        uevent.get("DEVTYPE") in ("wireguard", "tun")
        or (d / "tun_flags").exists()
        or arphrd == ARPHRD_NONE
    ):
        return "vpn"
    if name.startswith(VPN_PREFIXES):
        return "vpn"
    if arphrd == ARPHRD_ETHER and (d / "device").exists():
        return "ethernet"
    return "other"


MAC_PORTS = (
    # (pattern on networksetup's "Hardware Port", type); first match wins
    (r"wi-?fi|airport", "wifi"),
    (r"thunderbolt (bridge|\d)", "thunderbolt"),
    (r"ethernet|lan|usb .*lan|10/100", "ethernet"),
    (r"vpn|tailscale|wireguard", "vpn"),
)


def parse_networksetup(text: str) -> dict[str, str]:
    """`networksetup -listallhardwareports` -> {device: type}."""
    out: dict[str, str] = {}
    for block in text.split("\n\n"):
        port = re.search(r"^Hardware Port: (.+)$", block, re.M)
        dev = re.search(r"^Device: (\S+)$", block, re.M)
        if not port or not dev:
            continue
        kind = "other"
        for pattern, t in MAC_PORTS:
            if re.search(pattern, port.group(1), re.I):
                kind = t
                break
        out[dev.group(1)] = kind
    return out


def thunderbolt_generation(profile: dict[str, Any]) -> int:
    """From `system_profiler SPThunderboltDataType -json`: 5 when any port links at
    80 Gb/s or more (Thunderbolt 5), else 4 (or older)."""
    best = 0
    for bus in profile.get("SPThunderboltDataType", []):
        for key, val in bus.items():
            if key.startswith("receptacle") and isinstance(val, dict):
                m = re.search(r"(\d+) Gb/s", str(val.get("current_speed_key", "")))
                if m:
                    best = max(best, int(m.group(1)))
    return 5 if best >= 80 else 4


def macos_types() -> dict[str, str]:
    try:
        ports = subprocess.run(
            ["networksetup", "-listallhardwareports"], capture_output=True, text=True, timeout=5
        ).stdout
        types = parse_networksetup(ports)
        if "thunderbolt" in types.values():
            prof = subprocess.run(
                ["system_profiler", "SPThunderboltDataType", "-json"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            if thunderbolt_generation(json.loads(prof or "{}")) == 5:
                types = {k: "thunderbolt5" if v == "thunderbolt" else v for k, v in types.items()}
        return types
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def load_link_types(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{interface: type}}")
    bad = {k: v for k, v in data.items() if v not in TYPES}
    if bad:
        raise ValueError(f"{path}: unknown link types {bad}; use one of {', '.join(TYPES)}")
    present = psutil.net_if_stats()
    missing = sorted(k for k in data if k not in present)
    if missing:
        raise ValueError(
            f"{path}: no interface {', '.join(missing)} on this machine "
            f"(it has {', '.join(sorted(present))})"
        )
    return dict(data)


def interfaces(
    overrides: dict[str, str] | None = None, sysfs: Path = Path("/sys/class/net")
) -> list[Interface]:
    overrides = overrides or {}
    stats = psutil.net_if_stats()
    addrs = psutil.net_if_addrs()
    mac = macos_types() if platform.system() == "Darwin" else {}
    out = []
    for name, st in sorted(stats.items()):
        source = "detected"
        if name in overrides:
            kind, source = overrides[name], "file"
        elif (t := alias_type(_read(sysfs / name / "ifalias"))) is not None:
            kind, source = t, "alias"
        elif platform.system() == "Linux":
            kind = detect_linux(name, sysfs)
        else:
            kind = mac.get(name) or (
                "loopback"
                if name.startswith("lo")
                else "vpn"
                if name.startswith(VPN_PREFIXES)
                else "other"
            )
        ips, nets = [], []
        for a in addrs.get(name, []):
            if a.family.name not in ("AF_INET", "AF_INET6"):
                continue
            ips.append(a.address)
            if a.netmask:
                with contextlib.suppress(ValueError):
                    nets.append(
                        str(ipaddress.ip_interface(f"{a.address.split('%')[0]}/{a.netmask}"))
                    )
        out.append(Interface(name, kind, bool(st.isup), int(st.mtu), ips, source, nets))
    return out


class Usage:
    """Bytes per second each interface sends and receives, between two samples."""

    def __init__(self) -> None:
        self.last: tuple[float, dict[str, tuple[int, int]]] | None = None
        self.rates: dict[str, dict[str, float]] = {}

    def sample(self, now: float) -> dict[str, dict[str, float]]:
        counters = {
            n: (c.bytes_sent, c.bytes_recv) for n, c in psutil.net_io_counters(pernic=True).items()
        }
        if self.last is not None and now > self.last[0]:
            dt = now - self.last[0]
            self.rates = {
                n: {
                    "tx_Bps": max(0, s - self.last[1][n][0]) / dt,
                    "rx_Bps": max(0, r - self.last[1][n][1]) / dt,
                }
                for n, (s, r) in counters.items()
                if n in self.last[1]
            }
        self.last = (now, counters)
        return self.rates

"""Interface types and RDMA devices from what the OS shows."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from exo.nodes.machine.interfaces import (
    alias_type,
    detect_linux,
    interfaces,
    load_link_types,
    parse_networksetup,
    thunderbolt_generation,
)
from exo.nodes.machine.rdma import parse_ibv_devinfo

DATA = Path(__file__).parent / "data"


def fake_sysfs(
    root: Path,
    name: str,
    arphrd: int = 1,
    uevent: str = "",
    device: bool = False,
    driver: str | None = None,
    wireless: bool = False,
    tun: bool = False,
) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "type").write_text(f"{arphrd}\n")
    (d / "uevent").write_text(f"INTERFACE={name}\nIFINDEX=3\n{uevent}")
    if device or driver:
        (d / "device").mkdir()
        if driver:
            drv = root / "_drivers" / driver
            drv.mkdir(parents=True)
            (d / "device" / "driver").symlink_to(drv)
    if wireless:
        (d / "wireless").mkdir()
    if tun:
        (d / "tun_flags").write_text("0x1001\n")


def test_linux_types_from_a_sysfs_tree(tmp_path: Path) -> None:
    fake_sysfs(tmp_path, "lo", arphrd=772)
    fake_sysfs(tmp_path, "enp3s0", device=True, driver="igc")
    fake_sysfs(
        tmp_path, "wlp2s0", device=True, driver="iwlwifi", uevent="DEVTYPE=wlan\n", wireless=True
    )
    fake_sysfs(tmp_path, "thunderbolt0", driver="thunderbolt-net")
    fake_sysfs(tmp_path, "wg0", arphrd=65534, uevent="DEVTYPE=wireguard\n")
    fake_sysfs(tmp_path, "tun0", arphrd=65534, tun=True)
    fake_sysfs(tmp_path, "veth1")  # virtual: no device behind it
    fake_sysfs(tmp_path, "docker0", uevent="DEVTYPE=bridge\n")
    got = {
        n: detect_linux(n, tmp_path)
        for n in ("lo", "enp3s0", "wlp2s0", "thunderbolt0", "wg0", "tun0", "veth1", "docker0")
    }
    assert got == {
        "lo": "loopback",
        "enp3s0": "ethernet",
        "wlp2s0": "wifi",
        "thunderbolt0": "thunderbolt",
        "wg0": "vpn",
        "tun0": "vpn",
        "veth1": "other",
        "docker0": "other",
    }


def test_macos_ports_and_thunderbolt_generation() -> None:
    types = parse_networksetup((DATA / "networksetup-listallhardwareports.txt").read_text())
    assert types == {
        "en0": "ethernet",
        "en1": "wifi",
        "bridge0": "thunderbolt",
        "en2": "thunderbolt",
        "en3": "thunderbolt",
        "en7": "ethernet",
        "en8": "other",
    }
    assert (
        thunderbolt_generation(json.loads((DATA / "system_profiler-thunderbolt5.json").read_text()))
        == 5
    )
    assert (
        thunderbolt_generation(json.loads((DATA / "system_profiler-thunderbolt4.json").read_text()))
        == 4
    )


def test_aliases_and_link_type_files(tmp_path: Path) -> None:
    assert alias_type("linktype=wifi") == "wifi"
    assert alias_type("linktype=warp-drive") is None and alias_type("uplink to rack 3") is None
    f = tmp_path / "types.json"
    f.write_text(json.dumps({"lo": "thunderbolt5"}))
    assert load_link_types(f) == {"lo": "thunderbolt5"}
    f.write_text(json.dumps({"eth0": "fibre"}))
    with pytest.raises(ValueError, match="fibre"):
        load_link_types(f)
    f.write_text(json.dumps({"nosuch0": "wifi"}))
    with pytest.raises(ValueError, match="no interface nosuch0"):
        load_link_types(f)
    lo = {i.name: i for i in interfaces({"lo": "ethernet"})}["lo"]
    assert (lo.type, lo.source) == ("ethernet", "file")  # the file wins over detection


def test_rdma_from_ibv_devinfo() -> None:
    active = parse_ibv_devinfo((DATA / "ibv_devinfo-active.txt").read_text())
    assert [(d.name, d.transport, d.usable) for d in active] == [("mlx5_0", "InfiniBand", True)]
    assert (active[0].ports[0].link_layer, active[0].ports[0].active_mtu) == ("Ethernet", 1024)
    down = parse_ibv_devinfo((DATA / "ibv_devinfo-down.txt").read_text())
    assert down[0].ports[0].state == "PORT_DOWN" and not down[0].usable
    assert parse_ibv_devinfo((DATA / "ibv_devinfo-none.txt").read_text()) == []


@pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root to create a veth pair"
)
def test_an_alias_makes_a_real_veth_pose_as_wifi() -> None:
    a, b = f"exo{uuid.uuid4().hex[:6]}", f"exo{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    try:
        subprocess.run(["ip", "link", "set", "dev", a, "alias", "linktype=wifi"], check=True)
        found = {i.name: i for i in interfaces()}
        assert (found[a].type, found[a].source) == ("wifi", "alias")
        assert (found[b].type, found[b].source) == ("other", "detected")
    finally:
        subprocess.run(["ip", "link", "del", a], check=False)


def test_usage_sees_a_transfer_on_loopback() -> None:
    import socket
    import threading
    import time

    from exo.nodes.machine.interfaces import Usage

    u = Usage()
    t0 = time.monotonic()
    u.sample(t0)
    srv = socket.create_server(("127.0.0.1", 0))
    got = [0]

    def sink() -> None:
        conn, _ = srv.accept()
        while data := conn.recv(1 << 20):
            got[0] += len(data)
        conn.close()

    th = threading.Thread(target=sink)
    th.start()
    with socket.create_connection(srv.getsockname()) as c:
        c.sendall(b"x" * (64 << 20))
    th.join()
    srv.close()
    rates = u.sample(time.monotonic())
    elapsed = time.monotonic() - t0
    assert got[0] == 64 << 20
    assert rates["lo"]["tx_Bps"] * elapsed >= 64 << 20  # at least the bytes we sent went out on lo


def test_a_bad_link_types_file_stops_the_node_at_start_up(tmp_path: Path) -> None:
    import subprocess
    import sys

    f = tmp_path / "types.json"
    f.write_text(json.dumps({"nosuch0": "wifi"}))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo.nodes.main",
            "--broker",
            "tcp://127.0.0.1:1",
            "--link-types",
            str(f),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "no interface nosuch0" in out.stderr
    assert "Traceback" not in out.stderr

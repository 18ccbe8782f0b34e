"""The cluster's keys: made once, private, and a second machine joins with one token."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from exo.common import keys
from exo.tools.cluster import LocalCluster
from tests.helpers import wait_until


def test_keys_are_made_once_private_and_travel_in_one_token(tmp_path: Path) -> None:
    a = keys.Cluster.ensure(tmp_path / "broker")
    assert keys.Cluster.ensure(tmp_path / "broker") == a  # made once
    for role in keys.ROLES:
        path = tmp_path / "broker" / f"{role}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "broker").stat().st_mode) == 0o700
    joined = keys.Cluster.join(a.token(), tmp_path / "node")
    assert joined.broker.public == a.broker.public and joined.broker.secret is None
    assert joined.node == a.node and joined.frontend is None
    assert keys.Cluster.load(tmp_path / "node") == joined
    # the plain-TCP servers' tokens agree on both machines, and differ by purpose
    assert joined.secret("weights") == a.secret("weights") != a.secret("probe")
    for bad in ("exo1-", "exo1-bm90IGpzb24", "hello", a.token()[:-8]):
        with pytest.raises(ValueError):
            keys.Cluster.join(bad, tmp_path / "bad")
    with pytest.raises(keys.KeysMissing, match="--join"):
        keys.Cluster.load(tmp_path / "nowhere")


def test_a_second_machine_joins_with_the_token_keys_show_prints(
    models_dir: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "EXO_CLUSTER_DIR": str(tmp_path / "broker-keys")}
    with LocalCluster.on_free_ports(
        models_dir, log_dir=tmp_path / "logs", cluster_dir=tmp_path / "broker-keys"
    ) as c:
        shown = subprocess.run(
            [sys.executable, "-m", "exo.tools.main", "keys", "show"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        token = shown.split("--join", 1)[1].split()[0]
        # the second machine: its own ~/.exo/cluster, empty until it joins
        node_env = {**os.environ, "EXO_CLUSTER_DIR": str(tmp_path / "node-keys")}
        cmd = [
            sys.executable,
            "-m",
            "exo.nodes.main",
            "--broker",
            c.broker_addr,
            "--name",
            "joiner",
            "--models-dir",
            str(tmp_path / "empty"),
            "--log-file",
            str(tmp_path / "joiner.log"),
        ]
        without = subprocess.run(cmd, env=node_env, capture_output=True, text=True, timeout=60)
        assert without.returncode != 0 and "--join" in without.stderr
        joiner = subprocess.Popen([*cmd, "--join", token], env=node_env)
        try:
            wait_until(lambda: any(n["name"] == "joiner" for n in c.cluster_state()["nodes"]), 60)
        finally:
            joiner.terminate()
            joiner.wait(10)
        # and it keeps the keys: the next start needs no token
        assert keys.Cluster.load(tmp_path / "node-keys").node == c.keys().node

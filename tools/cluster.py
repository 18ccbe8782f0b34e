"""A whole cluster on this machine: a broker (with the API) and N node processes.

Used by `exo-tools up`, the benchmarks and the tests, so all three start the
cluster the same way a person would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import httpx

if TYPE_CHECKING:
    from exo.common.dealer import S
    from exo.common.keys import Cluster


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports. Each socket stays open until all are chosen: one
    closed at once can be handed out again by the next bind (seen in a test run:
    the broker's PUB socket and its HTTP server were given the same port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class LocalCluster:
    models_dir: Path
    nodes: int = 1
    api_port: int = 52415
    router_port: int = 52416
    pub_port: int = 52417
    log_dir: Path | None = None
    log_spec: str = "info"
    node_args: list[str] = field(default_factory=list)
    broker_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    node_env: dict[int, dict[str, str]] = field(default_factory=dict)  # per node, over `env`
    node_extra: dict[int, list[str]] = field(default_factory=dict)  # per node, after node_args
    # Several hosts on one machine (network namespaces): where the broker binds, and
    # per node a command prefix (`ip netns exec NS`) and the broker address it uses.
    broker_host: str = "127.0.0.1"
    broker_prefix: list[str] = field(default_factory=list)  # the broker in a namespace
    api_host: str = "127.0.0.1"
    node_prefix: dict[int, list[str]] = field(default_factory=dict)
    node_broker: dict[int, str] = field(default_factory=dict)
    broker: subprocess.Popen[bytes] | None = None
    node_procs: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    # The cluster's CURVE keys: made here before any process starts (so no node
    # races the broker's first start), in `cluster_dir` (None: the user's
    # ~/.exo/cluster, as `exo-tools up` wants). insecure: no keys at all.
    insecure: bool = False
    cluster_dir: Path | None = None
    # the processes end with this one, however it ends (common/parent.py); only
    # for a cluster started from the main thread
    tied: bool = False
    # the broker's journal of explicit instances (--state-dir): kept across its
    # restarts, apart from every other cluster's (None: under log_dir, or a temp dir)
    state_dir: Path | None = None

    @classmethod
    def on_free_ports(cls, models_dir: Path, **kw: Any) -> LocalCluster:
        api, router, pub = free_ports(3)
        return cls(models_dir, api_port=api, router_port=router, pub_port=pub, **kw)

    @property
    def url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def broker_addr(self) -> str:
        return f"tcp://127.0.0.1:{self.router_port}"

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        env.pop("EXO_LOG", None)
        if self.cluster_dir is not None:
            env["EXO_CLUSTER_DIR"] = str(self.cluster_dir)
        if self.tied:
            env["EXO_PARENT_PID"] = str(os.getpid())
        return env

    def keys(self) -> Cluster | None:
        """The cluster's keys, or None when insecure."""
        from exo.common import keys

        return None if self.insecure else keys.Cluster.ensure(self.cluster_dir)

    def as_member(self, sock: S, role: str = "node", peer: bool = False) -> S:
        """Give a socket the keys of a `role` ("node" or "frontend") before it
        connects: to the broker, or with `peer` to a node's peer port. Tests that
        play a buggy member of the cluster use it; strangers do not."""
        from exo.common import keys

        cluster = self.keys()
        if cluster is not None:
            me = cluster.node if role == "node" else cluster.frontend
            assert me is not None, f"this machine holds no {role} key"
            keys.connect_as(sock, me, cluster.node if peer else cluster.broker)
        return sock

    def _log(self, name: str) -> list[str]:
        if self.log_dir is None:
            return []
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return ["--log-file", str(self.log_dir / f"{name}.log")]

    def _out(self, name: str) -> BinaryIO | None:
        if self.log_dir is None:
            return None
        return (self.log_dir / f"{name}.out").open("ab")

    def start_broker(self) -> None:
        self.keys()  # made before any process looks for them
        if self.state_dir is None:
            self.state_dir = (
                self.log_dir / "broker-state"
                if self.log_dir is not None
                else Path(tempfile.mkdtemp(prefix="exo-broker-"))
            )
        cmd = [
            *self.broker_prefix,
            sys.executable,
            "-m",
            "exo.broker.main",
            "--host",
            self.broker_host,
            "--api-host",
            self.api_host,
            "--port",
            str(self.router_port),
            "--pub-port",
            str(self.pub_port),
            "--api-port",
            str(self.api_port),
            "--log",
            self.log_spec,
            *self._log("broker"),
            "--state-dir",
            str(self.state_dir),
            *(["--insecure"] if self.insecure else []),
            *self.broker_args,
        ]
        out = self._out("broker")
        self.broker = subprocess.Popen(
            cmd, env=self._env(), stdout=out, stderr=subprocess.STDOUT if out else None
        )

    def start_node(self, i: int) -> None:
        cmd = [
            *self.node_prefix.get(i, []),
            sys.executable,
            "-m",
            "exo.nodes.main",
            # "" in node_broker: none given, the node finds the broker (discovery.py)
            *(["--broker", b] if (b := self.node_broker.get(i, self.broker_addr)) else []),
            "--name",
            f"node{i}",
            "--models-dir",
            str(self.models_dir),
            "--log",
            self.log_spec,
            *self._log(f"node{i}"),
            *(["--insecure"] if self.insecure else []),
            *self.node_args,
            *self.node_extra.get(i, []),
        ]
        out = self._out(f"node{i}")
        env = {**self._env(), **self.node_env.get(i, {})}
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        while len(self.node_procs) <= i:
            self.node_procs.append(None)
        self.node_procs[i] = p

    def start(self, timeout: float = 60.0) -> LocalCluster:
        self.start_broker()
        for i in range(self.nodes):
            self.start_node(i)
        self.wait_nodes(self.nodes, timeout)
        return self

    def api_headers(self) -> dict[str, str]:
        """What this cluster's own calls to its API send: the first API key its broker
        was given (--api-key or EXO_API_KEY), if any."""
        args = self.broker_args
        given = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--api-key"]
        return {"Authorization": f"Bearer {given[0]}"} if given else api_headers()

    def cluster_state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/v1/cluster", headers=self.api_headers(), timeout=5).json()

    def wait_nodes(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.broker is not None and self.broker.poll() is not None:
                raise RuntimeError(f"the broker exited with code {self.broker.returncode}")
            try:
                if len(self.cluster_state()["nodes"]) >= n:
                    return
            except (httpx.HTTPError, KeyError, ValueError) as e:
                last = e
            time.sleep(0.2)
        raise TimeoutError(f"{n} nodes did not register within {timeout}s ({last})")

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        p = self.node_procs[i]
        if p is not None:
            p.send_signal(sig)
            p.wait(10)
            self.node_procs[i] = None

    def stop(self) -> None:
        procs = [p for p in [*self.node_procs, self.broker] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.node_procs, self.broker = [], None

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()  # (no __exit__ for a with that did not start)
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def api_headers() -> dict[str, str]:
    """The tools' own calls to an API that takes keys: the first of EXO_API_KEY."""
    from exo.api.security import keys_from_env

    found = keys_from_env()
    return {"Authorization": f"Bearer {found[0]}"} if found else {}


class InstanceFailed(RuntimeError):
    pass


def wait_ready(url: str, iid: str, timeout: float = 600.0) -> dict[str, Any]:
    """Wait until instance `iid` on the API at `url` is ready; InstanceFailed if it
    fails or is not ready within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for inst in httpx.get(f"{url}/v1/instances", headers=api_headers(), timeout=10).json()[
            "data"
        ]:
            if inst["id"] == iid and inst["state"] == "ready":
                return dict(inst)
            if inst["id"] == iid and inst["state"] == "failed":
                raise InstanceFailed(f"instance {iid} failed: {inst['error']}")
        time.sleep(0.25)
    raise InstanceFailed(f"instance {iid} not ready after {timeout:.0f}s")

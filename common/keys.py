"""The cluster's keys: who may speak on its sockets (ZeroMQ CURVE, Ironhouse style).

A cluster is three CURVE keypairs, made by the broker's first start in
`~/.exo/cluster/` (`EXO_HOME`, or `EXO_CLUSTER_DIR`), each file 0600:

- `broker`: the broker's ROUTER and PUB serve with it; every member knows its
  public half.
- `node`: what every node connects with, and what its peer ROUTER serves with
  (nodes talk to each other as members of one cluster). Its secret also keys the
  weights and probe servers (a token derived from it).
- `frontend`: what an API frontend, and the operator's tools, connect with.

A peer's role is its key: the broker takes HELLO as a node only over a connection
whose CURVE key is the node key, as a frontend only over the frontend key, and
nothing else connects at all. A second machine joins with one step: `exo-tools
keys show` prints a join token (the broker's public key and the node keypair),
`exo-node --join TOKEN` stores it. `--insecure` runs without any of it (a closed
lab), and says so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from exo.common.paths import exo_home, write_private

log = logging.getLogger(__name__)

ROLES = ("broker", "node", "frontend")


class KeysMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Pair:
    public: str  # z85, 40 characters
    secret: str | None = None  # None: only the public half is known here

    @classmethod
    def new(cls) -> Pair:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))


def cluster_dir() -> Path:
    if env := os.environ.get("EXO_CLUSTER_DIR"):
        return Path(env).expanduser()
    return exo_home() / "cluster"


def _write(path: Path, pair: Pair) -> None:
    write_private(path, json.dumps({"public": pair.public, "secret": pair.secret}).encode())


def _read(path: Path) -> Pair | None:
    try:
        d = json.loads(path.read_text())
        return Pair(str(d["public"]), d.get("secret"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Cluster:
    broker: Pair
    node: Pair
    frontend: Pair | None  # absent on a machine that only joined as a node

    @classmethod
    def load(cls, folder: Path | None = None) -> Cluster:
        folder = folder or cluster_dir()
        broker, node = _read(folder / "broker.json"), _read(folder / "node.json")
        if broker is None or node is None or node.secret is None:
            raise KeysMissing(
                f"no cluster keys in {folder}: start exo-broker here first, or join "
                "with `exo-node --join TOKEN` (`exo-tools keys show` on the broker's "
                "machine prints it), or run with --insecure"
            )
        return cls(broker, node, _read(folder / "frontend.json"))

    @classmethod
    def ensure(cls, folder: Path | None = None) -> Cluster:
        """The broker's machine: the cluster's keys, made on first start."""
        folder = folder or cluster_dir()
        try:
            return cls.load(folder)
        except KeysMissing:
            pass
        made = cls(Pair.new(), Pair.new(), Pair.new())
        for role in ROLES:
            _write(folder / f"{role}.json", getattr(made, role))
        log.info("made the cluster's keys in %s", folder)
        return made

    def token(self) -> str:
        """The join token: the broker's public key and the node keypair."""
        raw = json.dumps({"b": self.broker.public, "np": self.node.public, "ns": self.node.secret})
        return "exo1-" + base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @staticmethod
    def join(token: str, folder: Path | None = None) -> Cluster:
        """Store a join token's keys on this machine (a node)."""
        folder = folder or cluster_dir()
        if not token.startswith("exo1-"):
            raise ValueError("not an exo join token (it starts with exo1-)")
        body = token[5:]
        try:
            d = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            broker, node = Pair(d["b"]), Pair(d["np"], d["ns"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"a damaged join token: {e}") from None
        for p in (broker.public, node.public, node.secret or ""):
            if len(p) != 40:
                raise ValueError("a damaged join token: a key is not 40 characters")
        _write(folder / "broker.json", Pair(broker.public))
        _write(folder / "node.json", node)
        return Cluster(broker, node, None)

    def secret(self, purpose: str) -> str:
        """A token for the cluster's plain-TCP servers (weights, probes): only
        holders of the node key can derive it."""
        assert self.node.secret is not None
        return hmac.new(self.node.secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def serve(sock: zmq.Socket[Any], pair: Pair, domain: str) -> None:
    """Make `sock` a CURVE server with `pair`, checked by the ZAP `domain`."""
    assert pair.secret is not None
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode())
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())


def connect_as(sock: zmq.Socket[Any], me: Pair, server: Pair) -> None:
    """Make `sock` a CURVE client: `me`, talking to the server whose key is `server`."""
    assert me.secret is not None
    sock.setsockopt(zmq.CURVE_SERVERKEY, server.public.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, me.public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, me.secret.encode())


class Allowed:
    """pyzmq's ZAP credentials provider: per domain, the public keys let in."""

    def __init__(self, by_domain: dict[str, set[str]]) -> None:
        self.by_domain = by_domain

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key.decode("ascii") in self.by_domain.get(domain, set())
        if not ok:
            log.warning("refused a connection to %s: unknown key", domain)
        return ok


def authenticator(ctx: zmq.Context[Any], by_domain: dict[str, set[str]]) -> ThreadAuthenticator:
    """Start the context's ZAP handler (before any server socket binds)."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    provider = Allowed(by_domain)
    for domain in by_domain:
        auth.configure_curve_callback(domain, credentials_provider=provider)
    return auth

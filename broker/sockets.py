"""The broker's two sockets, bound with the options they need: the ROUTER every
peer talks to, and the PUB for cluster state and cancels."""

from __future__ import annotations

import zmq

from exo.broker import protocol as P
from exo.common import keys

DOMAIN = "exo-broker"  # the ZAP domain of the broker's sockets


def router(
    ctx: zmq.Context[zmq.Socket[bytes]], addr: str, cluster: keys.Cluster | None
) -> zmq.Socket[bytes]:
    """The ROUTER every peer talks to."""
    sock = ctx.socket(zmq.ROUTER)
    if cluster is not None:
        keys.serve(sock, cluster.broker, DOMAIN)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(P.HEARTBEAT_S * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(P.EXPIRY_S * 1000))
    # A hard ceiling: larger frames cost a reconnect; ones under it but over
    # MAX_FRAME are dropped and counted by decode().
    sock.setsockopt(zmq.MAXMSGSIZE, 4 * P.MAX_FRAME)
    sock.bind(addr)
    return sock


def publisher(
    ctx: zmq.Context[zmq.Socket[bytes]], addr: str, cluster: keys.Cluster | None
) -> zmq.Socket[bytes]:
    """The PUB: what it drops under load (SNDHWM) also travels point to point."""
    sock = ctx.socket(zmq.PUB)
    if cluster is not None:
        keys.serve(sock, cluster.broker, DOMAIN)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(addr)
    return sock

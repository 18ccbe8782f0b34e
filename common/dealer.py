"""A DEALER to the broker, as the node and the API frontend both hold one: its
socket options (heartbeats, high-water marks, reconnects, the frame cap) and its
routing identity."""

from __future__ import annotations

import secrets

import zmq

from exo.broker import protocol as P


def routing_id(peer_id: str) -> bytes:
    """A DEALER's routing identity at the broker: its public peer id and a secret.
    The broker's ROUTER hands a connection over to a peer that claims an identity
    it knows (so a reconnecting peer keeps its place); with a secret part no one
    else can claim it, though the peer id is published."""
    return f"{peer_id}.{secrets.token_hex(16)}".encode()


def configure_dealer(sock: zmq.Socket, identity: bytes) -> None:
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10000)
    sock.setsockopt(zmq.RCVHWM, 10000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(P.HEARTBEAT_S * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(P.EXPIRY_S * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    sock.setsockopt(zmq.MAXMSGSIZE, 4 * P.MAX_FRAME)

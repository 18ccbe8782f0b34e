"""The node's peer sockets: hidden states and tokens between pipeline stages,
node to node, never through the broker.

One ROUTER bound on the node's peer port receives; one DEALER per peer endpoint
sends. A message is a protocol header frame and, for ACT, the hidden states as
raw float32 bytes, sent from the array's own buffer (no copy on the way out).
Bytes are counted per endpoint for the link view.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import numpy as np
import zmq

from exo.broker import protocol as P
from exo.common import keys
from exo.nodes.engine.mlxenv import mx

log = logging.getLogger(__name__)

# The largest hidden states a step carries: rows (decodes and prompt chunks, at
# most a prefill budget of pacing.MAX_CHUNK plus the batch) x width x 4 bytes.
# 2,304 rows of a 16,384-wide model (the largest open models) is 151 MB.
MAX_ACT = 160 * 1024 * 1024
DOMAIN = "exo-peers"  # the ZAP domain of the peer ROUTER


class PeerSockets:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        peer_id: str,
        host: str = "0.0.0.0",
        port: int = 0,
        cluster: keys.Cluster | None = None,
    ) -> None:
        self.ctx, self.peer_id = ctx, peer_id
        # Stage traffic is the cluster's nodes' only: every node serves with the node
        # key and connects with a key of its own (`key`, made at start, told to the
        # broker in its INFO), so a stage knows which node each step or token came
        # from and takes them only from its instance's (Hosting: senders). The
        # ROUTER lets in the node key (members) and those senders' keys.
        self.cluster = cluster
        self.key = keys.Pair.new() if cluster is not None else None
        self.allowed: set[str] = {cluster.node.public} if cluster is not None else set()
        self.router = ctx.socket(zmq.ROUTER)
        if cluster is not None:  # (the ZAP handler must run before the ROUTER binds)
            self.auth = keys.authenticator(ctx, {DOMAIN: self.allowed})
            keys.serve(self.router, cluster.node, DOMAIN)
        self.router.setsockopt(zmq.LINGER, 0)
        # Steps go one at a time per instance: a few frames in flight is all a
        # stage ever has. A larger frame than MAX_ACT is no step (and costs its
        # sender the connection).
        self.router.setsockopt(zmq.RCVHWM, 64)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_ACT)
        if port:
            self.router.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self.router.bind_to_random_port(f"tcp://{host}")
        self.dealers: dict[str, zmq.Socket[bytes]] = {}
        self.sent: Counter[str] = Counter()  # bytes per endpoint
        self.received = 0
        self.received_from: Counter[str] = Counter()  # bytes per peer address
        self._last: tuple[float, dict[str, tuple[int, int]]] | None = None
        self.rates: dict[str, dict[str, float]] = {}
        self.dropped = P.Counters()

    def _dealer(self, endpoint: str) -> zmq.Socket[bytes]:
        sock = self.dealers.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            # No fixed identity: a ROUTER drops a second connection that claims an
            # identity it already has, and a new route to the same peer (a better link)
            # is exactly that. Replies never go back through the ROUTER anyway.
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1000)
            if self.cluster is not None and self.key is not None:
                keys.connect_as(sock, self.key, self.cluster.node)
            sock.connect(endpoint)
            self.dealers[endpoint] = sock
        return sock

    def send(self, endpoint: str, msg: P.Msg, tensor: mx.array | None = None) -> None:
        frames: list[bytes | memoryview] = [P.encode(msg)]
        if tensor is not None:  # (mlx's stubs leave out the buffer protocol it has)
            frames.append(memoryview(tensor))  # type: ignore[arg-type]
        try:
            self._dealer(endpoint).send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped["peer_not_reading"] += 1
            log.warning("peer %s is not reading; %s dropped", endpoint, msg.type)
            return
        self.sent[endpoint] += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)

    def allow(self, senders: set[str]) -> None:
        """The keys of the nodes that may connect (besides the node key): the senders
        of the stages held here."""
        if self.cluster is not None:
            # In place, never emptied: the ZAP thread reads this set while we change it.
            self.allowed.intersection_update({self.cluster.node.public} | senders)
            self.allowed.update(senders)

    def recv(self) -> tuple[P.Msg, mx.array | None, str | None] | None:
        """One message, its tensor and its sender's key (None: an insecure
        cluster), or None for a frame that had to be dropped."""
        parts = self.router.recv_multipart(copy=False)
        sender = None
        if self.cluster is not None:
            with contextlib.suppress(zmq.ZMQError):
                sender = str(parts[-1].get("User-Id"))
        size = sum(len(p.buffer) for p in parts[1:])
        self.received += size
        with contextlib.suppress(zmq.ZMQError):
            self.received_from[str(parts[-1].get("Peer-Address"))] += size
        try:
            msg = P.decode(parts[1].buffer, max_frame=P.MAX_FRAME) if len(parts) >= 2 else None
        except P.ProtocolError as e:
            self.dropped[e.reason] += 1
            return None
        if msg is None or len(parts) > 3:
            self.dropped["bad_framing"] += 1
            return None
        if not isinstance(msg, P.Act):
            return msg, None, sender
        shape = msg.shape
        buf = parts[2].buffer if len(parts) == 3 else b""
        if len(shape) != 2 or min(shape) < 0 or len(buf) != 4 * shape[0] * shape[1]:
            self.dropped["bad_tensor"] += 1
            return None
        return msg, mx.array(np.frombuffer(buf, dtype=np.float32).reshape(shape)), sender

    def sample(self, now: float) -> dict[str, dict[str, float]]:
        """Bytes per second to and from each peer address since the last sample."""
        counts: dict[str, list[int]] = {}
        for endpoint, n in self.sent.items():
            host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
            counts.setdefault(host, [0, 0])[0] += n
        for host, n in self.received_from.items():
            counts.setdefault(host, [0, 0])[1] += n
        now_counts = {h: (c[0], c[1]) for h, c in counts.items()}
        if self._last is not None and now > self._last[0]:
            dt, before = now - self._last[0], self._last[1]
            self.rates = {
                h: {
                    "tx_Bps": (tx - before.get(h, (0, 0))[0]) / dt,
                    "rx_Bps": (rx - before.get(h, (0, 0))[1]) / dt,
                }
                for h, (tx, rx) in now_counts.items()
            }
        self._last = (now, now_counts)
        return self.rates

    def close(self) -> None:
        for s in self.dealers.values():
            s.close(linger=0)
        self.router.close(linger=0)
        if self.cluster is not None:
            self.auth.stop()

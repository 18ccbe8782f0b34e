"""`exo-tools bench curve`: what CURVE adds to a pipeline hop, measured on the hop.

End to end, CURVE's cost on decode hides in this machine's noise (~10% between
runs; BENCHMARKS.md). Here the hop alone: a DEALER and a ROUTER on loopback, set
up as two stages' peer sockets are (nodes/pipeline/peers.py: the node key
serving, a node's own key connecting, the ZAP handler checking it), pass a frame
the size a step carries and answer with a small one, many times, with CURVE and
without, alternated. The extra time per round trip against a decode step's time
bounds what CURVE can cost decode.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import zmq

from exo.common import keys

DOMAIN = "bench-curve"


def round_trips(secure: bool, size: int, n: int) -> float:
    """Seconds per round trip of a `size`-byte frame and a 64-byte answer."""
    ctx = zmq.Context()
    auth = None
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        if secure:
            server, client = keys.Pair.new(), keys.Pair.new()
            auth = keys.authenticator(ctx, {DOMAIN: {client.public}})
            keys.serve(router, server, DOMAIN)
            keys.connect_as(dealer, client, server)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        frame, answer = bytes(size), bytes(64)

        def once() -> None:
            dealer.send(frame, copy=False)
            ident, _ = router.recv_multipart(copy=False)
            router.send_multipart([ident, answer])
            dealer.recv()

        for _ in range(50):  # the handshake, and warm caches
            once()
        t0 = time.perf_counter()
        for _ in range(n):
            once()
        return (time.perf_counter() - t0) / n
    finally:
        for s in (router, dealer):
            s.close(linger=0)
        if auth is not None:
            auth.stop()
        ctx.term()


def run(sizes: list[int], n: int, pairs: int, step_ms: float) -> list[dict[str, Any]]:
    """Per frame size: the median round trip without and with CURVE over
    alternated pairs, and decode's bound at a `step_ms` step (one hop out and
    its answer back per step and stage boundary)."""
    out = []
    for size in sizes:
        plain, curve = [], []
        for _ in range(pairs):
            plain.append(round_trips(False, size, n))
            curve.append(round_trips(True, size, n))
        p, c = statistics.median(plain), statistics.median(curve)
        extra_ms = max(0.0, (c - p) * 1000)
        out.append(
            {
                "bytes": size,
                "plain_us": p * 1e6,
                "curve_us": c * 1e6,
                "extra_us": extra_ms * 1000,
                "spread": (max(curve) - min(curve)) / c if c else 0.0,
                "decode_ratio": step_ms / (step_ms + extra_ms),
            }
        )
    return out

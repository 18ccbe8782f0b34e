"""Link probes: round-trip time and bandwidth between two nodes' addresses.

Each node listens on a probe port (its INFO's `probe_port`). A probe is one TCP
connection from a local address to a peer's address, so it crosses the link
that joins those two addresses, on a raw socket: no ZeroMQ in the figures.

- RTT: PINGS one-byte ping-pongs on the idle connection; the smallest counts
  (queueing only ever adds).
- Bandwidth: the prober streams for max(MIN_BULK_S, 25 RTT), then closes its
  side; the peer times from the first byte it received to the last and
  answers with the bytes and seconds it saw. Timing at the receiver matters:
  a sender's clock includes the bytes still in its socket buffer and reads up
  to 2x high on short transfers.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import struct
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

PING, BULK = b"P", b"B"
PINGS = 10
# A probe at a node's start-up, while the machine is busy loading models, read a
# 100 Mbit/s link 12% above iperf3 over 0.25 s (1-2% otherwise): a burst the
# shaper let through, or a late first read, weighs half as much over twice the time.
MIN_BULK_S = 0.5
CHUNK = 256 * 1024
REPLY = struct.Struct(">Qd")  # bytes received after the first read, seconds between first and last


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = conn.recv(n - len(buf))
        if not got:
            raise ConnectionError("peer closed")
        buf += got
    return buf


MAX_PROBES = 4  # connections served at once
IDLE_S = 10.0  # a probe connection silent this long is closed


class ProbeServer(threading.Thread):
    """Answers other nodes' probes; counts the CPU time it spends doing so."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0, token: str | None = None) -> None:
        super().__init__(name="probe-server", daemon=True)
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.port = int(self.sock.getsockname()[1])
        self.cpu_s = 0.0
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_PROBES)
        # A prober first sends this (the cluster's probe token); None: anyone may probe.
        self.token = token.encode() if token else None
        self.refused = 0

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            # Probes come one at a time (the broker runs one in the cluster): a few
            # at once is plenty, and more are closed rather than given a thread.
            if not self.slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        t0 = time.thread_time()
        try:
            with conn, contextlib.suppress(OSError, ConnectionError):
                conn.settimeout(IDLE_S)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.token is not None and not hmac.compare_digest(
                    _recv_exact(conn, len(self.token)), self.token
                ):
                    self.refused += 1
                    return
                while (op := conn.recv(1)) == PING:
                    conn.sendall(PING)
                if op == BULK:
                    conn.sendall(REPLY.pack(*self.receive(conn)))
        finally:
            self.slots.release()
            with self.lock:
                self.cpu_s += time.thread_time() - t0

    @staticmethod
    def receive(conn: socket.socket) -> tuple[int, float]:
        buf = bytearray(CHUNK)
        first = last = 0.0
        counted = 0
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            now = time.perf_counter()
            if not first:
                first = now  # bytes of the first read arrived before the clock started
            else:
                counted += n
            last = now
        return counted, last - first

    def close(self) -> None:
        self.sock.close()


def probe(
    src: str, dst: str, port: int, timeout: float = 5.0, token: str | None = None
) -> dict[str, Any]:
    """Measure the link from local address `src` to the peer's `dst` (whose probe
    server wants `token` first, in a secure cluster)."""
    t_cpu = time.thread_time()
    started = time.time()
    with socket.create_connection((dst, port), timeout, source_address=(src, 0)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if token:
            s.sendall(token.encode())
        rtts = []
        for _ in range(PINGS):
            t0 = time.perf_counter()
            s.sendall(PING)
            _recv_exact(s, 1)
            rtts.append(time.perf_counter() - t0)
        rtt = min(rtts)
        bulk_s = max(MIN_BULK_S, 25 * rtt)
        s.sendall(BULK)
        payload = memoryview(bytes(CHUNK))
        end = time.perf_counter() + bulk_s
        sent = 0
        while time.perf_counter() < end:
            s.sendall(payload)
            sent += CHUNK
        s.shutdown(socket.SHUT_WR)
        s.settimeout(timeout + bulk_s * 10)
        counted, seconds = REPLY.unpack(_recv_exact(s, REPLY.size))
    return {
        "rtt_s": rtt,
        "bandwidth_Bps": counted / seconds if seconds > 0 else None,
        "bytes": sent,
        "duration_s": time.time() - started,
        "cpu_s": time.thread_time() - t_cpu,
        "at": started,
    }


class Probes:
    """The probes the broker asks this node to run: one at a time, in the
    background; the last result per link key (a failure marks the link, nothing
    more)."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.results: dict[str, dict[str, Any]] = {}
        self.cpu_s = 0.0  # spent measuring, for the probes' own cost
        self.running: threading.Thread | None = None

    def start(self, key: str, src: str, dst: str, port: int) -> None:
        if self.running is not None and self.running.is_alive():
            return

        def run() -> None:
            try:
                result = probe(src, dst, port, token=self.token)
                self.cpu_s += result["cpu_s"]
            except OSError as e:
                result = {"error": f"{type(e).__name__}: {e}", "at": time.time()}
                log.info("probe %s failed: %s", key, result["error"])
            self.results[key] = result

        self.running = threading.Thread(target=run, name="probe", daemon=True)
        self.running.start()

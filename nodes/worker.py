"""exo-node's main loop: requests from the broker in, engine steps, tokens out."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import zmq

from exo.broker import protocol as P
from exo.common import keys
from exo.nodes.engine.engine import Engine
from exo.nodes.engine.mlxenv import blas, mx
from exo.nodes.engine.model import model_meta
from exo.nodes.engine.request import EngineError, Output
from exo.nodes.link import BrokerLink
from exo.nodes.machine import info as node_info
from exo.nodes.machine import memory
from exo.nodes.machine.interfaces import Usage, interfaces
from exo.nodes.machine.pressure import read_pressure
from exo.nodes.machine.prober import Probes, ProbeServer
from exo.nodes.machine.rdma import rdma_devices
from exo.nodes.pipeline.hosting import Hosting
from exo.nodes.pipeline.peers import PeerSockets
from exo.nodes.store.download import Downloader, Downloads
from exo.nodes.store.store import ModelStore
from exo.nodes.store.weights import WeightsServer

log = logging.getLogger(__name__)

PROGRESS_S = 1.0
FAILING_STEPS = 3
SHRINK_S = 5.0  # how often memory pressure may shrink the prefix cache


class Node:
    def __init__(
        self,
        broker: str,
        name: str,
        models_dir: Path,
        engine: Engine | None = None,
        extra_dirs: list[Path] | None = None,
        downloader: Downloader | None = None,
        link_types: dict[str, str] | None = None,
        peer_port: int = 0,
        probe_port: int = 0,
        stage_timeout: float = 30.0,
        weights_port: int | None = 0,
        cluster: keys.Cluster | None = None,
    ) -> None:
        self.cluster = cluster  # None: an insecure cluster
        self.stage_timeout = stage_timeout
        self.link_types = link_types or {}
        self.rdma = [d.public() for d in rdma_devices()]
        self.name = name
        self.peer_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.store = ModelStore(models_dir, extra_dirs)
        self.engine = engine or Engine()
        # (pyzmq types the shared instance as making no sockets at all)
        self.ctx = cast("zmq.Context[zmq.Socket[bytes]]", zmq.Context.instance())
        self.pair_addr = f"inproc://engine-{self.peer_id}"
        self.pair = self.ctx.socket(zmq.PAIR)
        self.pair.bind(self.pair_addr)
        self.peers = PeerSockets(self.ctx, self.peer_id, port=peer_port, cluster=cluster)
        self._servers(cluster, probe_port, weights_port)
        self.interfaces_up: dict[str, bool] = {}
        self.hosting = Hosting(
            name, self.engine, self.peers, self.store,
            lambda msg: self.send(msg),  # (as the node's, whoever replaces it)
            self.emit, stage_timeout, self.stages_changed,
        )  # fmt: skip
        self.limits = memory.limits([], self.engine.kv_budget, 1)
        self._status: dict[str, Any] = self.engine.status()
        self._reset = threading.Event()
        self._reset_at = 0.0  # (perf_counter) when the broker last forgot this node
        self.link = BrokerLink(
            self.ctx, broker, self.peer_id, name, self.pair_addr, info=self.info,
            status=lambda: self._status, on_reset=self.forgotten, cluster=cluster,
        )  # fmt: skip
        self.stopping = threading.Event()
        # A download that ends: the next INFO lists what arrived.
        self.downloads = Downloads(
            self.store, downloader or Downloader(), self.weights_token, self.link.info_now.set
        )
        self.progress_sent: dict[str, float] = {}
        self.seq: dict[str, int] = {}  # rid -> the TOKENS sent for it (protocol.Tokens.seq)
        self.last_step_s = 0.0
        # the memory pressure INFO last read (on the link's thread), acted on here
        self.pressure = "normal"
        self.next_shrink = 0.0
        self.usage = Usage()
        self.usage_at = 0.0
        # (rid, wall-clock time the engine dropped it), for `bench cancel` and tests
        self.recent_cancels: deque[tuple[str, float, float]] = deque(maxlen=64)
        self.errors: Counter[str] = Counter()  # handler and step failures, by kind

    def _servers(
        self, cluster: keys.Cluster | None, probe_port: int, weights_port: int | None
    ) -> None:
        """The plain-TCP servers (link probes, weights for peers) and their tokens,
        derived from the node key (None: insecure)."""
        self.weights_token = cluster.secret("weights") if cluster else None
        self.probe_token = cluster.secret("probe") if cluster else None
        self.prober = ProbeServer(port=probe_port, token=self.probe_token)
        # None: this node does not serve its models to others
        self.weights = (
            None
            if weights_port is None
            else WeightsServer(self.store, port=weights_port, token=self.weights_token)
        )
        self.probes = Probes(self.probe_token)  # the ones the broker asks this node to run

    def info(self) -> dict[str, Any]:
        models = self.store.scan()  # walks every model folder: once per INFO
        d = node_info.gather(sorted(models), blas, self.store.models_dir)
        d["interfaces"] = [i.public() for i in interfaces(self.link_types)]
        d["rdma"] = self.rdma
        d["loading"] = self.hosting.loading
        d["peer_port"] = self.peers.port
        d["peer_key"] = self.peers.key.public if self.peers.key else None
        d["probe_port"] = self.prober.port
        d["weights_port"] = self.weights.port if self.weights else None
        d["memory_pressure"] = read_pressure()
        self.pressure = str(d["memory_pressure"]["level"])
        d["model_meta"] = {m: model_meta(p) for m, p in models.items()}
        return d

    def forgotten(self) -> None:
        """The broker forgot this node (on the link's thread, before it registers
        again): the requests it held are nobody's now."""
        self._reset_at = time.perf_counter()
        self._reset.set()

    def send(self, msg: P.Msg) -> None:
        self.pair.send(P.encode(msg))

    def run(self) -> int:
        log.info(
            "node %s starting (models in %s, BLAS: %s)", self.peer_id, self.store.models_dir, blas
        )
        self.link.start()
        self.prober.start()
        if self.weights:
            self.weights.start()
        was_busy = False
        poller = zmq.Poller()
        poller.register(self.pair, zmq.POLLIN)
        poller.register(self.peers.router, zmq.POLLIN)
        if self.engine.lane is not None:
            poller.register(self.engine.lane.wakeup, zmq.POLLIN)  # a prompt prefilled
        while not self.stopping.is_set() and self.link.is_alive():
            if self._reset.is_set():
                # The broker forgot us (it restarted or expired us): no one waits for our
                # requests (their frontends submit again those that had no token). The
                # stages stay loaded: the broker adopts them from our status, or tells
                # us to unload them.
                self._reset.clear()
                self.engine.cancel_before(self._reset_at)
            busy = bool(self.engine.requests)
            if was_busy and not busy:
                # Give back the buffers MLX cached while serving (requests of every
                # size leave many behind); the weights stay.
                mx.clear_cache()
            was_busy = busy
            # Sleep when nothing can step: idle, every step out at later stages, or
            # every prompt in the prefill lane (its wakeup wakes us when one lands).
            events = dict(poller.poll(0 if self.engine.runnable() else 100))
            if self.pair in events:
                while self.pair.poll(0):
                    self.guarded("broker message", self.on_broker, self.pair.recv())
            if self.peers.router in events:
                while self.peers.router.poll(0):
                    self.guarded("peer message", self.hosting.on_peer)
            self.tick()
            self.guarded("stage check", self.hosting.check_stalled)
            self.report_progress()
            self._status = self.status()
        self.link.stop_event.set()
        self.link.join(timeout=2)
        self.engine.close()
        self.peers.close()
        self.prober.close()
        if self.weights:
            self.weights.close()
        return 2 if self.link.refused else 0

    def guarded(self, what: str, fn: Callable[..., object], *args: object) -> None:
        """Run a handler; what it raises is logged and counted, never the node's end."""
        try:
            fn(*args)
        except Exception:
            self.errors[what] += 1
            log.exception("%s failed; dropped", what)

    def on_broker(self, frame: bytes) -> None:
        try:
            msg = P.decode(frame)
        except P.ProtocolError as e:
            self.errors[f"broker_{e.reason}"] += 1
            return
        self.handle(msg)

    def tick(self) -> None:
        """A step of the engine and what it owes: tokens out, errors out, models that
        keep failing unloaded."""
        t0 = time.perf_counter()
        outputs = self.step()
        self.last_step_s = time.perf_counter() - t0
        if outputs and log.isEnabledFor(logging.DEBUG):
            ms = self.last_step_s * 1000
            log.debug("step %d: %d outputs in %.1f ms", self.engine.steps, len(outputs), ms)
        self.emit(outputs)
        for rid, code, why in self.engine.take_failed():
            self.send(P.Fail(rid=rid, status=500, code=code, message=why))
        for model_id, n in list(self.engine.step_faults.items()):
            if n >= FAILING_STEPS:
                self.fail_model(model_id, f"its last {n} steps on {self.name} failed")
        self.ease_pressure()

    def ease_pressure(self) -> None:
        """Under memory pressure the prefix cache gives memory back: half of it at
        each reading (every SHRINK_S at most) while warned, all of it when critical."""
        now = time.monotonic()
        if self.pressure == "normal" or now < self.next_shrink or not self.engine.prefix.nbytes:
            return
        self.next_shrink = now + SHRINK_S
        keep = 0 if self.pressure == "critical" else self.engine.prefix.nbytes // 2
        freed = self.engine.prefix.evict(keep)
        log.warning(
            "memory pressure %s: %d MiB of cached prefixes freed", self.pressure, freed >> 20
        )

    def step(self) -> list[Output]:
        """One engine step. A model's part that raises fails its own requests in the
        step (engine.py); what escapes the engine fails every request the step
        carried (their state may be half-updated: never a wrong token), and the
        node goes on. A model whose steps fail FAILING_STEPS times in a row is
        unloaded and its stages reported failed, with the reason."""
        try:
            return self.engine.step()
        except Exception as e:
            log.exception("engine step %d failed", self.engine.steps)
            why = f"the engine's step failed on node {self.name}: {type(e).__name__}: {e}"
            self.errors["step"] += 1
            for rid, model_id in self.engine.fail_step():
                self.send(P.Fail(rid=rid, status=500, code="step_failed", message=why))
                self.engine.step_faults[model_id] += 1
            return []

    def fail_model(self, model_id: str, why: str) -> None:
        """Unload a model that keeps failing: its requests end with `why`, its
        stages report failed (so the broker fails the instance, with the reason)."""
        self.engine.step_faults.pop(model_id, None)
        log.error("unloading %s: %s", model_id, why)
        for rid in self.engine.fail_remote(model_id):
            self.send(P.Fail(rid=rid, status=503, code="model_failed", message=why))
        self.hosting.fail_model(model_id, why)
        if model_id in self.engine.models:
            self.engine.remove_model(model_id)

    def status(self) -> dict[str, Any]:
        s = self.engine.status()
        s["kv_bytes"] += sum(r.kv_bytes() for r in self.hosting.runners())
        s["running"] += sum(len(r.batch.rids) for r in self.hosting.runners())
        # later stages' parts of their stage 0's prefix cache entries
        s["prefix_cache"]["stage_bytes"] = sum(r.prefix_bytes() for r in self.hosting.runners())
        return {
            **s,
            "stages": self.hosting.public(),
            "broker": self.link.session.public(),
            "mlx_limits": self.limits.public(),
            "recent_cancels": list(self.recent_cancels),
            "downloads": self.downloads.public(),
            "interface_usage": self.interface_usage(),
            "interfaces_up": self.interfaces_up,
            "probes": dict(self.probes.results),
            "probe_cpu_s": self.probes.cpu_s + self.prober.cpu_s,
            "peer_usage": self.peers.rates,
            "weights_bytes_served": self.weights.bytes_served if self.weights else 0,
            "peer_bytes_sent": dict(self.peers.sent),
            "peer_bytes_received": self.peers.received,
            "peer_dropped": self.peers.dropped.snapshot(),
            "errors": dict(self.errors),
            "clock": time.time(),  # the broker compares it with its own (clock skew)
        }

    def emit(self, outputs: list[Output]) -> None:
        for out in outputs:
            usage = out.usage if out.finish else None
            seq = self.seq[out.rid] = self.seq.get(out.rid, 0) + 1
            if out.finish:
                del self.seq[out.rid]
            tokens = P.Tokens(
                rid=out.rid,
                ids=out.ids,
                text=out.text,
                finish=out.finish,
                usage=usage,
                seq=seq,
                tool_calls=out.tool_calls,
                reasoning=out.reasoning,
                logprobs=out.logprobs,
            )
            self.send(tokens)
        if len(self.seq) > 4 * len(self.engine.requests) + 64:
            # requests that ended without a last TOKENS (cancelled, failed)
            self.seq = {r: n for r, n in self.seq.items() if r in self.engine.requests}

    def stages_changed(self) -> None:
        self.apply_limits()
        self._status = self.status()

    def apply_limits(self) -> None:
        import psutil

        held = [lm.nbytes for lm in self.engine.models.values()]
        held += [r.lm.nbytes for r in self.hosting.runners()]
        self.limits = memory.limits(held, self.engine.kv_budget, psutil.virtual_memory().total)
        memory.apply(self.limits)

    def interface_usage(self) -> dict[str, dict[str, float]]:
        """Per-interface rates over the last second or so (sampled at most once a second)."""
        now = time.monotonic()
        if now - self.usage_at >= 1.0:
            import psutil

            self.usage_at = now
            self.usage.sample(now)
            self.peers.sample(now)
            # Up/down travels with every heartbeat: a link going down shows within a second.
            self.interfaces_up = {n: st.isup for n, st in psutil.net_if_stats().items()}
        return self.usage.rates

    def report_progress(self) -> None:
        """Tell the frontend a long prefill is progressing (it turns this into SSE keep-alives)."""
        now = time.monotonic()
        for rid, done, total in self.engine.prefilling():
            if now - self.progress_sent.get(rid, 0.0) >= PROGRESS_S:
                self.progress_sent[rid] = now
                self.send(P.State(rid=rid, state="prefill", done=done, total=total))
        if len(self.progress_sent) > 1000:
            live = set(self.engine.requests)
            self.progress_sent = {r: t for r, t in self.progress_sent.items() if r in live}

    def handle(self, msg: P.Msg) -> None:
        if isinstance(msg, P.Generate):
            self.admit(msg)
        elif isinstance(msg, P.Cancel):
            log.debug("rid=%s cancel received", msg.rid)
            if self.engine.cancel(msg.rid):
                # with the length of the step it waited behind, for bench cancel
                self.recent_cancels.append((msg.rid, time.time(), self.last_step_s))
            self.send(P.CancelAck(rid=msg.rid))
        elif isinstance(msg, P.Download):
            self.downloads.start(msg.model, msg.revision or "main", msg.source)
        elif isinstance(msg, P.Probe):
            self.probes.start(msg.key, msg.src, msg.dst, msg.port)
        elif isinstance(msg, P.Load):
            self.hosting.load(msg)
        elif isinstance(msg, P.Unload):
            self.hosting.unload(msg.instance)
        elif isinstance(msg, P.Route):
            self.hosting.route(msg)
        else:
            self.errors[f"broker_{msg.type}"] += 1

    def admit(self, msg: P.Generate) -> None:
        rid = msg.rid
        if self.engine.holds(rid):
            # Sent again (common/retry.py: idempotency): the one running goes on.
            self.errors["generate_duplicate"] += 1
            return
        try:
            if msg.kind == "count":
                n = self.engine.count(msg.model, msg.payload)
                usage = {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
                self.send(P.Tokens(rid=rid, ids=[], text="", finish="stop", usage=usage, seq=1))
                return
            self.engine.submit(rid, msg.model, msg.kind, msg.payload, msg.params)
            self.send(P.State(rid=rid, state="admitted"))
        except EngineError as e:
            log.info("rid=%s refused: %s", rid, e.message)
            self.send(P.Fail(rid=rid, status=e.status, code=e.code, message=e.message))
        except Exception as e:
            log.exception("rid=%s could not be admitted", rid)
            self.send(P.Fail(rid=rid, status=500, code="admission_failed", message=repr(e)))

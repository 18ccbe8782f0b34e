"""exo-node's main loop: requests from the broker in, engine steps, tokens out."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq

from exo.broker import protocol as P
from exo.common import keys
from exo.common.names import valid_model_id
from exo.nodes.engine.engine import Engine
from exo.nodes.engine.mlxenv import blas, mx
from exo.nodes.engine.model import LoadedModel, Part, load_model, model_meta
from exo.nodes.engine.request import EngineError, Output
from exo.nodes.link import BrokerLink
from exo.nodes.machine import info as node_info
from exo.nodes.machine import memory
from exo.nodes.machine.interfaces import Usage, interfaces
from exo.nodes.machine.pressure import read_pressure
from exo.nodes.machine.prober import ProbeServer, probe
from exo.nodes.machine.rdma import rdma_devices
from exo.nodes.pipeline.peers import PeerSockets
from exo.nodes.pipeline.stage import StageRunner, malformed
from exo.nodes.store.download import Downloader, DownloadError, Progress
from exo.nodes.store.store import ModelStore
from exo.nodes.store.weights import WeightsServer

log = logging.getLogger(__name__)

PROGRESS_S = 1.0
FAILING_STEPS = 3


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
        self.downloader = downloader or Downloader()
        self.downloads: dict[str, Progress] = {}
        self.engine = engine or Engine()
        self.ctx: zmq.Context = zmq.Context.instance()
        self.pair_addr = f"inproc://engine-{self.peer_id}"
        self.pair = self.ctx.socket(zmq.PAIR)
        self.pair.bind(self.pair_addr)
        self.peers = PeerSockets(self.ctx, self.peer_id, port=peer_port, cluster=cluster)
        # the plain-TCP servers' token: derived from the node key (None: insecure)
        self.weights_token = cluster.secret("weights") if cluster else None
        self.probe_token = cluster.secret("probe") if cluster else None
        self.prober = ProbeServer(port=probe_port, token=self.probe_token)
        # None: this node does not serve its models to others
        self.weights = (
            None
            if weights_port is None
            else WeightsServer(self.store, port=weights_port, token=self.weights_token)
        )
        self.probes: dict[str, dict[str, Any]] = {}  # link key -> the last result
        self.probing: threading.Thread | None = None
        self.probe_cpu_s = 0.0
        self.interfaces_up: dict[str, bool] = {}
        self.engine.head.hop = self.hop
        # instance -> {state, model, layers, error?}: what the broker reads to tell an
        # instance loading from ready
        self.stages: dict[str, dict[str, Any]] = {}
        self.runners: dict[str, StageRunner] = {}  # later stages this node holds
        self.next_hop: dict[str, str] = {}  # instance -> the next stage's endpoint
        self.head_of: dict[str, str] = {}  # instance -> stage 0's endpoint (last stage)
        self.limits = memory.limits([], self.engine.kv_budget, 1)
        self._status: dict[str, Any] = self.engine.status()
        self._reset = threading.Event()
        self.link = BrokerLink(
            self.ctx,
            broker,
            self.peer_id,
            name,
            self.pair_addr,
            info=self.info,
            status=lambda: self._status,
            on_reset=self._reset.set,
            cluster=cluster,
        )
        self.stopping = threading.Event()
        self.loading: str | None = None
        self.progress_sent: dict[str, float] = {}
        self.last_step_s = 0.0
        self.usage = Usage()
        self.usage_at = 0.0
        # (rid, wall-clock time the engine dropped it), for `bench cancel` and tests
        self.recent_cancels: deque[tuple[str, float, float]] = deque(maxlen=64)
        self.errors: Counter[str] = Counter()  # handler and step failures, by kind

    def info(self) -> dict[str, Any]:
        models = self.store.scan()  # walks every model folder: once per INFO
        d = node_info.gather(sorted(models), blas, self.store.models_dir)
        d["interfaces"] = [i.public() for i in interfaces(self.link_types)]
        d["rdma"] = self.rdma
        d["loading"] = self.loading
        d["peer_port"] = self.peers.port
        d["probe_port"] = self.prober.port
        d["weights_port"] = self.weights.port if self.weights else None
        d["memory_pressure"] = read_pressure()
        d["model_meta"] = {m: model_meta(p) for m, p in models.items()}
        return d

    def send(self, type_: str, **fields: Any) -> None:
        self.pair.send(P.encode(type_, **fields))

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
                # requests, and the instances our stages belonged to are gone with it.
                self._reset.clear()
                for rid in list(self.engine.requests):
                    self.engine.cancel(rid)
                for iid in list(self.stages):
                    self.unload_stage(iid)
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
                    self.guarded("peer message", self.on_peer)
            self.tick()
            self.check_stalled_steps()
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

    def guarded(self, what: str, fn: Any, *args: Any) -> None:
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
            log.debug(
                "step %d: %d outputs in %.1f ms",
                self.engine.steps,
                len(outputs),
                self.last_step_s * 1000,
            )
        self.emit(outputs)
        for rid, code, why in self.engine.take_failed():
            self.send("FAIL", rid=rid, status=500, code=code, message=why)
        for model_id, n in list(self.engine.step_faults.items()):
            if n >= FAILING_STEPS:
                self.fail_model(model_id, f"its last {n} steps on {self.name} failed")

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
                self.send("FAIL", rid=rid, status=500, code="step_failed", message=why)
                self.engine.step_faults[model_id] += 1
            return []

    def fail_model(self, model_id: str, why: str) -> None:
        """Unload a model that keeps failing: its requests end with `why`, its
        stages report failed (so the broker fails the instance, with the reason)."""
        self.engine.step_faults.pop(model_id, None)
        log.error("unloading %s: %s", model_id, why)
        for rid in self.engine.fail_remote(model_id):
            self.send("FAIL", rid=rid, status=503, code="model_failed", message=why)
        for iid, entry in list(self.stages.items()):
            if entry.get("model") == model_id:
                self.unload_stage(iid)
                self.stages[iid] = {**entry, "state": "failed", "error": why}
        if model_id in self.engine.models:
            self.engine.remove_model(model_id)

    def status(self) -> dict[str, Any]:
        s = self.engine.status()
        s["kv_bytes"] += sum(r.kv_bytes() for r in self.runners.values())
        s["running"] += sum(len(r.batch.rids) for r in self.runners.values())
        return {
            **s,
            "stages": {k: dict(v) for k, v in self.stages.items()},
            "mlx_limits": self.limits.public(),
            "recent_cancels": list(self.recent_cancels),
            "downloads": [p.public() for p in list(self.downloads.values())],
            "interface_usage": self.interface_usage(),
            "interfaces_up": self.interfaces_up,
            "probes": dict(self.probes),
            "probe_cpu_s": self.probe_cpu_s + self.prober.cpu_s,
            "peer_usage": self.peers.rates,
            "weights_bytes_served": self.weights.bytes_served if self.weights else 0,
            "peer_bytes_sent": dict(self.peers.sent),
            "peer_bytes_received": self.peers.received,
            "peer_dropped": self.peers.dropped.snapshot(),
            "errors": dict(self.errors),
        }

    def emit(self, outputs: list[Output]) -> None:
        for out in outputs:
            fields: dict[str, Any] = {"rid": out.rid, "ids": out.ids, "text": out.text}
            if out.finish:
                fields["finish"] = out.finish
                fields["usage"] = out.usage
            self.send("TOKENS", **fields)

    # -- pipeline stages --------------------------------------------------------------

    def hop(self, lm: LoadedModel, header: dict[str, Any], h: mx.array) -> None:
        self.peers.send(self.next_hop[lm.instance], "ACT", h, shape=list(h.shape), **header)

    def on_peer(self) -> None:
        got = self.peers.recv()
        if got is None:
            return
        msg, h = got
        iid = msg["instance"]
        if msg.type == "ACT":
            runner = self.runners.get(iid)
            if runner is None or h is None:
                log.warning("a step for instance %s, which this node does not hold", iid)
                return
            problem = malformed(msg.fields, tuple(h.shape), runner.width)
            if problem is not None:
                self.peers.dropped["bad_act"] += 1
                log.warning("instance %s: ACT dropped: %s", iid, problem)
                return
            if msg["step"] <= runner.last_step:
                # A step stage 0 gave up on, arriving late over a link that came back.
                log.warning("instance %s: stale step %s dropped", iid, msg["step"])
                return
            header = {k: v for k, v in msg.fields.items() if k != "shape"}
            try:
                out = runner.run(header, h)
            except Exception as e:  # a stage that cannot run its step fails the instance's requests
                log.exception("instance %s: step %s failed", iid, msg["step"])
                if iid in self.head_of:
                    self.peers.send(
                        self.head_of[iid], "STAGE_ERROR", instance=iid, message=f"{self.name}: {e}"
                    )
                return
            if isinstance(out, list):
                self.peers.send(
                    self.head_of[iid], "RESULT", instance=iid, step=msg["step"], ids=out
                )
            else:
                self.peers.send(self.next_hop[iid], "ACT", out, shape=list(out.shape), **header)
            return
        model_id = self.stages.get(iid, {}).get("model")
        if model_id is None or self.engine.models.get(model_id) is None:
            return
        if msg.type == "RESULT":
            try:
                self.emit(self.engine.finish_remote(model_id, msg["step"], msg["ids"]))
            except EngineError as e:
                self.fail_instance_requests(model_id, e.message)
        elif msg.type == "STAGE_ERROR":
            self.fail_instance_requests(model_id, msg["message"])

    def start_probe(self, key: str, src: str, dst: str, port: int) -> None:
        """Measure a link in the background; a failure marks the link, nothing more."""
        if self.probing is not None and self.probing.is_alive():
            return

        def run() -> None:
            try:
                result = probe(src, dst, port, token=self.probe_token)
                self.probe_cpu_s += result["cpu_s"]
            except OSError as e:
                result = {"error": f"{type(e).__name__}: {e}", "at": time.time()}
                log.info("probe %s failed: %s", key, result["error"])
            self.probes[key] = result

        self.probing = threading.Thread(target=run, name="probe", daemon=True)
        self.probing.start()

    def check_stalled_steps(self) -> None:
        """A step the later stages never answer (a link that died under it) fails its
        requests instead of leaving them hanging until their deadline."""
        for model_id, w in self.engine.head.stalled(self.stage_timeout):
            lm = self.engine.models[model_id]
            why = (
                f"stage after {self.name} did not answer step {w.step} within "
                f"{self.stage_timeout:.0f}s (next hop {self.next_hop.get(lm.instance)})"
            )
            log.error("instance %s: %s", lm.instance, why)
            self.fail_instance_requests(model_id, why, 504, "stage_timeout")

    def fail_instance_requests(
        self, model_id: str, why: str, status: int = 500, code: str = "stage_error"
    ) -> None:
        for rid in self.engine.fail_remote(model_id):
            self.send("FAIL", rid=rid, status=status, code=code, message=why)

    def load_stage(self, msg: P.Message) -> None:
        iid, model_id = msg["instance"], msg["model"]
        part = Part(msg["start"], msg["end"], msg["total"])
        entry: dict[str, Any] = {"state": "loading", "model": model_id, "layers": part.public()}
        self.stages[iid] = entry
        self._status = self.status()  # the broker sees "loading" while we load
        path = self.store.scan().get(model_id)
        if path is None:
            entry.update(state="failed", error=f"{model_id} is not on node {self.name}")
            return
        self.loading = model_id
        try:
            lm = load_model(model_id, path, part)
        except Exception as e:
            log.exception("loading %s %s failed", model_id, part)
            entry.update(state="failed", error=f"loading {model_id} failed: {e}")
            return
        finally:
            self.loading = None
        lm.instance = iid
        if msg.get("next"):
            self.next_hop[iid] = str(msg["next"])
        if msg.get("head"):
            self.head_of[iid] = str(msg["head"])
        if part.first:
            # Later stages hold KV for every request this stage admits: keep each
            # within its node's budget, in this stage's units (bytes scale with layers).
            caps = [
                int(budget * part.end / max(1, layers))
                for layers, budget in msg.get("kv_budgets") or []
                if budget
            ]
            lm.kv_cap = min(caps) if caps else None
            self.engine.add_model(lm)
        else:
            self.runners[iid] = StageRunner(lm)
        self.apply_limits()
        entry["state"] = "ready"
        log.info("instance %s: stage %s of %s ready", iid, part.public(), model_id)

    def unload_stage(self, iid: str) -> None:
        entry = self.stages.pop(iid, None)
        self.runners.pop(iid, None)
        self.next_hop.pop(iid, None)
        self.head_of.pop(iid, None)
        model_id = (entry or {}).get("model")
        lm = self.engine.models.get(model_id or "")
        if lm is not None and lm.instance == iid:
            gone = self.engine.remove_model(lm.model_id)
            log.info("instance %s unloaded; %d requests ended with it", iid, len(gone))
        self.apply_limits()
        mx.clear_cache()

    def apply_limits(self) -> None:
        import psutil

        held = [lm.nbytes for lm in self.engine.models.values()]
        held += [r.lm.nbytes for r in self.runners.values()]
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
                self.send("STATE", rid=rid, state="prefill", done=done, total=total)
        if len(self.progress_sent) > 1000:
            live = set(self.engine.requests)
            self.progress_sent = {r: t for r, t in self.progress_sent.items() if r in live}

    def download(self, model_id: str, revision: str, source: str | None = None) -> None:
        """Fetch a model in the background; the engine keeps serving meanwhile. With a
        `source` (a peer's weights server) the peer is tried first, then the hub."""
        if not valid_model_id(model_id):
            self.downloads[model_id[:256]] = Progress(
                model_id[:256], state="failed", error="not a model id (ORG/NAME, as on the hub)"
            )
            return
        current = self.downloads.get(model_id)
        if (
            current and current.state in ("listing", "downloading")
        ) or model_id in self.store.scan():
            return

        def progress(p: Progress) -> None:
            self.downloads[model_id] = p

        def run() -> None:
            dest = self.store.path(model_id)
            try:
                if source:
                    try:
                        replace(
                            self.downloader,
                            hub=source,
                            token=self.weights_token,
                            on_progress=progress,
                        ).download(model_id, dest, revision)
                        return
                    except DownloadError as e:
                        log.warning(
                            "peer %s could not give %s (%s); trying the hub", source, model_id, e
                        )
                replace(self.downloader, on_progress=progress).download(model_id, dest, revision)
            except Exception as e:
                log.error("download of %s failed: %s", model_id, e)
            finally:
                self.link.info_now.set()

        self.downloads[model_id] = Progress(model_id)
        threading.Thread(target=run, name=f"download-{model_id}", daemon=True).start()

    def handle(self, msg: P.Message) -> None:
        if msg.type == "DOWNLOAD":
            source = msg.get("source")
            self.download(
                msg["model"],
                str(msg.get("revision") or "main"),
                source if isinstance(source, str) else None,
            )
            return
        if msg.type == "PROBE":
            self.start_probe(msg["key"], msg["src"], msg["dst"], msg["port"])
            return
        if msg.type == "LOAD":
            self.load_stage(msg)
            return
        if msg.type == "UNLOAD":
            self.unload_stage(msg["instance"])
            return
        if msg.type == "ROUTE":
            # Steps go out one at a time (stage 0 waits for each step's tokens), so
            # switching between two of them reorders nothing.
            iid = msg["instance"]
            if msg.get("next") and iid in self.next_hop:
                self.next_hop[iid] = str(msg["next"])
            if msg.get("head") and iid in self.head_of:
                self.head_of[iid] = str(msg["head"])
            return
        if msg.type == "CANCEL":
            rid = msg["rid"]
            log.debug("rid=%s cancel received", rid)
            if self.engine.cancel(rid):
                # with the length of the step it waited behind, for bench cancel
                self.recent_cancels.append((rid, time.time(), self.last_step_s))
            self.send("CANCEL_ACK", rid=rid)
            return
        rid, model_id = msg["rid"], msg["model"]
        try:
            self.engine.submit(rid, model_id, msg["kind"], msg["payload"], msg["params"])
            self.send("STATE", rid=rid, state="admitted")
        except EngineError as e:
            log.info("rid=%s refused: %s", rid, e.message)
            self.send("FAIL", rid=rid, status=e.status, code=e.code, message=e.message)
        except Exception as e:
            log.exception("rid=%s could not be admitted", rid)
            self.send("FAIL", rid=rid, status=500, code="admission_failed", message=repr(e))

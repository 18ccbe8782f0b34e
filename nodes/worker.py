"""exo-node's main loop: requests from the broker in, engine steps, tokens out."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq

from exo.broker import protocol as P
from exo.nodes import info as node_info
from exo.nodes.download import Downloader, Progress
from exo.nodes.engine import Engine, EngineError
from exo.nodes.interfaces import Usage, interfaces
from exo.nodes.link import BrokerLink
from exo.nodes.mlxenv import blas, mx
from exo.nodes.model import load_model
from exo.nodes.rdma import rdma_devices
from exo.nodes.store import ModelStore

log = logging.getLogger(__name__)

PROGRESS_S = 1.0


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
    ) -> None:
        self.link_types = link_types or {}
        self.rdma = [d.public() for d in rdma_devices()]
        self.name = name
        self.peer_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.store = ModelStore(models_dir, extra_dirs)
        self.downloader = downloader or Downloader()
        self.downloads: dict[str, Progress] = {}
        self.engine = engine or Engine()
        self.ctx = zmq.Context.instance()
        self.pair_addr = f"inproc://engine-{self.peer_id}"
        self.pair = self.ctx.socket(zmq.PAIR)
        self.pair.bind(self.pair_addr)
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
        )
        self.stopping = threading.Event()
        self.loading: str | None = None
        self.progress_sent: dict[str, float] = {}
        self.last_step_s = 0.0
        self.usage = Usage()
        self.usage_at = 0.0
        # (rid, wall-clock time the engine dropped it), for `bench cancel` and tests
        self.recent_cancels: deque[tuple[str, float, float]] = deque(maxlen=64)

    def info(self) -> dict[str, Any]:
        d = node_info.gather(sorted(self.store.scan()), blas, self.store.models_dir)
        d["interfaces"] = [i.public() for i in interfaces(self.link_types)]
        d["rdma"] = self.rdma
        d["loading"] = self.loading
        return d

    def send(self, type_: str, **fields: Any) -> None:
        self.pair.send(P.encode(type_, **fields))

    def run(self) -> int:
        log.info(
            "node %s starting (models in %s, BLAS: %s)", self.peer_id, self.store.models_dir, blas
        )
        self.link.start()
        was_busy = False
        while not self.stopping.is_set() and self.link.is_alive():
            if self._reset.is_set():
                self._reset.clear()
                for rid in list(self.engine.requests):
                    self.engine.cancel(rid)
            busy = bool(self.engine.requests)
            if was_busy and not busy:
                # Give back the buffers MLX cached while serving (requests of every
                # size leave many behind); the weights stay.
                mx.clear_cache()
            was_busy = busy
            if self.pair.poll(0 if busy else 100):
                while self.pair.poll(0):
                    self.handle(P.decode(self.pair.recv()))
            t0 = time.perf_counter()
            outputs = self.engine.step()
            self.last_step_s = time.perf_counter() - t0
            if outputs and log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "step %d: %d outputs in %.1f ms",
                    self.engine.steps,
                    len(outputs),
                    self.last_step_s * 1000,
                )
            for out in outputs:
                fields: dict[str, Any] = {"rid": out.rid, "ids": out.ids, "text": out.text}
                if out.finish:
                    fields["finish"] = out.finish
                    fields["usage"] = out.usage
                self.send("TOKENS", **fields)
            self.report_progress()
            self._status = {
                **self.engine.status(),
                "recent_cancels": list(self.recent_cancels),
                "downloads": [p.public() for p in list(self.downloads.values())],
                "interface_usage": self.interface_usage(),
            }
        self.link.stop_event.set()
        self.link.join(timeout=2)
        return 2 if self.link.refused else 0

    def interface_usage(self) -> dict[str, dict[str, float]]:
        """Per-interface rates over the last second or so (sampled at most once a second)."""
        now = time.monotonic()
        if now - self.usage_at >= 1.0:
            self.usage_at = now
            self.usage.sample(now)
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

    def download(self, model_id: str, revision: str) -> None:
        """Fetch a model in the background; the engine keeps serving meanwhile."""
        current = self.downloads.get(model_id)
        if (
            current and current.state in ("listing", "downloading")
        ) or model_id in self.store.scan():
            return

        def progress(p: Progress) -> None:
            self.downloads[model_id] = p

        def run() -> None:
            try:
                replace(self.downloader, on_progress=progress).download(
                    model_id, self.store.path(model_id), revision
                )
            except Exception as e:
                log.error("download of %s failed: %s", model_id, e)
            self.link.info_now.set()

        self.downloads[model_id] = Progress(model_id)
        threading.Thread(target=run, name=f"download-{model_id}", daemon=True).start()

    def handle(self, msg: P.Message) -> None:
        if msg.type == "DOWNLOAD":
            self.download(msg["model"], str(msg.get("revision") or "main"))
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
            if model_id not in self.engine.models:
                self.ensure_loaded(rid, model_id)
            self.engine.submit(rid, model_id, msg["kind"], msg["payload"], msg["params"])
            self.send("STATE", rid=rid, state="admitted")
        except EngineError as e:
            log.info("rid=%s refused: %s", rid, e.message)
            self.send("FAIL", rid=rid, status=e.status, code=e.code, message=e.message)

    def ensure_loaded(self, rid: str, model_id: str) -> None:
        path = self.store.scan().get(model_id)
        if path is None:
            raise EngineError(
                404, "model_not_found", f"model {model_id} is not on node {self.name}"
            )
        self.send("STATE", rid=rid, state="loading")
        self.loading = model_id
        t0 = time.perf_counter()
        try:
            self.engine.add_model(load_model(model_id, path))
        except Exception as e:
            log.exception("loading %s failed", model_id)
            raise EngineError(500, "load_failed", f"loading {model_id} failed: {e}") from e
        finally:
            self.loading = None
        self.send("STATE", rid=rid, state="loaded")
        log.info("rid=%s model %s ready after %.2fs", rid, model_id, time.perf_counter() - t0)

"""Prompts prefilled on a core of their own while the decode batch steps.

On MLX's CPU backend a decode step is bound by memory bandwidth (every step reads
all the weights for a few rows) and leaves the machine's other cores idle, while
a prompt chunk is compute: run side by side they hardly slow each other. So a
prompt that arrives while streams decode goes through the model here, on this
lane's thread and MLX stream, in chunks of up to CHUNK tokens, and joins the
batch once prefilled. The step loop never carries it: the streams' steps keep
their length and the prompt prefills at about its speed on an idle machine
(bench stall, BENCHMARKS.md). Three things make the difference (figures in
docs/NOTES.md):
- The lane evaluates a layer at a time. MLX throttles every stream together on
  the tasks in flight, so a whole chunk queued at once made each decode step wait
  behind it.
- OpenBLAS runs one thread per caller while the lane works (`mlxenv.blas_threads`):
  two callers each asking for two threads on two cores oversubscribe them.
- The lane's threads run at nice 19 (`NICE`). The step loop wakes its own threads
  hundreds of times a step (MLX hands each op to its stream's worker); at equal
  priority they queued behind the lane for a core (`exo-tools bench lane`).
Decodes and the lane's results meet in the engine's step, on its thread: the lane
hands back each prompt's last logits (evaluated) and its KV cache, complete.

The progress guarantee. Nice 19 is a gift only while nothing else wants the
cores: beside any busy nice-0 process (a compile, a browser, a second service)
CFS gives a nice-19 thread about 1.5% of a core, and a prompt waited minutes
for its first token while the streams decoded on. So the engine watches the
lane in its own steps: a lane that holds work and has finished no layer for
FLOOR_STEPS of the engine's steps is behind its floor, and from the next layer
on its pass runs on a second thread of the lane at the step loop's own priority
(nice 0), until the lane runs dry. A pass is resumable at any layer boundary,
so the hand-over loses nothing. (A thread cannot take back a lower nice
without privilege; a second thread can simply start at the one it needs.) A
prompt behind the pace of its TTFT bound (`--max-ttft-ratio` times its time
alone, whole passes at the lane's best pass rate) is hurried the same way, and if
it is still behind at that priority the engine's steps wait for the lane's next
layer: the streams' stall bound gives (watch.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from exo.nodes.engine.forward import Chunk, fused_step
from exo.nodes.engine.mlxenv import LayerCache, blas_threads, mx

if TYPE_CHECKING:
    from exo.nodes.engine.request import Request

log = logging.getLogger(__name__)

CHUNK = 256  # tokens per pass: the idle step's budget (pacing.DEFAULT_IDLE_BUDGET)


# The lane's threads' nice (Linux; 0: the same as the step loop's): see above.
NICE = int(os.environ.get("EXO_LANE_NICE", "19"))


def lower_priority(nice: int = NICE) -> None:
    """This thread, and the threads it starts from now on (its MLX stream's worker),
    at `nice`. Linux keeps a nice per thread; elsewhere it would be the process's."""
    if nice > 0 and sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def lane_default() -> bool:
    """A lane pays on MLX's CPU backend with a core to spare; a GPU runs both
    kinds of work on one device, where the fused step is the way."""
    return mx.default_device() == mx.cpu and (os.cpu_count() or 1) >= 2


@dataclass
class Prompt:
    req: Request  # its prompt, cache and progress
    cancelled: bool = False
    since: float = field(default_factory=time.monotonic)  # when it came to the lane


@dataclass
class Pass:
    """A pass in hand: its prompts and token counts, and how far through the model it
    is (`layer`, and the hidden states there), so another thread can go on with it."""

    batch: list[tuple[Prompt, int]]
    layer: int = 0
    hs: list[mx.array | None] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    # Taken when the pass begins: a cancel drops a request's cache on the engine's
    # thread, but the pass goes on writing the one it holds (then throws it away).
    toks: list[list[int]] = field(init=False)
    caches: list[list[LayerCache]] = field(init=False)

    def __post_init__(self) -> None:
        self.toks = [j.req.prompt[j.req.prefilled : j.req.prefilled + n] for j, n in self.batch]
        self.caches = []
        for j, _ in self.batch:
            assert j.req.cache is not None, "a prompt comes to the lane with its cache"
            self.caches.append(j.req.cache)


_NEW_STREAM = threading.Lock()


class Lane:
    """Prefills prompts, chunk by chunk, first come first, several prompts of one
    model per pass when they fit in CHUNK tokens; on the polite thread (nice NICE)
    until the engine says the lane is behind its floor (`hurry`), then on the
    nice-0 thread until it runs dry."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self._cv = threading.Condition()
        self._prompts: list[Prompt] = []
        self._landed: list[tuple[Request, mx.array | None]] = []
        self._pass: Pass | None = None
        self._busy = False  # a thread is running layers of the pass
        self._threads: dict[bool, threading.Thread] = {}  # urgent? -> its thread
        # Readable once a prompt lands: the node's loop polls it with its sockets.
        self.wakeup, self._wake = os.pipe()
        os.set_blocking(self.wakeup, False)
        os.set_blocking(self._wake, False)
        self.passes = 0  # chunk passes run
        self.prompts = 0  # prompts prefilled
        self.layers = 0  # layers run, every pass (the engine's measure of progress)
        self.hurried = 0  # times the lane fell behind its floor
        self.urgent = False  # passes run on the nice-0 thread
        self.single_blas = False  # whether OpenBLAS is held to one thread now
        # token-layers per second of whole passes: the best (about the lane's pace on
        # an idle core: a single layer's time varies too much to say) and the last
        self.best_rate = 0.0
        self.rate = 0.0
        self._open = threading.Event()  # cleared: the lane holds before its next layer
        self._open.set()

    def __contains__(self, rid: str) -> bool:
        with self._cv:
            return any(j.req.rid == rid and not j.cancelled for j in self._prompts) or any(
                r.rid == rid for r, _ in self._landed
            )

    def submit(self, req: Request) -> None:
        self._start(urgent=False)
        if not self.single_blas:
            # Safe now: the lane is idle (see release_blas) and the engine's own
            # step has been read back.
            blas_threads(1)
            self.single_blas = True
        with self._cv:
            self._prompts.append(Prompt(req))
            self._cv.notify_all()

    def _start(self, urgent: bool) -> None:
        """Start the polite thread (the first prompt) or the floor thread (the first
        hurry), on the engine's thread (nice 0); the polite one lowers its own
        priority first thing. The floor thread only where it is needed: a thread
        holding an MLX stream is one more that must be idle when the process ends."""
        if urgent in self._threads:
            return
        t = threading.Thread(
            target=self._run,
            args=(urgent,),
            name="prefill-lane" + ("-floor" if urgent else ""),
            daemon=True,
        )
        t.start()
        self._threads[urgent] = t

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    def hurry(self) -> None:
        """The lane is behind its floor: its pass goes on at the step loop's priority
        from its next layer, until it runs dry."""
        self._start(urgent=True)
        with self._cv:
            if not self.urgent and (self._prompts or self._pass):
                self.urgent = True
                self.hurried += 1
                self._cv.notify_all()

    def cancel(self, rid: str) -> None:
        """Drop `rid`: a pass that holds it finishes, and its result is thrown away."""
        with self._cv:
            for j in self._prompts:
                if j.req.rid == rid:
                    j.cancelled = True
            self._landed = [(r, x) for r, x in self._landed if r.rid != rid]

    def take(self) -> list[tuple[Request, mx.array | None]]:
        """Prompts prefilled since the last call, with their last position's logits
        (None: the lane failed on it)."""
        with self._cv:
            out, self._landed = self._landed, []
            with contextlib.suppress(BlockingIOError):
                os.read(self.wakeup, 4096)
        return out

    def landed(self) -> bool:
        with self._cv:
            return bool(self._landed)

    def idle(self) -> bool:
        with self._cv:
            return not (self._prompts or self._pass)

    def progress(self) -> list[dict[str, Any]]:
        """Per prompt in the lane: tokens prefilled of its prompt, and seconds waited."""
        now = time.monotonic()
        with self._cv:
            return [
                {
                    "rid": j.req.rid,
                    "done": j.req.prefilled,
                    "total": len(j.req.prompt),
                    "waited_s": round(now - j.since, 2),
                    "layers": len(j.req.lm.model.model.layers),
                }
                for j in self._prompts
                if not j.cancelled
            ]

    def pause(self) -> None:
        """Hold the lane before its next layer, every other way as it was (its prompts,
        OpenBLAS's threads): the baseline of `exo-tools bench lane`, which measures
        the streams' steps with the lane working and held in turn."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def close(self, timeout: float = 30.0) -> None:
        """Drop every prompt and wait out the layer in hand: a process that exits while
        MLX evaluates on the lane's stream aborts ("terminate called without an
        active exception", status 134)."""
        with self._cv:
            for j in self._prompts:
                j.cancelled = True
            self._landed = []
        self._open.set()
        with self._cv:
            self._cv.wait_for(lambda: not self._busy, timeout)

    def release_blas(self) -> None:
        """Give OpenBLAS its threads back once the lane has nothing to do (called on
        the engine's thread between steps, so no one is inside BLAS)."""
        if self.single_blas and self.idle():
            blas_threads(None)
            self.single_blas = False

    def wait(self, timeout: float) -> None:
        """Until a prompt lands, the lane runs dry, or `timeout` seconds pass."""
        with self._cv:
            self._cv.wait_for(lambda: self._landed or not (self._prompts or self._pass), timeout)

    def wait_layer(self, timeout: float) -> None:
        """Until the lane finishes its next layer (or runs dry, or `timeout` passes)."""
        with self._cv:
            seen = self.layers
            self._cv.wait_for(
                lambda: self.layers != seen or not (self._prompts or self._pass), timeout
            )

    # -- the lane's threads --------------------------------------------------------

    def _run(self, urgent: bool) -> None:
        if not urgent:
            lower_priority()  # first: the stream's worker thread inherits it
        with _NEW_STREAM:
            # One at a time: MLX's stream table is not made for two threads adding
            # to it at once.
            stream = mx.new_stream(mx.cpu)  # this thread's own: MLX streams are per thread
        with mx.stream(stream):
            while True:
                with self._cv:
                    self._cv.wait_for(
                        lambda: (
                            not self._busy
                            and self.urgent == urgent
                            and (self._pass is not None or bool(self._prompts))
                        )
                    )
                    if self._pass is None:
                        batch = self._next_pass()
                        if not batch:
                            continue
                        self._pass = Pass(batch)
                    p = self._pass
                    self._busy = True
                done, failed = False, False
                try:
                    done = self._layers(p, urgent)
                except Exception:  # the engine fails these prompts, not the whole node
                    log.exception("prefill lane failed on %s", [j.req.rid for j, _ in p.batch])
                    done = failed = True
                with self._cv:
                    self._busy = False
                    if done:
                        self._finish(p, failed)
                    self._cv.notify_all()

    def _finish(self, p: Pass, failed: bool) -> None:
        """Account for a finished pass (under the lock): prompts done land."""
        self._pass = None
        self.passes += 1
        landed = len(self._landed)
        layers = self._layer_count(p)
        complete = not failed and p.layer == layers and len(p.hs) == len(p.batch)
        if complete:
            tokens = sum(n for _, n in p.batch)
            self.rate = tokens * layers / max(time.perf_counter() - p.started, 1e-9)
            self.best_rate = max(self.best_rate, self.rate)
        for (prompt, n), out in zip(
            p.batch, p.hs if complete else [None] * len(p.batch), strict=True
        ):
            if complete:
                prompt.req.prefilled += n
            logits = out if complete and prompt.req.to_prefill == 0 else None
            if prompt.cancelled:
                if prompt in self._prompts:
                    self._prompts.remove(prompt)
            elif logits is not None or failed:
                self._prompts.remove(prompt)
                self._landed.append((prompt.req, logits))
                self.prompts += logits is not None
        if len(self._landed) > landed:
            with contextlib.suppress(BlockingIOError):  # full: it is readable
                os.write(self._wake, b"!")
        if not self._prompts:
            self.urgent = False  # dry: the next prompt starts polite again

    @staticmethod
    def _layer_count(p: Pass) -> int:
        return len(p.batch[0][0].req.lm.model.model.layers)

    def _next_pass(self) -> list[tuple[Prompt, int]]:
        """The prompts and token counts of the next pass: the first prompt's next chunk, and
        chunks of the prompts behind it (same model) while the pass has room."""
        self._prompts = [j for j in self._prompts if not j.cancelled]
        if not self._prompts:
            return []
        first = self._prompts[0].req.lm.model_id
        room = self.chunk
        batch: list[tuple[Prompt, int]] = []
        for j in self._prompts:
            if j.req.lm.model_id != first or room <= 0:
                continue
            n = min(room, j.req.to_prefill)
            batch.append((j, n))
            room -= n
        # Round robin: a long prompt does not hold the ones behind it for its whole length.
        self._prompts = [j for j in self._prompts if all(j is not b for b, _ in batch)] + [
            j for j, _ in batch
        ]
        return batch

    def _layers(self, p: Pass, urgent: bool) -> bool:
        """Run p's layers, one at a time, while the lane's priority is this thread's.
        True once the pass is through the model (or every prompt in it was cancelled)."""
        model = p.batch[0][0].req.lm.model
        layers = len(model.model.layers)
        reqs = [j.req for j, _ in p.batch]
        toks, caches = p.toks, p.caches
        if not p.hs:
            p.hs = [None] * len(p.batch)
        while p.layer < layers:
            self._open.wait()
            if self.urgent != urgent:
                return False  # the other thread goes on from here
            if all(j.cancelled for j, _ in p.batch):
                p.hs = []
                return True
            li = p.layer
            end = None if li == layers - 1 else li + 1
            chunks = [
                Chunk(t, c, logits=end is None and len(t) == r.to_prefill, first=li, end=end, h=h)
                for t, c, r, h in zip(toks, caches, reqs, p.hs, strict=True)
            ]
            _, outs = fused_step(model, [], [], chunks)
            # One layer at a time: see the module's docstring.
            mx.eval([o for o in outs if o is not None], [s for c in caches for s in c[li].state])
            p.hs, p.layer = list(outs), li + 1
            with self._cv:
                self.layers += 1
                self._cv.notify_all()
        return True

"""Prompts prefilled on a core of their own while the decode batch steps.

On MLX's CPU backend a decode step is bound by memory bandwidth (every step reads
all the weights for a few rows) and leaves the machine's other cores idle, while
a prompt chunk is compute: run side by side they hardly slow each other. So a
prompt that arrives while streams decode goes through the model here, on this
lane's thread and MLX stream, in chunks of up to CHUNK tokens, and joins the
batch once prefilled. The step loop never carries it: the streams' steps keep
their length and the prompt prefills at about its speed on an idle machine
(bench stall, BENCHMARKS.md). Three things make the difference, measured here
(4 streams decoding, a 1k-token prompt in 128-token chunks beside them):
- The lane evaluates a layer at a time. MLX throttles every stream together on
  the tasks in flight, so a whole chunk queued at once made each decode step wait
  behind it: 2.6x longer steps. A layer at a time: 1.18x.
- OpenBLAS runs one thread per caller while the lane works (`mlxenv.blas_threads`):
  two callers each asking for two threads on two cores made the steps 2.7x.
- The lane's threads run at nice 19 (`NICE`). The step loop wakes its own threads
  hundreds of times a step (MLX hands each op to its stream's worker); at equal
  priority they queued behind the lane for a core (`exo-tools bench lane`, 2k
  prompt): the streams' steps 1.16-1.24x as long as with the lane held;
  at nice 19 1.06-1.10x, the prompt prefilling ~15% slower.
Decodes and the lane's results meet in the engine's step, on its thread: the lane
hands back each prompt's last logits (evaluated) and its KV cache, complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

from exo.nodes.forward import Chunk, fused_step
from exo.nodes.mlxenv import blas_threads, mx

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
class Job:
    req: Any  # request.Request: its prompt, cache and progress
    cancelled: bool = False


class Lane:
    """A thread that prefills prompts, chunk by chunk, first come first, several
    prompts of one model per pass when they fit in CHUNK tokens."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self._cv = threading.Condition()
        self._jobs: list[Job] = []
        self._landed: list[tuple[Any, mx.array | None]] = []
        self._working = False
        self._thread: threading.Thread | None = None
        # Readable once a prompt lands: the node's loop polls it with its sockets.
        self.wakeup, self._wake = os.pipe()
        os.set_blocking(self.wakeup, False)
        os.set_blocking(self._wake, False)
        self.passes = 0  # chunk passes run
        self.prompts = 0  # prompts prefilled
        self.single_blas = False  # whether OpenBLAS is held to one thread now
        self._open = threading.Event()  # cleared: the lane holds before its next layer
        self._open.set()

    def __contains__(self, rid: str) -> bool:
        with self._cv:
            return any(j.req.rid == rid and not j.cancelled for j in self._jobs) or any(
                r.rid == rid for r, _ in self._landed
            )

    def submit(self, req: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefill-lane", daemon=True)
            self._thread.start()
        if not self.single_blas:
            # Safe now: the lane is idle (see release_blas) and the engine's own
            # step has been read back.
            blas_threads(1)
            self.single_blas = True
        with self._cv:
            self._jobs.append(Job(req))
            self._cv.notify_all()

    def cancel(self, rid: str) -> None:
        """Drop `rid`: a pass that holds it finishes, and its result is thrown away."""
        with self._cv:
            for j in self._jobs:
                if j.req.rid == rid:
                    j.cancelled = True
            self._landed = [(r, x) for r, x in self._landed if r.rid != rid]

    def take(self) -> list[tuple[Any, mx.array | None]]:
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
            return not (self._jobs or self._working)

    def pause(self) -> None:
        """Hold the lane before its next layer, every other way as it was (its prompts,
        OpenBLAS's threads): the baseline of `exo-tools bench lane`, which measures
        the streams' steps with the lane working and held in turn."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def close(self, timeout: float = 30.0) -> None:
        """Drop every prompt and wait out the pass in hand: a process that exits while
        MLX evaluates on the lane's stream aborts ("terminate called without an
        active exception", status 134)."""
        with self._cv:
            for j in self._jobs:
                j.cancelled = True
            self._landed = []
        self._open.set()
        with self._cv:
            self._cv.wait_for(lambda: not self._working, timeout)

    def release_blas(self) -> None:
        """Give OpenBLAS its threads back once the lane has nothing to do (called on
        the engine's thread between steps, so no one is inside BLAS)."""
        if self.single_blas and self.idle():
            blas_threads(None)
            self.single_blas = False

    def wait(self, timeout: float) -> None:
        """Until a prompt lands, the lane runs dry, or `timeout` seconds pass."""
        with self._cv:
            self._cv.wait_for(lambda: self._landed or not (self._jobs or self._working), timeout)

    # -- the lane's thread ---------------------------------------------------------

    def _run(self) -> None:
        lower_priority()  # first: the stream's worker thread inherits it
        stream = mx.new_stream(mx.cpu)  # this thread's own: MLX streams are per thread
        with mx.stream(stream):
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._jobs)
                    batch = self._next_pass()
                    self._working = bool(batch)
                if not batch:
                    continue
                failed = False
                try:
                    results = self._pass(batch)
                except Exception:  # the engine fails these prompts, not the whole node
                    log.exception("prefill lane failed on %s", [j.req.rid for j, _ in batch])
                    results, failed = [(j, None) for j, _ in batch], True
                with self._cv:
                    self._working = False
                    self.passes += 1
                    landed = len(self._landed)
                    for job, logits in results:
                        if job.cancelled:
                            self._jobs.remove(job)
                        elif logits is not None or failed:
                            self._jobs.remove(job)
                            self._landed.append((job.req, logits))
                            self.prompts += logits is not None
                    if len(self._landed) > landed:
                        with contextlib.suppress(BlockingIOError):  # full: it is readable
                            os.write(self._wake, b"!")
                    self._cv.notify_all()

    def _next_pass(self) -> list[tuple[Job, int]]:
        """The jobs and token counts of the next pass: the first job's next chunk, and
        chunks of the jobs behind it (same model) while the pass has room."""
        self._jobs = [j for j in self._jobs if not j.cancelled]
        if not self._jobs:
            return []
        first = self._jobs[0].req.lm.model_id
        room = self.chunk
        batch: list[tuple[Job, int]] = []
        for j in self._jobs:
            if j.req.lm.model_id != first or room <= 0:
                continue
            n = min(room, j.req.to_prefill)
            batch.append((j, n))
            room -= n
        # Round robin: a long prompt does not hold the ones behind it for its whole length.
        self._jobs = [j for j in self._jobs if all(j is not b for b, _ in batch)] + [
            j for j, _ in batch
        ]
        return batch

    def _pass(self, batch: list[tuple[Job, int]]) -> list[tuple[Job, mx.array | None]]:
        model = batch[0][0].req.lm.model
        layers = len(model.model.layers)
        reqs = [j.req for j, _ in batch]
        toks = [
            r.prompt[r.prefilled : r.prefilled + n] for r, (_, n) in zip(reqs, batch, strict=True)
        ]
        caches = [r.cache for r in reqs]
        hs: list[mx.array | None] = [None] * len(batch)
        outs: list[mx.array | None] = [None] * len(batch)
        for li in range(layers):
            self._open.wait()
            if all(j.cancelled for j, _ in batch):
                return [(j, None) for j, _ in batch]
            end = None if li == layers - 1 else li + 1
            chunks = [
                Chunk(t, c, logits=end is None and len(t) == r.to_prefill, first=li, end=end, h=h)
                for t, c, r, h in zip(toks, caches, reqs, hs, strict=True)
            ]
            _, outs = fused_step(model, [], [], chunks)
            # One layer at a time: see the module's docstring.
            mx.eval([o for o in outs if o is not None], [s for c in caches for s in c[li].state])
            hs = outs
        results: list[tuple[Job, mx.array | None]] = []
        for (job, n), out in zip(batch, outs, strict=True):
            job.req.prefilled += n
            results.append((job, out if job.req.to_prefill == 0 else None))
        return results

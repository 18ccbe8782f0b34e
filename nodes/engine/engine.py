"""The node's engine: a step loop over every request it holds.

Each `step()` runs one plan from `pacing.Pacer`: one decode token for every
request past its prefill, then prompt chunks (a long prompt's through a few
layers, its hidden state kept until the next step) within what the stall bound
leaves. Where the node has a prefill lane (`lane.py`: MLX's CPU backend, 2+
cores), a prompt waiting while streams decode goes to the lane instead and joins
the batch at the step after it lands. Requests join and leave at any step, each
with its own KV cache and sampler; a request's cache is dropped the moment it
finishes or is cancelled.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from exo.nodes.engine.batch import Batch, sample_rows
from exo.nodes.engine.lane import Lane, lane_default
from exo.nodes.engine.mlxenv import blas_max_threads, blas_threads, mx
from exo.nodes.engine.model import LoadedModel, kv_bytes_per_token
from exo.nodes.engine.pacing import DEFAULT_IDLE_BUDGET, DEFAULT_MAX_STALL, Pacer
from exo.nodes.engine.request import EngineError, Output, Request, encode_prompt
from exo.nodes.engine.sampling import Sampler, SamplingParams, StopMatcher
from exo.nodes.engine.scheduler import StepPlan, Work
from exo.nodes.engine.threads import ThreadChoice, for_step
from exo.nodes.engine.watch import DEFAULT_MAX_TTFT_RATIO, YIELD_S, Watch
from exo.nodes.pipeline.head import Head

log = logging.getLogger(__name__)


# Queue the next decode step before this one's tokens are read back, so building
# its graph overlaps compute (as mlx-lm's generate_step does). Not on MLX's CPU
# backend: there a stream runs its tasks in order and an eval waits behind
# everything queued before it, and async_eval of a step's graph returned only
# once it was nearly computed: each step's tokens came back a step late, and the
# first step of each chain (after any join) took two steps' time (0.45 s vs 0.22).
QUEUE_AHEAD = mx.default_device() != mx.cpu

# Keys of room past the prompt in its cache: the cache becomes its decode group's
# as it is when the request joins the batch, with room to grow ahead (batch.py).
JOIN_ROOM = 64


def default_kv_budget() -> int:
    """KV cache memory the engine may reserve: a quarter of what is free now."""
    import psutil

    return psutil.virtual_memory().available // 4


@dataclass
class Prefetched:
    """A decode step already queued: its rows and their (lazy) next tokens."""

    rids: list[str]
    toks: mx.array


def in_row_order(groups: list[tuple[list[Request], mx.array]], rids: list[str]) -> mx.array:
    """The tokens of `groups` (as sample_rows returns them) for `rids`, in that order."""
    at = {r.rid: i for i, r in enumerate(r for reqs, _ in groups for r in reqs)}
    flat = mx.concatenate([toks.reshape(-1) for _, toks in groups])
    return flat[mx.array([at[r] for r in rids])]


class Engine:
    """Continuous batching: requests join and leave the decode batch at any step."""

    def __init__(
        self,
        prefill_budget: int | None = None,
        idle_budget: int = DEFAULT_IDLE_BUDGET,
        kv_budget: int | None = None,
        max_stall: float = DEFAULT_MAX_STALL,
        lane: bool | None = None,
        max_ttft_ratio: float = DEFAULT_MAX_TTFT_RATIO,
    ) -> None:
        self.pace = Pacer(prefill_budget, idle_budget, max_stall)
        # Prompts arriving while streams decode prefill beside them on another core
        # (lane.py); None: where that pays (MLX's CPU backend, 2+ cores).
        self.lane = Lane() if (lane_default() if lane is None else lane) else None
        self.watch = Watch(self.lane, max_ttft_ratio) if self.lane is not None else None
        # (rid, code, why): requests the engine gave up on, owed an error
        self._failed: list[tuple[str, str, str]] = []
        self.step_faults: Counter[str] = Counter()  # model -> its steps that raised, in a row
        self.kv_budget = kv_budget if kv_budget is not None else default_kv_budget()
        self.models: dict[str, LoadedModel] = {}
        self.fused: dict[str, bool] = {}
        self.requests: OrderedDict[str, Request] = OrderedDict()  # admitted
        self.queue: deque[Request] = deque()  # waiting for KV memory
        self.batches: dict[str, Batch] = {}
        self.prefetched: dict[str, Prefetched] = {}
        # Models this node heads a pipeline of: their steps out, their drops owed.
        self.head = Head()
        # OpenBLAS's threads for decode-only steps, by batch size (threads.py).
        self.threads = ThreadChoice() if blas_max_threads() > 1 else None
        self.steps = 0
        self.last_plan = StepPlan()

    # -- membership -----------------------------------------------------------------

    def add_model(self, lm: LoadedModel) -> None:
        from exo.nodes.engine.forward import matmul_table

        self.models[lm.model_id] = lm
        self.fused[lm.model_id] = lm.fused
        self.pace.add_model(lm.model_id, self.fused[lm.model_id], matmul_table(lm.model))
        # Rows of very different lengths attend in separate groups, which only the
        # fused step runs (and a pipeline's later stages follow one group).
        self.batches.setdefault(
            lm.model_id, Batch(split=self.fused[lm.model_id] and lm.part is None)
        )

    def remove_model(self, model_id: str) -> list[str]:
        """Unload a model; returns the requests that ended with it."""
        gone = self.fail_remote(model_id)
        self.pace.remove_model(model_id)
        self.head.forget(model_id)
        for d in (self.models, self.fused, self.batches, self.prefetched):
            d.pop(model_id, None)
        return gone

    def submit(self, rid: str, model_id: str, kind: str, payload: Any, params: dict) -> Request:
        lm = self.models.get(model_id)
        if lm is None:
            raise EngineError(
                503, "model_not_loaded", f"model {model_id} is not loaded on this node"
            )
        if rid in self.requests or any(r.rid == rid for r in self.queue):
            raise EngineError(409, "duplicate_request", f"request {rid} already running")
        try:
            sp = SamplingParams.from_wire(params)
        except ValueError as e:
            raise EngineError(400, "invalid_params", str(e)) from None
        prompt = encode_prompt(lm, kind, payload)
        if len(prompt) >= lm.context:
            raise EngineError(
                400,
                "context_length_exceeded",
                f"prompt is {len(prompt)} tokens; the model's context is {lm.context}",
            )
        need = (len(prompt) + min(sp.max_tokens, lm.context - len(prompt))) * kv_bytes_per_token(
            lm.model
        )
        cap = min(self.kv_budget, lm.kv_cap if lm.kv_cap is not None else self.kv_budget)
        if need > cap:
            where = "the node" if cap == self.kv_budget else "the instance's tightest stage"
            raise EngineError(
                400,
                "kv_budget_exceeded",
                f"this request needs {need >> 20} MiB of KV cache; {where} allows {cap >> 20} MiB",
            )
        req = Request(
            rid=rid,
            lm=lm,
            prompt=prompt,
            params=sp,
            wire=params,
            sampler=Sampler(sp),
            cache=None,
            stop=StopMatcher(sp.stop),
            detok=lm.tokenizer.detokenizer,
            kv_reserved=need,
        )
        self.queue.append(req)
        self._admit()
        return req

    def _admit(self) -> None:
        from mlx_lm.models.cache import KVCache

        from exo.nodes.engine.span import new_cache

        reserved = sum(r.kv_reserved for r in self.requests.values())
        while self.queue and reserved + self.queue[0].kv_reserved <= self.kv_budget:
            head = self.queue[0]
            if head.lm.kv_cap is not None:
                mine = sum(r.kv_reserved for r in self.requests.values() if r.lm is head.lm)
                if mine + head.kv_reserved > head.lm.kv_cap:
                    break  # a later stage of its instance would run out first
            req = self.queue.popleft()
            req.cache = new_cache(req.lm.layers)
            for c in req.cache:
                # One buffer for the whole prompt: a cache that grows 256 keys at a
                # time copies itself each time, a spike in the step that does it.
                if isinstance(c, KVCache):
                    c.step = -(-(len(req.prompt) + JOIN_ROOM) // KVCache.step) * KVCache.step
            self.requests[req.rid] = req
            reserved += req.kv_reserved
            log.debug("rid=%s admitted: %d prompt tokens", req.rid, len(req.prompt))

    def cancel(self, rid: str) -> bool:
        for q in self.queue:
            if q.rid == rid:
                self.queue.remove(q)
                log.info("rid=%s cancelled while queued", rid)
                return True
        req = self.requests.pop(rid, None)
        if req is None:
            return False
        if req.in_lane and self.lane is not None:
            self.lane.cancel(rid)
        self._release(req)
        log.info("rid=%s cancelled after %d tokens", rid, req.generated)
        self._admit()
        return True

    def _release(self, req: Request) -> None:
        req.cache = req.h = None
        if req.lm.part is not None:
            self.head.drop(req.lm.model_id, req.rid)
        batch = self.batches[req.lm.model_id]
        batch.leave({req.rid})
        ready = self.prefetched.get(req.lm.model_id)
        if ready is not None and req.rid in ready.rids:
            # The queued step's tokens, for the rows left, in their new order (the
            # batch's last row took the cancelled one's place).
            if batch.rids:
                at = {r: i for i, r in enumerate(ready.rids)}
                ready.toks = ready.toks[mx.array([at[r] for r in batch.rids])]
                ready.rids = list(batch.rids)
            else:
                del self.prefetched[req.lm.model_id]

    # -- the step -------------------------------------------------------------------

    def plan(self) -> StepPlan:
        busy = self.head.busy()
        decoding = [rid for m, b in self.batches.items() if m not in busy for rid in b.rids]
        # A model whose decodes were queued ahead starts new prompts a step later:
        # its decodes are already computed, and a chunk run beside them would be a
        # second pass over the weights (the streams' step doubled, 0.47 s here).
        held = busy | self.prefetched.keys()
        waiting = [
            r
            for r in self.requests.values()
            if r.cache is not None and not r.in_lane and r.lm.model_id not in held
        ]
        return self.pace.plan(decoding, waiting, {m: len(b.rids) for m, b in self.batches.items()})

    def step(self) -> list[Output]:
        from exo.nodes.engine.forward import Chunk

        landed = self._to_lane()
        step = self.plan()
        self.last_plan = step
        # Later stages free a request's memory when the next step names it in `drops`:
        # with nothing else to do, a step goes out just to carry them.
        flush = self.head.owed()
        if step.empty and not flush and not landed:
            return []
        self.steps += 1
        t0 = time.perf_counter()
        sampled: list[tuple[list[Request], mx.array]] = []
        joined: list[Request] = []
        by_model: dict[str, list[tuple[Request, Chunk]]] = {}
        # this node's chunks and their model, for the cost model
        work: list[Work] = []
        work_model = ""
        # Steps beside the lane's work say nothing of the streams' own step time.
        timed = not self.lane_working()
        for req, logits in landed:
            sampled.append(([req], req.sampler(logits)[None]))
            joined.append(req)
        for rid, n in step.prefill:
            req = self.requests[rid]
            assert req.cache is not None
            layers = req.lm.layers
            first, end = step.spans.get(rid, (0, layers))
            chunk = Chunk(
                req.prompt[req.prefilled : req.prefilled + n],
                req.cache,
                logits=n == req.to_prefill and end == layers,
                first=first,
                end=end,
                h=req.h,
            )
            by_model.setdefault(req.lm.model_id, []).append((req, chunk))
        active = {*by_model, *flush, *(m for m, b in self.batches.items() if b.rids)}
        active -= self.head.busy()
        # OpenBLAS's threads and the decode rows' padding (threads.py): a step of decodes
        # only, all computed here, is the kind the thread choice times and steers.
        dec_rows = sum(len(self.batches[m].rids) for m in active)
        pure = (
            bool(dec_rows)
            and not landed
            and not by_model
            and not self.prefetched
            and all(self.models[m].part is None for m in active)
        )
        lane_holds = self.lane is not None and self.lane.single_blas
        option, pad_to = for_step(self.threads, dec_rows, pure, lane_holds, blas_max_threads())
        for model_id in active:
            chunks = by_model.get(model_id, [])
            try:
                m_sampled, m_joined, m_work, untimed = self._model_step(
                    model_id, chunks, pad_to, t0
                )
            except Exception as e:
                # Its requests' caches may be half-written: they end (never a wrong
                # token); the other models' requests in this step go on.
                self._fail_model_step(model_id, chunks, e)
                continue
            self.step_faults.pop(model_id, None)
            sampled += m_sampled
            joined += m_joined
            work += m_work
            timed = timed and not untimed
            work_model = work_model or (model_id if chunks and m_work else "")
        if not sampled:
            return []
        # (The lane's prompts are its own to evaluate, on its thread and stream.)
        states = [
            c.state
            for r in self.requests.values()
            if r.cache is not None and not r.in_lane
            for c in r.cache
        ]
        states += [r.h for r in self.requests.values() if r.h is not None]
        if (
            QUEUE_AHEAD
            and not joined
            and not self.queue
            and all(r.cache is None for r in self.requests.values())
        ):
            self._prefetch(sampled)
        if option is not None:
            blas_threads(option.threads)  # (nothing else is inside BLAS between steps)
        mx.eval([t for _, t in sampled], states)
        seconds = time.perf_counter() - t0
        if timed:
            self.pace.learn(step, work, work_model, seconds)
        if self.threads is not None and option is not None and pure:
            self.threads.learn(dec_rows, option, seconds)
        pace = self.pace
        if work or pace.t_ref is not None:
            log.debug(
                "step %d: %.4fs, %d decodes, chunks %s, predicted +%.4fs, baseline %s (%s), "
                "cost %s",
                self.steps,
                seconds,
                len(step.decode),
                [(n, k, round(f, 3)) for n, k, f in work],
                pace.predicted if work else 0.0,
                pace.t_decode,
                pace.t_ref[1] if pace.t_ref else None,
                pace.cost.theta,
            )
        return self._complete(
            [(r, t) for reqs, toks in sampled for r, t in zip(reqs, toks.tolist(), strict=True)],
            joined,
        )

    def _model_step(
        self,
        model_id: str,
        chunks: list[tuple[Request, Any]],
        pad_to: int | None,
        t0: float,
    ) -> tuple[list[tuple[list[Request], mx.array]], list[Request], list[Work], bool]:
        """One model's part of the step: its decode rows and prompt chunks through
        the model (or, for stage 0 of a pipeline, sent on). -> the tokens it samples,
        the requests that finished their prompts, its chunks' work for the cost model,
        and whether its time says nothing of the step's cost (its decodes came
        computed from the last step)."""
        from exo.nodes.engine.forward import step_forward

        batch, lm = self.batches[model_id], self.models[model_id]
        rows = [self.requests[r] for r in batch.rids]
        sampled: list[tuple[list[Request], mx.array]] = []
        joined: list[Request] = []
        if lm.part is not None:
            self.head.send(lm, batch, rows, chunks, self.steps, t0)
            return sampled, joined, [], False
        work: list[Work] = [
            (len(c.tokens), r.prefilled, ((c.end or r.lm.layers) - c.first) / r.lm.layers)
            for r, c in chunks
        ]
        batch.grow_ahead()
        untimed = False
        ready = self.prefetched.pop(model_id, None)
        if ready is not None and ready.rids == batch.rids:
            # This step's decodes were computed during the last one, so its time
            # says nothing about what its chunks add to a decode step.
            untimed = bool(chunks)
            _, chunk_logits = step_forward(
                lm.model, [], [], [c for _, c in chunks], self.fused[model_id], 1, lm.span
            )
            sampled.append((rows, ready.toks))
        else:
            dec_logits, chunk_logits = step_forward(
                lm.model,
                [r.last for r in rows],
                batch.dec_groups(),
                [c for _, c in chunks],
                self.fused[model_id],
                pad_to,
                lm.span,
            )
            if rows:
                assert dec_logits is not None
                sampled.extend(sample_rows(rows, dec_logits))
        for (req, chunk), logits in zip(chunks, chunk_logits, strict=True):
            if chunk.end is not None and chunk.end < req.lm.layers:
                req.inflight, req.through, req.h = len(chunk.tokens), chunk.end, logits
                continue
            req.inflight, req.through, req.h = 0, 0, None
            req.prefilled += len(chunk.tokens)
            if logits is not None:
                sampled.append(([req], req.sampler(logits)[None]))
                joined.append(req)
        return sampled, joined, work, untimed

    def _fail_model_step(
        self, model_id: str, chunks: list[tuple[Request, Any]], e: Exception
    ) -> None:
        log.exception("model %s: step %d failed", model_id, self.steps)
        why = f"the step of {model_id} failed: {type(e).__name__}: {e}"
        self.prefetched.pop(model_id, None)
        for rid in [*self.batches[model_id].rids, *(r.rid for r, _ in chunks)]:
            if self.cancel(rid):
                self._failed.append((rid, "step_failed", why))
        self.step_faults[model_id] += 1

    def _to_lane(self) -> list[tuple[Request, mx.array]]:
        """Hand the lane the prompts waiting beside running decodes, and take back
        the ones it has prefilled (their last logits), to sample and join this step."""
        if self.lane is None:
            return []
        landed = []
        for got, logits in self.lane.take():
            got.in_lane = False
            if self.requests.get(got.rid) is not got:
                continue  # cancelled meanwhile
            assert got is not None  # (mypy narrows `got` by the identity test above)
            if logits is None:
                self.requests.pop(got.rid)
                self._release(got)
                why = "the prompt's prefill failed on this node"
                self._failed.append((got.rid, "prefill_error", why))
                continue
            landed.append((got, logits))
        self.lane.release_blas()
        assert self.watch is not None
        if self.watch.check():
            self.lane.wait_layer(YIELD_S)
        busy = self.head.busy()
        if any(b.rids for m, b in self.batches.items() if m not in busy):
            for req in self.requests.values():
                if (
                    req.cache is not None
                    and req.to_prefill
                    and not req.in_lane
                    and not req.inflight
                    and req.lm.part is None
                    and self.fused[req.lm.model_id]
                    and req.lm.model_id not in busy
                ):
                    req.in_lane = True
                    self.lane.submit(req)
        return landed

    def finish_remote(self, model_id: str, step: int, ids: list[int]) -> list[Output]:
        """The last stage's tokens for a step this node began: decode rows in
        batch order, then the chunks that finished their prompts."""
        w = self.head.back(model_id, step)
        if w is None:
            log.warning("tokens for step %d of %s that nobody waits for", step, model_id)
            return []
        self.pace.learn(w.plan, w.work, model_id, time.perf_counter() - w.t0)
        done = [r for r in w.chunks if r.prefilled == len(r.prompt)]
        if len(ids) != len(w.rows) + len(done):
            raise EngineError(500, "stage_error", f"the last stage sent {len(ids)} tokens")
        pairs = list(zip([*w.rows, *done], ids, strict=True))
        # A request cancelled while the step was away gets nothing.
        live = [(r, t) for r, t in pairs if self.requests.get(r.rid) is r]
        return self._complete(live, done)

    def fail_remote(self, model_id: str) -> list[str]:
        """A later stage failed: every request of the model ends here."""
        self.head.abandon(model_id)
        gone = [r.rid for r in [*self.requests.values(), *self.queue] if r.lm.model_id == model_id]
        for rid in gone:
            self.cancel(rid)
        return gone

    def _complete(self, sampled: list[tuple[Request, int]], joined: list[Request]) -> list[Output]:
        outputs: list[Output] = []
        finished = False
        for req, tok in sampled:
            out = req.emit(tok)
            outputs.append(out)
            if out.finish:
                self.requests.pop(req.rid, None)
                self._release(req)
                finished = True
        # A request done at its first token never joins: joining pads every row of
        # the batch to its length, for nothing.
        joining = [r for r in joined if r.rid in self.requests]
        for i, req in enumerate(joining):
            assert req.cache is not None
            coming = sum(r.lm is req.lm for r in joining[i + 1 :])
            self.batches[req.lm.model_id].join(req.rid, req.cache, coming)
            req.cache = None
        if finished:
            self._admit()
        return outputs

    def _prefetch(self, sampled: list[tuple[list[Request], mx.array]]) -> None:
        """Queue the next decode step before this one is read back (as mlx-lm's
        generate_step does), so building its graph overlaps this step's compute.
        Only for pure decode: a step with prefill work is planned afresh."""
        from exo.nodes.engine.forward import fused_step

        have = {r.rid for reqs, _ in sampled for r in reqs}
        for model_id, batch in self.batches.items():
            if not batch.rids or not have.issuperset(batch.rids):
                continue
            rows = [self.requests[r] for r in batch.rids]
            last = in_row_order(sampled, batch.rids)
            model = self.models[model_id].model
            if self.fused[model_id]:
                logits, _ = fused_step(model, last, batch.dec_groups(), [])
                assert logits is not None
            else:
                logits = model(last[:, None], cache=batch.cache)[:, -1, :]
            toks = in_row_order(sample_rows(rows, logits), batch.rids)
            mx.async_eval(toks)
            self.prefetched[model_id] = Prefetched(list(batch.rids), toks)

    def close(self) -> None:
        """Before the process exits: the lane's pass in hand finished (lane.close)."""
        if self.lane is not None:
            self.lane.close()

    def fail_step(self) -> list[tuple[str, str]]:
        """After step() raised: end the requests it carried (decode rows of models not
        waiting on a later stage, prompt chunks, prompts just back from the lane),
        whose caches it may have left half-written. -> (rid, model) of each."""
        busy = self.head.busy()
        chunked = {rid for rid, _ in self.last_plan.prefill}
        carried = [
            r
            for r in self.requests.values()
            if (r.cache is None and r.lm.model_id not in busy)
            or r.rid in chunked
            or (r.cache is not None and not r.in_lane and r.to_prefill == 0)
        ]
        for r in carried:
            self.prefetched.pop(r.lm.model_id, None)
            self.cancel(r.rid)
        return [(r.rid, r.lm.model_id) for r in carried]

    def take_failed(self) -> list[tuple[str, str, str]]:
        """(rid, error code, why) of the requests the engine gave up on since the last
        call: they are gone from it, and their clients are owed an error."""
        out, self._failed = self._failed, []
        return out

    def lane_working(self) -> bool:
        """Whether the prefill lane has prompts in hand (they join once landed)."""
        return self.lane is not None and not self.lane.idle()

    def runnable(self) -> bool:
        """Whether step() has anything to do now (the lane's prompts: once landed)."""
        if self.lane is not None and self.lane.landed():
            return True
        busy = self.head.busy()
        return any(
            r.lm.model_id not in busy and not r.in_lane for r in self.requests.values()
        ) or bool(self.head.owed())

    # -- status ---------------------------------------------------------------------

    def prefilling(self) -> list[tuple[str, int, int]]:
        """(rid, prompt tokens done, prompt tokens) of requests part-way through prefill."""
        return [
            (r.rid, r.prefilled, len(r.prompt))
            for r in self.requests.values()
            if r.cache is not None and r.prefilled
        ]

    def kv_bytes(self) -> int:
        return sum(b.nbytes() for b in self.batches.values()) + sum(
            r.kv_bytes() for r in self.requests.values()
        )

    def status(self) -> dict[str, Any]:
        running = sum(len(b.rids) for b in self.batches.values())
        return {
            "running": running,
            "prefilling": len(self.requests) - running,
            "queued": len(self.queue),
            "kv_bytes": self.kv_bytes(),
            "kv_reserved": sum(r.kv_reserved for r in self.requests.values()),
            "kv_budget": self.kv_budget,
            "kv_caps": {m: lm.kv_cap for m, lm in self.models.items() if lm.kv_cap is not None},
            "loaded": sorted(self.models),
            "steps": self.steps,
            "step_s": self.pace.t_decode,
            # batch size -> OpenBLAS's threads and the rows its matmuls see
            "blas_threads": {
                str(n): {"threads": o.threads or blas_max_threads(), "rows": o.rows(n)}
                for n, o in self.threads.chosen.items()
            }
            if self.threads
            else {},
            "prefill_cost": self.pace.cost.theta,
            "lane": self.watch.status() if self.watch is not None else None,
        }

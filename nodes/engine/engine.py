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
from collections import Counter
from typing import Any

from exo.nodes.engine.ahead import QUEUE_AHEAD, queue_ahead
from exo.nodes.engine.batch import Batch, sample_rows
from exo.nodes.engine.book import Book
from exo.nodes.engine.forward import Chunk
from exo.nodes.engine.lane import Lane, lane_default
from exo.nodes.engine.mlxenv import blas_max_threads, blas_threads, ints, mx
from exo.nodes.engine.model import LoadedModel
from exo.nodes.engine.pacing import DEFAULT_IDLE_BUDGET, DEFAULT_MAX_STALL, Pacer
from exo.nodes.engine.request import EngineError, Output, Request
from exo.nodes.engine.scheduler import Executed, StepPlan, Work
from exo.nodes.engine.threads import ThreadChoice, for_step
from exo.nodes.engine.watch import DEFAULT_MAX_TTFT_RATIO, YIELD_S, Watch
from exo.nodes.pipeline.stage0 import StepLogprobs

log = logging.getLogger(__name__)


class Engine(Book):
    """Continuous batching: requests join and leave the decode batch at any step."""

    def __init__(
        self,
        prefill_budget: int | None = None,
        idle_budget: int = DEFAULT_IDLE_BUDGET,
        kv_budget: int | None = None,
        max_stall: float = DEFAULT_MAX_STALL,
        lane: bool | None = None,
        max_ttft_ratio: float = DEFAULT_MAX_TTFT_RATIO,
        prefix_limit: int | None = None,
    ) -> None:
        # Prompts arriving while streams decode prefill beside them on another core
        # (lane.py); None: where that pays (MLX's CPU backend, 2+ cores).
        lane_on = lane_default() if lane is None else lane
        super().__init__(kv_budget, Lane() if lane_on else None, prefix_limit)
        self.pace = Pacer(prefill_budget, idle_budget, max_stall)
        self.watch = Watch(self.lane, max_ttft_ratio) if self.lane is not None else None
        self.step_faults: Counter[str] = Counter()  # model -> its steps that raised, in a row
        # OpenBLAS's threads for decode-only steps, by batch size (threads.py).
        self.threads = ThreadChoice() if blas_max_threads() > 1 else None
        self.steps = 0

    # -- membership -----------------------------------------------------------------

    def add_model(self, lm: LoadedModel) -> None:
        from exo.nodes.engine.forward import matmul_table
        from exo.nodes.engine.prefix import supports

        self.models[lm.model_id] = lm
        self.prefix.drop(lm.model_id)  # (a model loaded anew: nothing cached is its)
        if supports(lm):
            self.prefix_models.add(lm.model_id)
        self.pace.add_model(lm.model_id, lm.fused, matmul_table(lm.model))
        # Rows of very different lengths attend in separate groups, which only the
        # fused step runs (and a pipeline's later stages follow one group).
        self.batches.setdefault(lm.model_id, Batch(split=lm.fused and lm.part is None))

    def remove_model(self, model_id: str) -> list[str]:
        """Unload a model; returns the requests that ended with it."""
        gone = self.fail_remote(model_id)
        self.pace.remove_model(model_id)
        self.stage0.forget(model_id)
        self.prefix.drop(model_id)
        self.prefix_models.discard(model_id)
        for d in (self.models, self.batches, self.prefetched):
            d.pop(model_id, None)
        return gone

    # -- the step -------------------------------------------------------------------

    def plan(self) -> StepPlan:
        busy = self.stage0.busy()
        decoding = [rid for m, b in self.batches.items() if m not in busy for rid in b.rids]
        # A model whose decodes were queued ahead starts new prompts a step later:
        # its decodes are already computed, and a chunk run beside them would be a
        # second pass over the weights (the streams' step doubled).
        held = busy | self.prefetched.keys()
        waiting = [
            r
            for r in self.requests.values()
            if r.cache is not None and not r.in_lane and r.lm.model_id not in held
        ]
        return self.pace.plan(decoding, waiting, {m: len(b.rids) for m, b in self.batches.items()})

    def status(self) -> dict[str, Any]:
        from exo.nodes.engine.report import status

        return status(self)

    def step(self) -> list[Output]:
        """One step: the plan (pacing.Pacer, from the engine's state), its
        execution (each model's decode rows and prompt chunks through the model,
        or sent on to the later stages), and its commit (tokens out, requests
        that finished leave, prompts that finished join the batch). What the
        step took is learnt after (`_observe`)."""
        landed = self._to_lane()
        plan = self.plan()
        self.last_plan = plan
        # Later stages free a request's memory when the next step names it in `drops`:
        # with nothing else to do, a step goes out just to carry them.
        flush = self.stage0.owed()
        if plan.empty and not flush and not landed:
            return []
        self.steps += 1
        t0 = time.perf_counter()
        run = self._execute(plan, landed, flush, t0)
        if not run.sampled:
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
            and not run.joined
            and not self.queue
            and all(r.cache is None for r in self.requests.values())
        ):
            self.prefetched = queue_ahead(run.sampled, self.models, self.batches, self.requests)
        if run.option is not None:
            blas_threads(run.option.threads)  # (nothing else is inside BLAS between steps)
        mx.eval([t for _, t in run.sampled], states)
        self._observe(plan, run, time.perf_counter() - t0)
        pairs = [
            (r, t) for reqs, toks in run.sampled for r, t in zip(reqs, ints(toks), strict=True)
        ]
        return self._complete(pairs, run.joined)

    def _chunks(self, plan: StepPlan) -> dict[str, list[tuple[Request, Chunk]]]:
        """The plan's prompt chunks, by model."""
        by_model: dict[str, list[tuple[Request, Chunk]]] = {}
        for rid, n in plan.prefill:
            req = self.requests[rid]
            assert req.cache is not None
            layers = req.lm.layers
            first, end = plan.spans.get(rid, (0, layers))
            chunk = Chunk(
                req.prompt[req.prefilled : req.prefilled + n],
                req.cache,
                logits=n == req.to_prefill and end == layers,
                every=req.scored is not None,
                first=first,
                end=end,
                h=req.h,
            )
            by_model.setdefault(req.lm.model_id, []).append((req, chunk))
        return by_model

    def _execute(
        self,
        plan: StepPlan,
        landed: list[tuple[Request, mx.array]],
        flush: set[str],
        t0: float,
    ) -> Executed:
        """Every active model's part of the step, each on its own (a model whose
        part raises fails its own requests only)."""
        by_model = self._chunks(plan)
        run = Executed(timed=not self.lane_working())  # beside the lane: says nothing
        for req, logits in landed:
            run.sampled.append(([req], req.sampler(logits)[None]))
            run.joined.append(req)
        active = {*by_model, *flush, *(m for m, b in self.batches.items() if b.rids)}
        active -= self.stage0.busy()
        # OpenBLAS's threads and the decode rows' padding (threads.py): a step of decodes
        # only, all computed here, is the kind the thread choice times and steers.
        run.dec_rows = sum(len(self.batches[m].rids) for m in active)
        run.pure = (
            bool(run.dec_rows)
            and not landed
            and not by_model
            and not self.prefetched
            and all(self.models[m].part is None for m in active)
        )
        lane_holds = self.lane is not None and self.lane.single_blas
        run.option, pad_to = for_step(
            self.threads, run.dec_rows, run.pure, lane_holds, blas_max_threads()
        )
        for model_id in active:
            chunks = by_model.get(model_id, [])
            try:
                sampled, joined, work, untimed = self._model_step(model_id, chunks, pad_to, t0)
            except Exception as e:
                # Its requests' caches may be half-written: they end (never a wrong
                # token); the other models' requests in this step go on.
                self._fail_model_step(model_id, chunks, e)
                continue
            self.step_faults.pop(model_id, None)
            run.sampled += sampled
            run.joined += joined
            run.work += work
            run.timed = run.timed and not untimed
            run.work_model = run.work_model or (model_id if chunks and work else "")
        return run

    def _observe(self, plan: StepPlan, run: Executed, seconds: float) -> None:
        """What a finished step teaches: the prefill cost model, the thread choice."""
        if run.timed:
            self.pace.learn(plan, run.work, run.work_model, seconds)
        if self.threads is not None and run.option is not None and run.pure:
            self.threads.learn(run.dec_rows, run.option, seconds)
        pace = self.pace
        if run.work or pace.t_ref is not None:
            work = [(n, k, round(f, 3)) for n, k, f in run.work]
            log.debug(
                "step %d: %.4fs, %d decodes, chunks %s, predicted +%.4fs, baseline %s (%s), "
                "cost %s", self.steps, seconds, len(plan.decode), work,
                pace.predicted if run.work else 0.0, pace.t_decode,
                pace.t_ref[1] if pace.t_ref else None, pace.cost.theta,
            )  # fmt: skip

    def _model_step(
        self,
        model_id: str,
        chunks: list[tuple[Request, Chunk]],
        pad_to: int,
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
        gone = self.prefix.gone.pop(model_id, [])  # cached prefixes let go
        if lm.part is not None:
            self.stage0.cache_forget(model_id, gone)  # (the later stages' parts too)
            self.stage0.send(lm, batch, rows, chunks, self.steps, t0)
            return sampled, joined, [], False
        work: list[Work] = [
            (len(c.tokens), r.prefilled, ((c.end or r.lm.layers) - c.first) / r.lm.layers)
            for r, c in chunks
        ]
        batch.grow_ahead()
        untimed, cs = False, [c for _, c in chunks]
        ready = self.prefetched.pop(model_id, None)
        if ready is not None and ready.rids == batch.rids:
            # This step's decodes were computed during the last one, so its time
            # says nothing about what its chunks add to a decode step.
            untimed = bool(chunks)
            _, chunk_logits = step_forward(lm.model, [], [], cs, lm.fused, 1, lm.span)
            sampled.append((rows, ready.toks))
        else:
            last, groups = [r.last for r in rows], batch.dec_groups()
            dec_logits, chunk_logits = step_forward(
                lm.model, last, groups, cs, lm.fused, pad_to, lm.span
            )
            if rows:
                assert dec_logits is not None
                sampled.extend(sample_rows(rows, dec_logits))
        for (req, chunk), logits in zip(chunks, chunk_logits, strict=True):
            if chunk.end is not None and chunk.end < req.lm.layers:
                req.inflight, req.through, req.h = len(chunk.tokens), chunk.end, logits
                continue
            req.inflight, req.through, req.h = 0, 0, None
            if chunk.every and logits is not None:
                req.score(logits)  # (its prompt's log probabilities, echo)
                logits = logits[-1] if chunk.logits else None
            req.prefilled += len(chunk.tokens)
            if logits is not None:
                sampled.append(([req], req.sampler(logits)[None]))
                joined.append(req)
        return sampled, joined, work, untimed

    def _fail_model_step(
        self, model_id: str, chunks: list[tuple[Request, Chunk]], e: Exception
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
        busy = self.stage0.busy()
        if any(b.rids for m, b in self.batches.items() if m not in busy):
            for req in self.requests.values():
                if (
                    req.cache is not None
                    and req.to_prefill
                    and not req.in_lane
                    and not req.inflight
                    and req.lm.part is None
                    and req.lm.fused
                    and req.scored is None  # (the lane takes the last logits only)
                    and req.lm.model_id not in busy
                ):
                    req.in_lane = True
                    self.lane.submit(req)
        return landed

    def finish_remote(
        self, model_id: str, step: int, ids: list[int], logprobs: StepLogprobs | None = None
    ) -> list[Output]:
        """The last stage's tokens for a step this node began: decode rows in
        batch order, then the chunks that finished their prompts (and the log
        probabilities the last stage computed for those that ask)."""
        w = self.stage0.back(model_id, step)
        if w is None:
            log.warning("tokens for step %d of %s that nobody waits for", step, model_id)
            return []
        self.pace.learn(w.plan, w.work, model_id, time.perf_counter() - w.t0)
        done = [r for r in w.chunks if r.prefilled == len(r.prompt)]
        if len(ids) != len(w.rows) + len(done):
            raise EngineError(500, "stage_error", f"the last stage sent {len(ids)} tokens")
        pairs = list(zip([*w.rows, *done], ids, strict=True))
        # A request cancelled while the step was away gets nothing.
        live = [(r, t) for r, t in pairs if r.rid in self.requests and self.requests[r.rid] is r]
        for r, _ in live:
            if r.params.logprobs is not None:
                r.sampler.logprobs.extend((logprobs or {}).get(r.rid, [])[:1])
        return self._complete(live, done)

    def _complete(self, sampled: list[tuple[Request, int]], joined: list[Request]) -> list[Output]:
        outputs: list[Output] = []
        finished = False
        for req, tok in sampled:
            if req.lm.part is None:  # (a split model's last stage samples and keeps it)
                req.sampler.accept(tok)
            out = req.emit(tok)
            outputs.append(out)
            if out.finish:
                self.requests.pop(req.rid, None)
                self.keep_prefix(req)
                self._release(req)
                finished = True
        # A request done at its first token never joins: joining pads every row of
        # the batch to its length, for nothing.
        joining = [r for r in joined if r.rid in self.requests]
        for i, req in enumerate(joining):
            assert req.cache is not None
            self.keep_prefix(req)
            coming = sum(r.lm is req.lm for r in joining[i + 1 :])
            self.batches[req.lm.model_id].join(req.rid, req.cache, coming)
            req.cache = None
        if finished or joining:  # (a prompt just cached may be what the queue waits for)
            self._admit()
        return outputs

    def close(self) -> None:
        """Before the process exits: the lane's pass in hand finished (lane.close)."""
        if self.lane is not None:
            self.lane.close()

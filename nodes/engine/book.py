"""The engine's book of requests: which it holds and in what state, what their
KV may take, and how they end. The step (engine.py) works from it.

A request is queued until its KV fits the node's budget (and, at stage 0 of a
split model, the tightest later stage's: `LoadedModel.kv_cap`), then admitted
with a cache of its own; it prefills (here in chunks or in the prefill lane),
joins its model's decode batch, and leaves it when it finishes, is cancelled,
or its model goes. Whatever ends is freed at once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque

import msgspec
import numpy as np

from exo.broker.protocol import Payload
from exo.common.digests import chain
from exo.common.sampling import DEFAULT_MAX_TOKENS
from exo.nodes.engine.ahead import Prefetched
from exo.nodes.engine.batch import Batch
from exo.nodes.engine.lane import Lane
from exo.nodes.engine.mlxenv import mx
from exo.nodes.engine.model import LoadedModel, kv_bytes_per_token
from exo.nodes.engine.prefix import PrefixCache, common_prefix
from exo.nodes.engine.request import (
    EngineError,
    Phase,
    Request,
    encode_prompt,
    thinking_markers,
)
from exo.nodes.engine.sampling import Sampler, SamplingParams, StopMatcher, sampler_for
from exo.nodes.engine.scheduler import StepPlan
from exo.nodes.engine.tools import ToolText, chat_parts, forced_grammar
from exo.nodes.pipeline.stage0 import Stage0

log = logging.getLogger(__name__)

# Keys of room past the prompt in its cache: the cache becomes its decode group's
# as it is when the request joins the batch, with room to grow ahead (batch.py).
JOIN_ROOM = 64


def default_kv_budget() -> int:
    """KV cache memory the engine may reserve: a quarter of what is free now."""
    import psutil

    return psutil.virtual_memory().available // 4


class Book:
    def __init__(
        self, kv_budget: int | None, lane: Lane | None, prefix_limit: int | None = None
    ) -> None:
        self.lane = lane
        # (rid, code, why): requests the engine gave up on, owed an error
        self._failed: list[tuple[str, str, str]] = []
        self.kv_budget = kv_budget if kv_budget is not None else default_kv_budget()
        # KV of prompts and answers already run, within the budget (prefix.py);
        # by default up to half of it, 0: off
        self.prefix = PrefixCache(self.kv_budget // 2 if prefix_limit is None else prefix_limit)
        self.prefix_models: set[str] = set()  # the models it serves (prefix.supports)
        self.models: dict[str, LoadedModel] = {}
        self.requests: OrderedDict[str, Request] = OrderedDict()  # admitted
        self.queue: deque[Request] = deque()  # waiting for KV memory
        self.batches: dict[str, Batch] = {}
        self.prefetched: dict[str, Prefetched] = {}
        # Models this node heads a pipeline of: their steps out, their drops owed.
        self.stage0 = Stage0()
        self.last_plan = StepPlan()

    def holds(self, rid: str) -> bool:
        """A request by this id runs or waits here."""
        return rid in self.requests or any(r.rid == rid for r in self.queue)

    def count(self, model_id: str, payload: Payload) -> int:
        """The prompt tokens a chat `payload` comes to, its tools rendered by the
        template as they would be: nothing is run."""
        lm = self.models.get(model_id)
        if lm is None:
            raise EngineError(
                503, "model_not_loaded", f"model {model_id} is not loaded on this node"
            )
        return len(encode_prompt(lm, "chat", payload, tools=bool(chat_parts(payload)[1])))

    def submit(
        self, rid: str, model_id: str, kind: str, payload: Payload, params: SamplingParams
    ) -> Request:
        lm = self.models.get(model_id)
        if lm is None:
            raise EngineError(
                503, "model_not_loaded", f"model {model_id} is not loaded on this node"
            )
        if self.holds(rid):
            raise EngineError(409, "duplicate_request", f"request {rid} already running")
        sp, sampler = self._sampling(lm, kind, payload, params)
        tools = chat_parts(payload)[1] if kind == "chat" else None
        use_tools = bool(tools) and sp.tool_choice != "none"
        prompt = encode_prompt(lm, kind, payload, tools=use_tools)
        limit = self._room(lm, len(prompt), sp.max_tokens)
        need = self._kv_need(lm, len(prompt), limit)
        req = Request(
            rid=rid,
            lm=lm,
            prompt=prompt,
            params=sp,
            sampler=sampler,
            cache=None,
            stop=StopMatcher(sp.stop),
            detok=lm.tokenizer.detokenizer,
            limit=limit,
            kv_reserved=need,
            tool_text=ToolText(lm.tokenizer, tools or [])
            if use_tools and lm.tokenizer.has_tool_calling
            else None,
        )
        req.think, req.thinking = thinking_markers(lm, prompt)
        if sp.echo and sp.logprobs is not None:
            req.scored = []
        req.asked = (kind, payload)
        self.queue.append(req)
        self._admit()
        return req

    @staticmethod
    def _sampling(
        lm: LoadedModel, kind: str, payload: Payload, sp: SamplingParams
    ) -> tuple[SamplingParams, Sampler]:
        """The request's sampling parameters, as a split model's later stages get
        them too, and its sampler (held to its schema or its forced tool call)."""
        try:
            if sp.echo and sp.logprobs is not None and lm.part is not None:
                raise ValueError("echo with logprobs: not yet for a model split across nodes")
            tools = chat_parts(payload)[1] if kind == "chat" else None
            if tools and sp.tool_choice not in (None, "none", "auto"):
                grammar = forced_grammar(lm.tokenizer, tools, sp.tool_choice)
                if grammar is None:
                    raise ValueError(
                        "tool_choice: a forced call is not supported for this model's syntax"
                    )
                sp = msgspec.structs.replace(sp, grammar=grammar)
            return sp, sampler_for(lm, sp)
        except ValueError as e:
            raise EngineError(400, "invalid_params", str(e)) from None

    @staticmethod
    def _room(lm: LoadedModel, prompt: int, asked: int | None) -> int:
        """The tokens a request may generate: what it asked for, if the context holds
        that beside its prompt; else OpenAI's 400, in OpenAI's wording (clients, such
        as LiteLLM's fallbacks, look for it)."""
        room = lm.context - prompt
        if room <= 0:
            raise EngineError(
                400,
                "context_length_exceeded",
                f"This model's maximum context length is {lm.context} tokens. However, your "
                f"messages resulted in {prompt} tokens. Please reduce the length of the "
                "messages.",
            )
        if asked is None:
            return min(DEFAULT_MAX_TOKENS, room)
        if asked > room:
            raise EngineError(
                400,
                "context_length_exceeded",
                f"This model's maximum context length is {lm.context} tokens. However, you "
                f"requested {prompt + asked} tokens ({prompt} in the messages, {asked} in the "
                "completion). Please reduce the length of the messages or completion.",
            )
        return asked

    def _kv_need(self, lm: LoadedModel, prompt: int, limit: int) -> int:
        """The KV bytes a request may come to hold (`limit`: its tokens to generate,
        within the context: _room), or EngineError past the budget."""
        need = (prompt + limit) * kv_bytes_per_token(lm.model)
        cap = min(self.kv_budget, lm.kv_cap if lm.kv_cap is not None else self.kv_budget)
        if need > cap:
            where = "the node" if cap == self.kv_budget else "the instance's tightest stage"
            raise EngineError(
                400,
                "kv_budget_exceeded",
                f"this request needs {need >> 20} MiB of KV cache; {where} allows {cap >> 20} MiB",
            )
        return need

    def _admit(self) -> None:
        from mlx_lm.models.cache import KVCache

        from exo.nodes.engine.span import new_cache

        reserved = sum(r.kv_reserved for r in self.requests.values())
        while self.queue and reserved + self.queue[0].kv_reserved <= self.kv_budget:
            front = self.queue[0]
            if self._coming(front):
                break  # (admitted at the step its prefix lands in the cache)
            # Cached prefixes give way before any request waits for KV memory.
            self.prefix.evict(self.kv_budget - reserved - front.kv_reserved)
            if front.lm.kv_cap is not None:
                mine = sum(r.kv_reserved for r in self.requests.values() if r.lm is front.lm)
                if mine + front.kv_reserved > front.lm.kv_cap:
                    break  # a later stage of its instance would run out first
            req = self.queue.popleft()
            req.cache, req.admitted = new_cache(req.lm.layers), True
            for c in req.cache:
                # One buffer for the whole prompt: a cache that grows 256 keys at a
                # time copies itself each time, a spike in the step that does it.
                if isinstance(c, KVCache):
                    c.step = -(-(len(req.prompt) + JOIN_ROOM) // KVCache.step) * KVCache.step
            self.requests[req.rid] = req
            reserved += req.kv_reserved
            self._reuse(req)
            log.debug(
                "rid=%s admitted: %d prompt tokens, %d cached", req.rid, len(req.prompt), req.cached
            )

    def _coming(self, req: Request) -> bool:
        """Whether `req` should wait for the prompt of a request prefilling now,
        which shares most of its prompt and will be cached when done: callers
        arriving together with one system prompt prefill it once, not each. Only
        while that wait is shorter than prefilling the shared part again."""
        if req.lm.model_id not in self.prefix_models or not self.prefix.limit:
            return False
        have = self.prefix.peek(req.lm.model_id, req.prompt)
        want = np.asarray(req.prompt, dtype=np.int32)
        for r in self.requests.values():
            if r.lm is not req.lm or r.cache is None or not r.to_prefill:
                continue
            shared = common_prefix(np.asarray(r.prompt, dtype=np.int32), want)
            gain = min(shared, len(req.prompt) - 1) - have
            most = 2 * gain >= len(req.prompt) - have
            if gain >= self.prefix.min_tokens and most and r.to_prefill <= 2 * gain:
                return True
        return False

    def _reuse(self, req: Request) -> None:
        """Start `req` from the longest cached prefix of its prompt, if any."""
        if req.lm.model_id not in self.prefix_models or req.scored is not None:
            return  # (a scored prompt's every token goes through the model)
        entry, n = self.prefix.lookup(req.lm.model_id, req.prompt)
        if entry is not None:
            assert req.cache is not None
            self.prefix.fill(req.cache, entry, n)
            req.prefilled = req.cached = n
            if req.lm.part is not None:  # the later stages start from their part of it
                self.stage0.cache_reuse(req.lm.model_id, req.rid, entry.key, n)

    def keep_prefix(self, req: Request) -> None:
        """Cache what `req` has computed: its prompt (prefilled, about to join the
        batch) or its prompt and answer (finished: its row, about to leave). A
        cache that fails costs its entry, never a request (logged, counted)."""
        try:
            self._keep_prefix(req)
        except Exception:
            self.prefix.stats.errors += 1
            log.exception("rid=%s: its prefix was not cached", req.rid)

    def _keep_prefix(self, req: Request) -> None:
        mid = req.lm.model_id
        if mid not in self.prefix_models or not self.prefix.limit:
            return
        if req.cache is not None:
            kv = [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in req.cache]
        else:
            row = self.batches[mid].row_kv(req.rid)
            if row is None:
                return
            kv = row
        n = int(kv[0][0].shape[2])
        tokens = [*req.prompt, *req.sampled][:n]
        if len(tokens) < n:
            return  # (never: a row holds no key for a token it did not draw)
        room = self.kv_budget - sum(r.kv_reserved for r in self.requests.values())
        # The answer as the client will repeat it (plain text only: a tool call's or a
        # thinking model's comes back reshaped).
        plain = req.finish is not None and req.tool_text is None and req.think is None
        answer = req.detok.text if plain and n > len(req.prompt) else None
        entry = self.prefix.store(mid, tokens, kv, room, chain(*req.asked, answer=answer))
        if req.lm.part is not None and entry is not None:
            self.stage0.cache_keep(mid, req.rid, entry.key, n)  # (the later stages' parts)

    def cancel_before(self, at: float) -> list[str]:
        """Cancel the requests submitted before `at` (perf_counter), running or
        queued: the broker that gave them forgot this node. Not those since: a
        GENERATE from the restarted broker may come in the same poll as the news."""
        held = [*self.requests.values(), *self.queue]
        gone = [r.rid for r in held if r.t_submit < at]
        for rid in gone:
            self.cancel(rid)
        return gone

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
            self.stage0.drop(req.lm.model_id, req.rid)
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

    def fail_remote(self, model_id: str) -> list[str]:
        """A later stage failed: every request of the model ends here."""
        self.stage0.abandon(model_id)
        gone = [r.rid for r in [*self.requests.values(), *self.queue] if r.lm.model_id == model_id]
        for rid in gone:
            self.cancel(rid)
        return gone

    def fail_step(self) -> list[tuple[str, str]]:
        """After step() raised: end the requests it carried (decode rows of models not
        waiting on a later stage, prompt chunks, prompts just back from the lane),
        whose caches it may have left half-written. -> (rid, model) of each."""
        busy = self.stage0.busy()
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
        busy = self.stage0.busy()
        return any(
            r.lm.model_id not in busy and not r.in_lane for r in self.requests.values()
        ) or bool(self.stage0.owed())

    # -- status ---------------------------------------------------------------------

    def prefilling(self) -> list[tuple[str, int, int]]:
        """(rid, prompt tokens done, prompt tokens) of requests part-way through prefill."""
        return [
            (r.rid, r.prefilled, len(r.prompt))
            for r in self.requests.values()
            if r.phase in (Phase.PREFILLING, Phase.IN_LANE) and r.prefilled
        ]

    def kv_bytes(self) -> int:
        return sum(b.nbytes() for b in self.batches.values()) + sum(
            r.kv_bytes() for r in self.requests.values()
        )

"""The node's engine: a step loop over every request it holds.

Each `step()` runs one plan from `scheduler.plan`: one decode token for every
request past its prefill, then prompt chunks within the token budget. Requests
join and leave at any step, each with its own KV cache and sampler; a request's
cache is dropped the moment it finishes or is cancelled.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exo.nodes.mlxenv import mx
from exo.nodes.sampling import Sampler, SamplingParams, StopMatcher
from exo.nodes.scheduler import Pending, StepPlan, plan

log = logging.getLogger(__name__)

DEFAULT_PREFILL_BUDGET = 256


class EngineError(Exception):
    """A request the engine refuses; status is the HTTP status the API answers with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class LoadedModel:
    model_id: str
    model: Any
    tokenizer: Any
    context: int
    eos: set[int]


def load_model(model_id: str, path: Path) -> LoadedModel:
    from mlx_lm import load

    t0 = time.perf_counter()
    model, tokenizer, config = load(str(path), return_config=True)
    context = int(
        config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", 0) or 2048
    )
    eos = set(tokenizer.eos_token_ids or [])
    log.info(
        "loaded %s from %s in %.2fs (context %d)", model_id, path, time.perf_counter() - t0, context
    )
    return LoadedModel(model_id, model, tokenizer, context, eos)


@dataclass
class Request:
    rid: str
    lm: LoadedModel
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    cache: list[Any]
    stop: StopMatcher
    detok: Any
    prefilled: int = 0
    last: int = 0
    generated: int = 0
    text_len: int = 0
    finish: str | None = None
    t_submit: float = field(default_factory=time.perf_counter)

    @property
    def to_prefill(self) -> int:
        # The last prompt token is fed by the first decode step.
        return len(self.prompt) - 1 - self.prefilled

    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache if getattr(c, "keys", None) is not None)


@dataclass(slots=True)
class Output:
    rid: str
    ids: list[int]
    text: str
    finish: str | None = None
    usage: dict[str, int] | None = None


def encode_prompt(lm: LoadedModel, kind: str, payload: Any) -> list[int]:
    tok = lm.tokenizer
    if kind == "chat":
        try:
            ids = tok.apply_chat_template(payload, add_generation_prompt=True)
        except Exception as e:  # jinja raises many things for odd messages
            raise EngineError(
                400, "invalid_messages", f"could not apply the chat template: {e}"
            ) from e
        return list(ids)
    if kind == "completion":
        if isinstance(payload, list):
            if not all(isinstance(t, int) and 0 <= t < len(tok) for t in payload):
                raise EngineError(400, "invalid_prompt", "prompt token ids out of range")
            return list(payload)
        return list(tok.encode(payload, add_special_tokens=False)) or [next(iter(lm.eos), 0)]
    raise EngineError(400, "invalid_kind", f"unknown request kind {kind!r}")


class Engine:
    def __init__(self, prefill_budget: int = DEFAULT_PREFILL_BUDGET) -> None:
        self.prefill_budget = prefill_budget
        self.models: dict[str, LoadedModel] = {}
        self.requests: OrderedDict[str, Request] = OrderedDict()
        self.steps = 0

    # -- membership -----------------------------------------------------------------

    def add_model(self, lm: LoadedModel) -> None:
        self.models[lm.model_id] = lm

    def submit(self, rid: str, model_id: str, kind: str, payload: Any, params: dict) -> Request:
        lm = self.models.get(model_id)
        if lm is None:
            raise EngineError(
                503, "model_not_loaded", f"model {model_id} is not loaded on this node"
            )
        if rid in self.requests:
            raise EngineError(409, "duplicate_request", f"request {rid} already running")
        sp = SamplingParams.from_wire(params)
        prompt = encode_prompt(lm, kind, payload)
        if len(prompt) >= lm.context:
            raise EngineError(
                400,
                "context_length_exceeded",
                f"prompt is {len(prompt)} tokens; the model's context is {lm.context}",
            )
        from mlx_lm.models.cache import make_prompt_cache

        req = Request(
            rid=rid,
            lm=lm,
            prompt=prompt,
            params=sp,
            sampler=Sampler(sp),
            cache=make_prompt_cache(lm.model),
            stop=StopMatcher(sp.stop),
            detok=lm.tokenizer.detokenizer,
            last=prompt[-1],
        )
        self.requests[rid] = req
        log.debug("rid=%s admitted: %d prompt tokens", rid, len(prompt))
        return req

    def cancel(self, rid: str) -> bool:
        req = self.requests.pop(rid, None)
        if req is not None:
            req.cache.clear()
            log.info("rid=%s cancelled after %d tokens", rid, req.generated)
        return req is not None

    # -- the step -------------------------------------------------------------------

    def plan(self) -> StepPlan:
        decoding = [r.rid for r in self.requests.values() if r.to_prefill == 0]
        waiting = [Pending(r.rid, r.to_prefill) for r in self.requests.values() if r.to_prefill > 0]
        return plan(decoding, waiting, self.prefill_budget)

    def step(self) -> list[Output]:
        step = self.plan()
        if step.empty:
            return []
        self.steps += 1
        outputs: list[Output] = []
        sampled: list[tuple[Request, mx.array]] = []
        for rid in step.decode:
            req = self.requests[rid]
            logits = req.lm.model(mx.array([[req.last]]), cache=req.cache)
            sampled.append((req, req.sampler(logits[0, -1])))
        chunk_states = []
        for rid, n in step.prefill:
            req = self.requests[rid]
            chunk = req.prompt[req.prefilled : req.prefilled + n]
            req.lm.model(mx.array([chunk]), cache=req.cache)
            req.prefilled += n
            chunk_states.extend(c.state for c in req.cache)
        mx.eval([t for _, t in sampled], chunk_states)
        for req, tok in sampled:
            out = self._emit(req, int(tok.item()))
            outputs.append(out)
            if out.finish:
                self.requests.pop(req.rid, None)
                req.cache.clear()
        return outputs

    def _emit(self, req: Request, token: int) -> Output:
        req.generated += 1
        req.last = token
        finish: str | None = None
        ids = [token]
        is_eos = token in req.lm.eos and not req.params.ignore_eos
        if is_eos:
            finish, ids = "stop", []
            req.detok.finalize()
        else:
            req.detok.add_token(token)
            if (
                req.generated >= req.params.max_tokens
                or len(req.prompt) + req.generated >= req.lm.context
            ):
                finish = "length"
                req.detok.finalize()
        new = req.detok.text[req.text_len :]
        req.text_len = len(req.detok.text)
        text, hit = req.stop.feed(new)
        if hit:
            finish = "stop"
        elif finish:
            text += req.stop.flush()
        out = Output(req.rid, ids, text, finish)
        if finish:
            req.finish = finish
            out.usage = {
                "prompt_tokens": len(req.prompt),
                "completion_tokens": req.generated
                if token not in req.lm.eos
                else req.generated - 1,
                "total_tokens": len(req.prompt) + req.generated - (token in req.lm.eos),
            }
            log.info(
                "rid=%s finished (%s): %d prompt + %d generated tokens in %.2fs",
                req.rid,
                finish,
                len(req.prompt),
                out.usage["completion_tokens"],
                time.perf_counter() - req.t_submit,
            )
        return out

    # -- status ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        running = sum(1 for r in self.requests.values() if r.to_prefill == 0)
        return {
            "running": running,
            "prefilling": len(self.requests) - running,
            "kv_bytes": sum(r.kv_bytes() for r in self.requests.values()),
            "loaded": sorted(self.models),
            "steps": self.steps,
        }

"""A request's own state in the engine: its prompt, sampler, stop sequences and
progress, and what each new token makes of it (text, finish, usage)."""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from exo.broker import protocol as P
from exo.nodes.engine.mlxenv import LayerCache, floats, mx
from exo.nodes.engine.model import LoadedModel
from exo.nodes.engine.sampling import Sampler, SamplingParams, StopMatcher
from exo.nodes.engine.tools import ToolText, chat_parts, template_kwargs

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import StreamingDetokenizer

log = logging.getLogger(__name__)


class EngineError(Exception):
    """A request the engine refuses; status is the HTTP status the API answers with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Phase(enum.Enum):
    QUEUED = "queued"  # waiting for KV memory (book.py)
    PREFILLING = "prefilling"  # its own cache, prompt tokens left: chunks in the step
    IN_LANE = "in_lane"  # its prompt with the prefill lane (lane.py)
    DECODING = "decoding"  # in its model's decode batch (batch.py)


@dataclass
class Request:
    rid: str
    lm: LoadedModel
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    cache: list[LayerCache] | None  # own KV cache while prefilling; None once in the decode batch
    stop: StopMatcher
    detok: StreamingDetokenizer
    limit: int  # the tokens it may generate (book.Book._room)
    kv_reserved: int = 0
    prefilled: int = 0
    last: int = 0
    generated: int = 0
    text_len: int = 0
    finish: str | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    # A chunk part-way through the model: its tokens, the layers it has been
    # through, and its hidden state there.
    inflight: int = 0
    through: int = 0
    h: mx.array | None = None
    in_lane: bool = False  # being prefilled by the engine's lane (lane.py)
    tool_text: ToolText | None = None  # holds a tool call's text back (tools.py)
    # A thinking model's markers (single tokens), and whether it is thinking now:
    # its thoughts go out as reasoning, never as content.
    think: tuple[int, int] | None = None
    thinking: bool = False
    admitted: bool = False  # given its cache (and its KV reserved)
    cached: int = 0  # prompt tokens it started with from the prefix cache (prefix.py)
    # what it was asked, as sent (kind, payload): its prefix digests (common/digests.py)
    asked: tuple[str, P.Payload] = ("", "")
    sampled: list[int] = field(default_factory=list)  # every token it drew, EOS included
    # echo with logprobs: its prompt tokens' entries, filled as its chunks go through
    # (score); None: its prompt is not scored
    scored: list[dict[str, Any]] | None = None

    @property
    def phase(self) -> Phase:
        if not self.admitted:
            return Phase.QUEUED
        if self.in_lane:
            return Phase.IN_LANE
        return Phase.PREFILLING if self.cache is not None else Phase.DECODING

    @property
    def to_prefill(self) -> int:
        return len(self.prompt) - self.prefilled

    def kv_bytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(c.nbytes for c in self.cache if getattr(c, "keys", None) is not None)

    def logprob(
        self, token: int, lp: float | None, top: list[tuple[int, float]] | None
    ) -> dict[str, Any]:
        """OpenAI's entry for one token (chat's shape; the API reshapes completions');
        None for a prompt's first token, which nothing predicts."""
        entry = self.lm.token_entry(token)
        entry["logprob"] = lp
        entry["top_logprobs"] = (
            None if top is None else [{**self.lm.token_entry(t), "logprob": v} for t, v in top]
        )
        return entry

    def score(self, logits: mx.array) -> None:
        """Entries for the prompt tokens a chunk's every-position `logits` predict
        (the chunk starts at `prefilled`): what echo with logprobs returns."""
        assert self.scored is not None
        start = self.prefilled
        if start == 0:
            self.scored.append(self.logprob(self.prompt[0], None, None))
        after = self.prompt[start + 1 : start + 1 + logits.shape[0]]
        if not after:
            return
        lp = logits[: len(after)].astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        got = floats(mx.take_along_axis(lp, mx.array(after)[:, None], axis=-1)[:, 0])
        n = self.params.logprobs or 0
        tops: list[list[int]] = [[] for _ in after]
        vals: list[list[float]] = [[] for _ in after]
        if n:
            best = mx.argpartition(-lp, kth=n - 1, axis=-1)[:, :n]
            tops = cast(list[list[int]], best.tolist())
            vals = cast(list[list[float]], mx.take_along_axis(lp, best, axis=-1).tolist())
        for t, v, top, tv in zip(after, got, tops, vals, strict=True):
            ranked = sorted(zip(top, tv, strict=True), key=lambda x: -x[1])
            self.scored.append(self.logprob(t, v, ranked))

    def emit(self, token: int) -> Output:
        """This request's next token: its text so far (held back where a stop
        sequence may be starting), and whether it finishes here."""
        if self.limit == 0:  # a prompt scored, nothing generated (echo, max_tokens 0)
            self.sampler.take_logprobs()
            return self._echoed(self._finished(Output(self.rid, [], "", "length"), 0))
        self.generated += 1
        self.last = token
        self.sampled.append(token)
        finish: str | None = None
        ids = [token]
        is_eos = token in self.lm.eos and not self.params.ignore_eos
        was_thinking = self.thinking
        marker = self.think is not None and token in self.think
        if marker:
            assert self.think is not None
            self.thinking = token == self.think[0]
        if is_eos:
            finish, ids = "stop", []
            self.detok.finalize()
        else:
            if not marker and token not in self.lm.hidden:
                self.detok.add_token(token)
            if self.generated >= self.limit or len(self.prompt) + self.generated >= self.lm.context:
                finish = "length"
                self.detok.finalize()
        new = self.detok.text[self.text_len :]
        self.text_len = len(self.detok.text)
        reasoning = ""
        if was_thinking:
            reasoning, new = new, ""
        text, hit = self.stop.feed(new)
        if hit:
            finish = "stop"
        elif finish:
            text += self.stop.flush()
        calls = None
        if self.tool_text is not None:
            text = self.tool_text.feed(text)
            if finish:
                calls, rest = self.tool_text.calls()
                if not self.params.parallel_tool_calls:
                    calls = calls[:1]
                text += rest
                finish = "tool_calls" if calls else finish
        out = Output(self.rid, ids, text, finish, tool_calls=calls or None, reasoning=reasoning)
        if self.params.logprobs is not None:
            out.logprobs = [self.logprob(t, lp, top) for t, lp, top in self.sampler.take_logprobs()]
        if finish:
            self._finished(out, self.generated - is_eos)
        return self._echoed(out) if self.generated == 1 else out

    def _finished(self, out: Output, generated: int) -> Output:
        assert out.finish is not None
        self.finish = out.finish
        out.usage = {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": generated,
            "total_tokens": len(self.prompt) + generated,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }
        log.info(
            "rid=%s finished (%s): %d prompt + %d generated tokens in %.2fs",
            self.rid, out.finish, len(self.prompt), generated, time.perf_counter() - self.t_submit,
        )  # fmt: skip
        return out

    def _echoed(self, out: Output) -> Output:
        """The first output of an echo: the prompt's text (and its tokens' entries,
        when scored) before the answer's."""
        if self.params.echo:
            shown = [t for t in self.prompt if t not in self.lm.hidden]
            out.text = self.lm.tokenizer.decode(shown) + out.text
            if self.scored is not None:
                out.logprobs = self.scored + (out.logprobs or [])
                self.scored = []
        return out


@dataclass(slots=True)
class Output:
    rid: str
    ids: list[int]
    text: str
    finish: str | None = None
    usage: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning: str = ""  # a thinking model's thoughts in this step
    logprobs: list[dict[str, Any]] | None = None  # per token sampled, when asked


def thinking_markers(lm: LoadedModel, prompt: list[int]) -> tuple[tuple[int, int] | None, bool]:
    """A thinking model's start and end tokens (single-token markers), and whether
    the prompt leaves it thinking (its template opened the block)."""
    tok = lm.tokenizer
    if not getattr(tok, "has_thinking", False):
        return None, False
    start, end = tok.think_start_tokens, tok.think_end_tokens
    if not (start and end and len(start) == 1 and len(end) == 1):
        return None, False
    return (start[0], end[0]), tok.rfind_think_start(prompt) > tok.rfind_think_end(prompt)


def encode_prompt(lm: LoadedModel, kind: str, payload: P.Payload, tools: bool = True) -> list[int]:
    """`tools`: render the payload's tools (tool_choice "none" leaves them out)."""
    tok = lm.tokenizer
    if kind == "chat":
        messages, given = chat_parts(payload)
        extra: dict[str, Any] = {**template_kwargs(payload)}
        if given and tools:
            extra["tools"] = given
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, **extra)
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

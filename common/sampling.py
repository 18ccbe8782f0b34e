"""What a request asks of sampling, defined once: the API builds it from the
client's body, and it travels as itself in SUBMIT, GENERATE and the first step
header a later stage sees, its bounds checked wherever a frame carrying it is
decoded (nothing on the wire is trusted)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

MAX_STOPS = 16
MAX_STOP_CHARS = 1024


# What a request that names no max_tokens may generate: its KV is reserved up front
# (nodes/engine/book.py), so "the rest of the context" would hold far more than most use.
DEFAULT_MAX_TOKENS = 256


class SamplingParams(Struct, forbid_unknown_fields=False):
    # None: DEFAULT_MAX_TOKENS, or what the context leaves; a number the context
    # cannot hold beside the prompt is refused, as OpenAI does
    max_tokens: Annotated[int, Meta(ge=0, le=1 << 31)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    # OpenAI's seeds are signed 64-bit; the sampler takes them modulo 2^64.
    seed: Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)] | None = None
    stop: Annotated[
        list[Annotated[str, Meta(max_length=MAX_STOP_CHARS)]], Meta(max_length=MAX_STOPS)
    ] = []
    ignore_eos: bool = False
    # Structured output: the JSON schema the tokens must follow (its text), held by
    # constrained decoding (nodes/engine/grammar.py); '{"type": "object"}': any JSON
    json_schema: Annotated[str, Meta(max_length=64 * 1024)] | None = None
    # Tools: "none", "auto", "required" or a function's name (OpenAI's tool_choice);
    # a forced call is held by `grammar`, the lark grammar stage 0 makes for it
    # (nodes/engine/tools.py) and a split model's last stage follows.
    tool_choice: Annotated[str, Meta(max_length=256)] | None = None
    # False: at most one call per answer (OpenAI's parallel_tool_calls, Anthropic's
    # disable_parallel_tool_use); the calls after the first are dropped
    parallel_tool_calls: bool = True
    grammar: Annotated[str, Meta(max_length=256 * 1024)] | None = None
    # Off at their defaults. Penalties count the tokens generated so far (OpenAI's
    # presence and frequency; repetition divides a seen token's positive logit).
    top_k: Annotated[int, Meta(ge=0, le=1 << 20)] = 0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0
    # log probabilities: None off; N: the sampled token's and the N likeliest (0-20)
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    # OpenAI's echo (completions): the prompt comes back before the answer, with its
    # tokens' log probabilities when `logprobs` asks (a prompt scored: max_tokens 0)
    echo: bool = False
    # token id -> bias added to its logit, as OpenAI's logit_bias
    logit_bias: Annotated[
        dict[Annotated[int, Meta(ge=0, le=1 << 24)], Annotated[float, Meta(ge=-100, le=100)]],
        Meta(max_length=300),
    ] = {}

    @classmethod
    def from_wire(cls, p: object) -> SamplingParams:
        """The parameters from a plain map (a face's reading of its body; `stop` may
        be one string), or ValueError naming the bad one."""
        if isinstance(p, dict) and isinstance(p.get("stop"), str):
            p = {**p, "stop": [p["stop"]]}
        try:
            return msgspec.convert(p, cls)
        except msgspec.ValidationError as e:
            raise ValueError(str(e)) from None

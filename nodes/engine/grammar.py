"""Structured output: a request's tokens held to a JSON schema, inside the batch.

llguidance (the Rust library behind guidance, also used by vLLM and llama.cpp)
compiles the schema against the model's tokenizer and says, before each token,
which tokens keep the output valid: a bitmask over the vocabulary, applied to
that request's logits only, so constrained and free requests share a step. It
was taken for what it needs here: a wheel on PyPI with no torch, the HF
tokenizer mlx-lm loads, a matcher per request and numpy bitmasks; xgrammar and
outlines-core are not yet measured beside it (`bench grammar`, to come). Its
cost here (SmolLM2's 49k vocabulary, a 3-field schema): the tokenizer's view
0.38 s once per model, a mask 0.02 ms median, 4 ms at worst, per token. The
output always parses and validates: once the grammar is complete only
end-of-sequence is allowed. Whitespace between JSON tokens is held to the
compact form (a random or weak model padded it for ever).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from exo.nodes.engine.mlxenv import mx

if TYPE_CHECKING:
    from llguidance import LLTokenizer

    from exo.nodes.engine.model import LoadedModel

# A schema's text as the API passes it on (SamplingParams.json_schema); longer is refused.
MAX_SCHEMA_CHARS = 64 * 1024
ANY_OBJECT = '{"type": "object"}'


def _tokenizer(lm: LoadedModel, vocab: int) -> LLTokenizer:
    """llguidance's view of the model's tokenizer, made once per loaded model."""
    import llguidance.hf

    if lm.grammar_view is None:
        lm.grammar_view = llguidance.hf.from_tokenizer(lm.tokenizer._tokenizer, n_vocab=vocab)
    return lm.grammar_view


def vocab_of(lm: LoadedModel) -> int:
    args = getattr(lm.model, "args", None)
    return int(getattr(args, "vocab_size", 0) or len(lm.tokenizer._tokenizer))


class Constraint:
    """One request's grammar state: a JSON schema's text, or a lark grammar (a
    forced tool call: tools.py). ValueError when it does not compile."""

    def __init__(self, lm: LoadedModel, schema: str | None = None, lark: str | None = None) -> None:
        import llguidance
        import llguidance.numpy as lln

        self.vocab = vocab_of(lm)
        if lark is not None:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        else:
            try:
                spec = json.loads(schema or ANY_OBJECT)
            except ValueError:
                raise ValueError("response_format: the schema is not JSON") from None
            if isinstance(spec, dict):
                spec.setdefault("x-guidance", {"whitespace_flexible": False})
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec))
        self.matcher = llguidance.LLMatcher(_tokenizer(lm, self.vocab), grammar)
        if self.matcher.get_error():
            raise ValueError(f"response_format: {self.matcher.get_error()}")
        self.bits = lln.allocate_token_bitmask(1, self.vocab)
        self._fill = lln.fill_next_token_bitmask

    def mask(self) -> mx.array:
        """[vocab] bool: the tokens the grammar allows next."""
        self._fill(self.matcher, self.bits, 0)
        allowed = np.unpackbits(self.bits[0].view(np.uint8), bitorder="little")[: self.vocab]
        return mx.array(allowed.astype(np.bool_))

    def apply(self, logits: mx.array) -> mx.array:
        allowed = self.mask()
        if logits.shape[-1] > allowed.shape[0]:  # a padded head: the extra ids never
            pad = mx.zeros((logits.shape[-1] - allowed.shape[0],), dtype=mx.bool_)
            allowed = mx.concatenate([allowed, pad])
        return mx.where(allowed, logits, -mx.inf)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

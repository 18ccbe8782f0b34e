"""A model as a node holds it: the whole of it, or one pipeline stage's layers.

A stage of a model split into pipeline stages is a contiguous range of its
decoder layers, [start, end). The first stage also embeds the tokens; the last
also applies the final norm and the LM head (and, with tied embeddings, keeps
the embedding matrix for that). Weights are loaded lazily and only the stage's
own are materialised, so a node holding a third of the layers uses about a
third of the memory.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from exo.nodes.engine.mlxenv import Model, mx, nn
from exo.nodes.engine.span import SPLITTABLE, Span, UnsupportedModel

if TYPE_CHECKING:
    from llguidance import LLTokenizer
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Part:
    start: int
    end: int
    total: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.total

    @property
    def whole(self) -> bool:
        return self.first and self.last

    def public(self) -> list[int]:
        return [self.start, self.end]


@dataclass
class LoadedModel:
    model_id: str
    model: Model
    tokenizer: TokenizerWrapper
    context: int
    eos: set[int]
    part: Part | None = None  # None: the whole model
    nbytes: int = 0  # weights held in memory
    instance: str = ""
    # Stage 0 of a split model: the KV bytes (of its own layers) that its requests may
    # hold together so that no later stage exceeds its node's KV budget.
    kv_cap: int | None = None
    # The layers it runs, by mlx-lm's own forward when not `fused` (span.py).
    span: Span | None = None
    fused: bool = False  # the llama block's fused step (forward.py) runs it
    # Special tokens that never reach text (chat markers such as <|im_end|>): see unspoken()
    hidden: frozenset[int] = frozenset()
    grammar_view: LLTokenizer | None = None  # llguidance's, made once (grammar.py)

    @property
    def layers(self) -> int:
        return len(self.model.layers)

    def token_entry(self, token: int) -> dict[str, Any]:
        """The token's text and bytes, as OpenAI's log probabilities show it."""
        from exo.nodes.engine.tokens import entry

        return entry(self.tokenizer, token, self.hidden)


def model_meta(path: Path) -> dict[str, Any]:
    """What placement needs to know about a model folder: its layers, weight
    bytes and architecture (read from config.json and the file sizes)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    text = config.get("text_config", {})
    layers = config.get("num_hidden_layers") or text.get("num_hidden_layers") or 0
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    kind = str(config.get("model_type", ""))
    context = config.get("max_position_embeddings") or text.get("max_position_embeddings") or 0
    return {
        "layers": int(layers),
        "bytes": size,
        "type": kind,
        "split": kind in SPLITTABLE,
        "context": int(context) if isinstance(context, int) else 0,
    }


def load_model(model_id: str, path: Path, part: Part | None = None) -> LoadedModel:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as mlx_load_model
    from mlx_lm.utils import load_tokenizer

    from exo.nodes.engine import layout
    from exo.nodes.engine.forward import supports_fused
    from exo.nodes.store import manifest

    t0 = time.perf_counter()
    manifest.verify(path)  # a corrupted file is refused here, never loaded
    model, config = mlx_load_model(path, lazy=True)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    if part is None or part.whole:
        part = None
        span, keep = Span.of(model), [model]
    else:
        span, keep = _cut(model_id, model, part)
    # Only this stage's weights are read; the rest stay unloaded, lazy arrays.
    params: list[mx.array] = [
        v for m in keep for _, v in cast(list[tuple[str, mx.array]], tree_flatten(m.parameters()))
    ]
    mx.eval(params)
    nbytes = sum(v.nbytes for v in params)
    del params
    fused = supports_fused(model)
    if layout.wanted() and fused:
        # mlx-lm's forward and ours both call the layers, so only architectures
        # whose code we know never reads a Linear's `.weight` itself.
        layout.input_major(model, keep)
    context = int(
        config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", 0) or 2048
    )
    eos = set(tokenizer.eos_token_ids or [])
    log.info(
        "loaded %s%s from %s in %.2fs (context %d)",
        model_id,
        f" layers [{part.start}, {part.end}) of {part.total}" if part else "",
        path,
        time.perf_counter() - t0,
        context,
    )
    lm = LoadedModel(
        model_id, model, tokenizer, context, eos, part, nbytes=nbytes, span=span, fused=fused
    )
    lm.hidden = unspoken(tokenizer)
    return lm


def _cut(model_id: str, model: Model, part: Part) -> tuple[Span, list[nn.Module]]:
    """The model cut down to `part`'s layers: its span, and the modules whose
    weights it holds (the embedding on the first stage, the head on the last)."""
    inner = model.model
    if len(inner.layers) != part.total:
        raise ValueError(f"{model_id} has {len(inner.layers)} layers, not {part.total}")
    kind = str(getattr(model, "model_type", ""))
    if kind not in SPLITTABLE:
        raise UnsupportedModel(f"{model_id} ({kind}) cannot be split into pipeline stages")
    span = Span.of(model, part.start, part.end)
    inner.layers = inner.layers[part.start : part.end]
    keep = list(inner.layers)
    # Tied heads by what the checkpoint holds (gemma leaves lm_head out of it).
    tied = getattr(model, "lm_head", None) is None
    if part.first or (part.last and tied):
        keep.append(inner.embed_tokens)
    if part.last:
        keep.append(inner.norm)
        if not tied:
            keep.append(model.lm_head)
    return span, keep


def unspoken(tokenizer: TokenizerWrapper) -> frozenset[int]:
    """The tokenizer's special tokens, less the markers a parser reads in the text
    (tool calls) or the engine routes itself (thinking): a model that emits a chat
    marker mid-answer (or past EOS, with ignore_eos) shows no `<|im_end|>` to users."""
    hf = tokenizer._tokenizer
    ids = set(getattr(hf, "all_special_ids", None) or [])
    decoder = getattr(hf, "added_tokens_decoder", None) or {}
    ids.update(i for i, t in decoder.items() if getattr(t, "special", False))
    for marker in ("tool_call_start", "tool_call_end"):
        text = getattr(tokenizer, marker, None)
        if text:
            ids.difference_update(hf.encode(text, add_special_tokens=False))
    for name in ("think_start_tokens", "think_end_tokens"):
        ids.difference_update(getattr(tokenizer, name, None) or ())
    return frozenset(ids)


def kv_bytes_per_token(model: Model) -> int:
    args: Any = getattr(model, "args", None)
    try:
        heads = args.num_key_value_heads or args.num_attention_heads
        head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        return 2 * len(model.layers) * heads * head_dim * 4
    except AttributeError:
        return 0

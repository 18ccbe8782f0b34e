"""Any mlx-lm decoder, whole or one pipeline stage, through mlx-lm's own forward.

The fused step (forward.py) knows one block, llama's. Every other architecture
runs its own `Model.__call__`, so its embedding scale, masks (sliding windows,
layers mixing full and sliding attention), layers (MoE, MLA, q/k norms,
multipliers), final norm, soft-capping and tied head are mlx-lm's code, never a
copy of it. Three stand-ins let that one forward run only a range of the layers:
- the layers outside the range are pass-throughs that keep each one's plain
  attributes (llama picks a layer's mask by `layer.use_sliding`);
- the range's first layer takes the entering hidden states in place of what the
  model computed before it (an embedding lookup nothing evaluates: a later stage
  holds no embedding weights);
- the range's last layer ends the forward with its output, so the final norm and
  the head run only on the rows whose logits are wanted (`Span.logits`).
The cache list handed to the model is as long as the whole model: architectures
index it by the model's own layer numbers (llama's `fa_idx`, gemma3's pattern).
Places outside the range hold the range's first cache: every layer of a stage has
seen the same tokens, so masks made from it are right for any of them.

Sliding-window layers keep a plain KVCache and get the window as a mask, as every
other cache here (rowcache.py): memory grows with the context as for full layers,
where mlx-lm's rotating buffer stops at the window (noted in docs/NOTES.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exo.nodes.engine.mlxenv import LayerCache, Model, mx, nn

# Architectures whose stages are checked token by token against mlx-lm
# (tests/test_architectures.py); the broker places a split of no other.
SPLITTABLE = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
        "granite",
        "mixtral",
        "deepseek_v3",
    }
)
# gemma2's attention groups query heads as [B, kv heads, repeats, L, D] and adds
# the mask as it comes: a per-row mask [B, 1, L, S] then lines B up with the kv
# heads (mlx-lm's batch_generate gives wrong tokens too). Its masks get the axis.
MASK_5D = frozenset({"gemma2"})


class UnsupportedModel(ValueError):
    pass


class _Left(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the range's last layer, carrying its output."""

    def __init__(self, h: mx.array) -> None:
        self.h = h


class _Pass:
    """A layer outside the range: the state goes through unchanged."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.__dict__.update(attrs)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return x


class _Given(_Pass):
    """In place of every layer before the head: the hidden states given."""

    def __init__(self, attrs: dict[str, Any], h: mx.array) -> None:
        super().__init__(attrs)
        self.h = h

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return self.h


class _Hooked:
    """A layer of the range: the entering state replaces its input (`enter`), and
    its output ends the forward (`leave`)."""

    def __init__(self, layer: nn.Module, enter: mx.array | None, leave: bool) -> None:
        self.layer, self.enter, self.leave = layer, enter, leave

    def __getattr__(self, name: str) -> Any:
        return getattr(self.layer, name)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        out = self.layer(x if self.enter is None else self.enter, *args, **kwargs)
        if self.leave:
            raise _Left(out)
        return out


class _Mask5D:
    """A cache whose masks get gemma2's extra head axis (MASK_5D)."""

    def __init__(self, cache: LayerCache) -> None:
        self.cache = cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self.cache.update_and_fetch(keys, values)

    def make_mask(self, *args: Any, **kwargs: Any) -> Any:
        mask = self.cache.make_mask(*args, **kwargs)
        return mask[:, :, None] if isinstance(mask, mx.array) and mask.ndim == 4 else mask


def _plain(layer: Any) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(layer).items()
        if isinstance(v, bool | int | float | str) and not k.startswith("_")
    }


@dataclass
class Span:
    """Layers [start, end) of a model of `total` layers, run by its own code."""

    start: int
    end: int
    total: int
    model_type: str = ""
    passes: list[_Pass] = field(default_factory=list, repr=False)  # per layer of the model

    @classmethod
    def of(cls, model: Model, start: int = 0, end: int | None = None) -> Span:
        """Made from the whole model, before its layers are cut to the range."""
        layers = model.model.layers
        check_caches(model)
        return cls(
            start,
            len(layers) if end is None else end,
            len(layers),
            str(getattr(model, "model_type", "")),
            [_Pass(_plain(layer)) for layer in layers],
        )

    def _call(self, model: Model, layers: list[Any], ids: mx.array, cache: Any) -> Any:
        inner = model.model
        mine = inner.layers
        inner.layers = layers
        try:
            return model(ids, cache=cache)
        finally:
            inner.layers = mine

    def forward(
        self, model: Model, ids: mx.array | None, h: mx.array | None, caches: list[LayerCache]
    ) -> mx.array:
        """The range's layers over one group of rows: token ids [B, L] (the first
        stage) or entering hidden states `h` [B, L, D] -> hidden states [B, L, D]
        after the range's last layer (before the final norm)."""
        mine = list(model.model.layers)
        assert len(mine) == self.end - self.start == len(caches)
        layers: list[Any] = list(self.passes)
        for i, layer in enumerate(mine):
            first, last = i == 0, i == len(mine) - 1
            layers[self.start + i] = (
                _Hooked(layer, h if first else None, last) if first or last else layer
            )
        if self.model_type in MASK_5D:
            caches = [_Mask5D(c) for c in caches]
        full = [caches[0]] * self.total
        full[self.start : self.end] = caches
        if ids is None:
            assert h is not None
            ids = mx.zeros(h.shape[:2], dtype=mx.int32)
        try:
            self._call(model, layers, ids, full)
        except _Left as e:
            return e.h
        raise AssertionError("the range's last layer did not run")

    def logits(self, model: Model, h: mx.array) -> mx.array:
        """Hidden states [R, D] after the model's last layer -> logits [R, V], by the
        model's own final norm, head and whatever it does to logits."""
        layers: list[Any] = list(self.passes)
        layers[0] = _Given(vars(self.passes[0]), h[None])
        out = self._call(model, layers, mx.zeros((1, h.shape[0]), dtype=mx.int32), None)
        return out[0]


def check_caches(model: Model) -> None:
    """A model is run here when each of its layers keeps plain keys and values
    (mlx-lm's KVCache, or RotatingKVCache for a sliding window): the batched
    engine keeps those per row (rowcache.py). State-space and chunked caches are
    refused when the model loads, with the reason."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    kinds = {type(c).__name__ for c in make_prompt_cache(model)}
    other = kinds - {KVCache.__name__, RotatingKVCache.__name__}
    if other:
        raise UnsupportedModel(
            f"{getattr(model, 'model_type', 'this model')} keeps {', '.join(sorted(other))} "
            "caches, which the batched engine does not run"
        )


def new_cache(layers: int) -> list[LayerCache]:
    """A request's cache for `layers` layers: a plain KVCache each, sliding-window
    layers included (their window is a mask, module doc)."""
    from mlx_lm.models.cache import KVCache

    return [KVCache() for _ in range(layers)]

"""One engine step's forward pass: every decode and the prefill chunks together.

Decode rows share a left-padded BatchKVCache; each prefill chunk has its own
KVCache. For llama-family models (llama, mistral, qwen2: the same attention
block) the step is fused: all tokens of the step (B decode tokens and the chunks)
go through the weight matmuls as one packed matrix, so weights are read once
per step and a prefill chunk rides along with the decodes almost for free;
only attention runs per group, each against its own cache. Other architectures
take the plain path: one batched decode call, then one call per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from exo.nodes import attention
from exo.nodes.mlxenv import mx

FUSED_TYPES = {"llama", "mistral", "qwen2"}
# MLX's own attention kernel is the fast one everywhere but on its CPU backend.
_FAST = mx.default_device() == mx.cpu


@dataclass
class Chunk:
    tokens: list[int]
    cache: list[Any]  # per-layer KVCache
    logits: bool  # whether the last position's logits are wanted


def supports_fused(model: Any) -> bool:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return (
        getattr(model, "model_type", None) in FUSED_TYPES
        and layers is not None
        and getattr(inner, "swa_idx", None) is None
        and all(
            hasattr(layers[0].self_attn, p)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj", "rope")
        )
    )


def lm_head(model: Any, h: mx.array) -> mx.array:
    if getattr(model, "args", None) is not None and model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def plain_step(
    model: Any, dec: list[int], dec_cache: list[Any] | None, chunks: list[Chunk]
) -> tuple[mx.array | None, list[mx.array | None]]:
    dec_logits = None
    if dec:
        dec_logits = model(mx.array(dec)[:, None], cache=dec_cache)[:, -1, :]
    outs: list[mx.array | None] = []
    for c in chunks:
        logits = model(mx.array([c.tokens]), cache=c.cache)
        outs.append(logits[0, -1] if c.logits else None)
    return dec_logits, outs


def _attend(
    attn: Any, q: mx.array, k: mx.array, v: mx.array, B: int, L: int, cache: Any, mask: Any
) -> mx.array:
    """q/k/v: [B*L, features] rows of one group -> attention output [B*L, H*hd]."""
    q = q.reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = k.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = v.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q = attn.rope(q, offset=cache.offset)
    k = attn.rope(k, offset=cache.offset)
    k, v = cache.update_and_fetch(k, v)
    if _FAST:
        o = attention.attend(q, k, v, attn.scale, mask)
    else:
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=mask)
    return o.transpose(0, 2, 1, 3).reshape(B * L, -1)


Group = tuple[int, int, list[Any]]  # (rows, tokens per row, per-layer caches)


def groups_of(dec: int, dec_cache: list[Any] | None, chunks: list[Chunk]) -> list[Group]:
    groups: list[Group] = []
    if dec:
        assert dec_cache is not None
        groups.append((dec, 1, dec_cache))
    groups.extend((1, len(c.tokens), c.cache) for c in chunks)
    return groups


def run_layers(layers: list[Any], h: mx.array, groups: list[Group]) -> mx.array:
    """h: [T, D], every group's tokens packed in order -> h after `layers`. The
    weight matmuls see all T rows at once; attention runs per group."""
    # Masks before any cache grows this step, as mlx-lm's models make them.
    masks = [create_attention_mask(mx.zeros((b, n, 1)), caches[0]) for b, n, caches in groups]
    if _FAST:
        masks = [
            attention.additive_mask(m, n, caches[0].offset)
            for m, (b, n, caches) in zip(masks, groups, strict=True)
        ]
    for li, layer in enumerate(layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        outs, start = [], 0
        for (b, n, caches), mask in zip(groups, masks, strict=True):
            end = start + b * n
            outs.append(
                _attend(attn, q[start:end], k[start:end], v[start:end], b, n, caches[li], mask)
            )
            start = end
        h = h + attn.o_proj(mx.concatenate(outs, axis=0) if len(outs) > 1 else outs[0])
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h


def sampled_rows(dec: int, chunks: list[tuple[int, bool]]) -> tuple[list[int], list[int | None]]:
    """Rows of the packed step whose logits are wanted: every decode row and the
    last row of each chunk that finishes its prompt; and, per chunk, its index
    among those rows (None when it wants none)."""
    rows = list(range(dec))
    pos = dec
    wanted: list[int | None] = []
    for n, logits in chunks:
        pos += n
        if logits:
            wanted.append(len(rows))
            rows.append(pos - 1)
        else:
            wanted.append(None)
    return rows, wanted


def head(model: Any, h: mx.array, rows: list[int]) -> mx.array:
    return lm_head(model, model.model.norm(h[mx.array(rows)]))


def fused_step(
    model: Any, dec: list[int], dec_cache: list[Any] | None, chunks: list[Chunk]
) -> tuple[mx.array | None, list[mx.array | None]]:
    inner = model.model
    B = len(dec)
    tokens = dec + [t for c in chunks for t in c.tokens]
    h = inner.embed_tokens(mx.array(tokens))  # [T, D], all of the step's tokens packed
    h = run_layers(inner.layers, h, groups_of(B, dec_cache, chunks))
    rows, wanted = sampled_rows(B, [(len(c.tokens), c.logits) for c in chunks])
    if not rows:
        return None, [None] * len(chunks)
    logits = head(model, h, rows)
    return (logits[:B] if B else None), [None if w is None else logits[w] for w in wanted]


def step_forward(
    model: Any, dec: list[int], dec_cache: list[Any] | None, chunks: list[Chunk], fused: bool
) -> tuple[mx.array | None, list[mx.array | None]]:
    return (fused_step if fused else plain_step)(model, dec, dec_cache, chunks)


def matmul_table(model: Any, max_rows: int = 64, reps: int = 3) -> list[float]:
    """Seconds of one step's weight matmuls for 0..max_rows rows (index = rows),
    timed on the first layer and scaled to all of them: the scheduler sizes
    prompt chunks from it, as the cost is far from linear in the rows on some
    BLAS libraries. Empty for models the fused step does not run."""
    import time

    if not supports_fused(model):
        return []
    layer = model.model.layers[0]
    attn = layer.self_attn
    dim = model.args.hidden_size
    table = [0.0]
    for t in range(1, max_rows + 1):
        x = mx.random.normal((t, dim))
        mx.eval(x)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            mx.eval(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(x), layer.mlp(x))
            best = min(best, time.perf_counter() - t0)
        table.append(best * len(model.model.layers))
    return table

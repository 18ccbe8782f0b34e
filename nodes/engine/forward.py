"""One engine step's forward pass: every decode and the prefill chunks together.

Decode rows share a RowCache per layer (rowcache.py), one per group of rows of
similar length (batch.py); each prefill chunk has its own KVCache. For llama-family
models (llama, mistral, qwen2: one attention block) the step is fused: all its tokens
(B decodes and the chunks) go through the weight matmuls as one packed matrix, so
weights are read once a step and a chunk rides along with the decodes almost free;
only attention runs per group, against its own cache. Other architectures take
mlx-lm's own forward (span.py): one call for the decode rows, then one per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from exo.nodes.engine.mlxenv import LayerCache, Mask, Model, mx, nn  # (OpenBLAS first)

# isort: split
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from exo.nodes.engine import attention
from exo.nodes.engine.layout import embedding_dims
from exo.nodes.engine.span import Span

FUSED_TYPES = {"llama", "mistral", "qwen2"}
# MLX's own attention kernel is the fast one everywhere but on its CPU backend.
_FAST = mx.default_device() == mx.cpu


@dataclass
class Chunk:
    tokens: list[int]
    cache: list[LayerCache]  # per-layer KVCache
    logits: bool  # whether the last position's logits are wanted
    # The layers this step runs the chunk through, [first, end); end None: to the
    # last. A chunk that starts past layer 0 brings its hidden state `h`.
    first: int = 0
    end: int | None = None
    h: mx.array | None = None
    every: bool = False  # every position's logits (a prompt scored: echo with logprobs)


def supports_fused(model: Model) -> bool:
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


def lm_head(model: Model, h: mx.array) -> mx.array:
    if getattr(model, "lm_head", None) is None:  # tied: what the checkpoint holds says
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


DecGroups = list[tuple[int, list[LayerCache]]]  # decode rows and their per-layer caches, by group


def plain_step(
    model: Model, span: Span, dec: list[int], dec_groups: DecGroups, chunks: list[Chunk]
) -> tuple[mx.array | None, list[mx.array | None]]:
    """mlx-lm's own forward (span.py): one call for the decode rows, one per chunk;
    the head runs only on the rows whose logits are wanted."""
    dec_logits = None
    if dec:
        assert len(dec_groups) == 1, "mlx-lm's forward takes one decode cache"
        h = span.forward(model, mx.array(dec)[:, None], None, dec_groups[0][1])
        dec_logits = span.logits(model, h[:, -1, :])
    outs: list[mx.array | None] = []
    for c in chunks:
        whole = c.first == 0 and c.h is None and (c.end or span.end) - span.start == len(c.cache)
        assert whole, "a chunk through part of the layers: the fused step's"
        h = span.forward(model, mx.array([c.tokens]), None, c.cache)
        if c.every:
            outs.append(span.logits(model, h[0]))
        else:
            outs.append(span.logits(model, h[0, -1:])[0] if c.logits else None)
    return dec_logits, outs


def through(model: Model, span: Span, fused: bool, x: mx.array, groups: list[Group]) -> mx.array:
    """A pipeline stage's layers over the step's groups (each running all of
    them): `x` packed in group order, token ids [T] on the first stage, hidden
    states [T, D] on a later one -> hidden states [T, D] after its last layer."""
    if fused:
        h = model.model.embed_tokens(x) if span.start == 0 else x
        return run_layers(model.model.layers, h, groups)
    first = span.start == 0
    outs, at = [], 0
    for g in groups:
        rows = x[at : at + g.rows * g.n]
        at += g.rows * g.n
        if first:
            out = span.forward(model, rows.reshape(g.rows, g.n), None, g.caches)
        else:
            out = span.forward(model, None, rows.reshape(g.rows, g.n, -1), g.caches)
        outs.append(out.reshape(g.rows * g.n, -1))
    return _pack(outs)


def _attend(
    attn: nn.Module, q: mx.array, k: mx.array, v: mx.array, g: Group, cache: LayerCache, mask: Mask
) -> mx.array:
    """q/k/v: [B*L, features] rows of one group -> attention output [B*L, H*hd]."""
    B, L = g.rows, g.n
    q = q.reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = k.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = v.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q = attn.rope(q, offset=cache.offset)
    k = attn.rope(k, offset=cache.offset)
    k, v = cache.update_and_fetch(k, v)
    chunk = B == 1 and L > 1  # a prompt chunk: a group of one row
    if _FAST and chunk and L * k.shape[2] >= attention.CHUNK_MIN and q.dtype == mx.float32:
        o = attention.attend_chunk(q, k, v, attn.scale)
    elif _FAST:
        assert not isinstance(mask, str)  # (_mask made it additive)
        o = attention.attend(q, k, v, attn.scale, mask)
    else:  # (mlx-lm's annotation leaves out the "causal" it takes: hence the ignore)
        sdpa = scaled_dot_product_attention
        o = sdpa(q, k, v, cache=cache, scale=attn.scale, mask=mask)  # type: ignore[arg-type]
    return o.transpose(0, 2, 1, 3).reshape(B * L, -1)


@dataclass
class Group:
    """Rows that attend together, against one cache, over layers [first, end)."""

    rows: int
    n: int  # tokens per row
    caches: list[LayerCache]  # per layer
    first: int = 0
    end: int | None = None
    h: mx.array | None = None  # entering state, for a group that starts past layer 0
    out: mx.array | None = None  # leaving state, for a group that ends before the last layer


def groups_of(dec_groups: DecGroups, chunks: list[Chunk]) -> list[Group]:
    groups = [Group(rows, 1, caches) for rows, caches in dec_groups if rows]
    groups.extend(Group(1, len(c.tokens), c.cache, c.first, c.end, c.h) for c in chunks)
    return groups


def _mask(g: Group) -> Mask:
    # Made before any cache grows this step, as mlx-lm's models make them.
    cache = g.caches[g.first]
    mask = create_attention_mask(mx.zeros((g.rows, g.n, 1)), cache)
    return attention.additive_mask(mask, g.n, cache.offset) if _FAST else mask


def _padded(x: mx.array, pad: int) -> mx.array:
    return mx.concatenate([x, mx.zeros((pad, x.shape[1]), x.dtype)]) if pad else x


def run_layers(layers: list[nn.Module], h: mx.array, groups: list[Group], pad: int = 0) -> mx.array:
    """h: [T, D], the tokens of the groups that start at layer 0, packed in order
    -> the tokens of those that reach the last layer, packed in order. The weight
    matmuls see every row present at a layer at once; attention runs per group.
    A group that starts later joins at its first layer with its own `h`; one that
    ends early leaves its state in `out` (a long prompt goes through a few layers
    per step, so a step beside running decodes stays short). `pad`: zero rows at the
    end of `h` that go through the weight matmuls only (see fused_step)."""
    masks = [_mask(g) for g in groups]
    last = len(layers)
    here = [i for i, g in enumerate(groups) if g.first == 0]
    for li, layer in enumerate(layers):
        if li and any(g.first == li for g in groups):
            parts = dict(zip(here, _split(h, [groups[i] for i in here]), strict=True))
            parts.update(
                {i: g.h for i, g in enumerate(groups) if g.first == li and g.h is not None}
            )
            here = sorted(parts)
            h = _pack([parts[i] for i in here])
        if not here:
            continue
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        outs, start = [], 0
        for i in here:
            g = groups[i]
            end = start + g.rows * g.n
            outs.append(
                _attend(attn, q[start:end], k[start:end], v[start:end], g, g.caches[li], masks[i])
            )
            start = end
        h = h + attn.o_proj(_padded(_pack(outs), pad))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if any((g.end or last) == li + 1 < last for g in (groups[i] for i in here)):
            parts = dict(zip(here, _split(h, [groups[i] for i in here]), strict=True))
            for i in list(here):
                if (groups[i].end or last) == li + 1:
                    groups[i].out = parts.pop(i)
            here = sorted(parts)
            h = _pack([parts[i] for i in here]) if here else h[:0]
    return h


def _split(h: mx.array, groups: list[Group]) -> list[mx.array]:
    out, start = [], 0
    for g in groups:
        out.append(h[start : start + g.rows * g.n])
        start += g.rows * g.n
    return out


def _pack(hs: list[mx.array]) -> mx.array:
    return mx.concatenate(hs, axis=0) if len(hs) > 1 else hs[0]


def sampled_rows(
    dec: int, chunks: list[tuple[int, bool]], slot: int = 0
) -> tuple[list[int], list[int | None]]:
    """Rows of the packed step whose logits are wanted: every decode row and the
    last row of each (tokens, logits) chunk that finishes its prompt; and, per
    chunk, its index among those rows (None when it wants none). `slot`: rows each
    chunk takes in the step, its tokens right-padded (a pack: forward.packs); 0, its
    own length."""
    rows = list(range(dec))
    pos = dec
    wanted: list[int | None] = []
    for n, logits in chunks:
        if logits:
            wanted.append(len(rows))
            rows.append(pos + n - 1)
        else:
            wanted.append(None)
        pos += slot or n
    return rows, wanted


def no_rows(model: Model) -> mx.array:
    """A hidden state of no tokens, for a step that has none at some point."""
    return mx.zeros((0, embedding_dims(model.model.embed_tokens)), dtype=mx.float32)


def logits_of(model: Model, h: mx.array, rows: list[int], span: Span | None = None) -> mx.array:
    """The logits of rows `rows` of the last layer's output `h`: the llama head, or
    with `span` the model's own (span.py)."""
    if span is not None:
        return span.logits(model, h[mx.array(rows)])
    return lm_head(model, model.model.norm(h[mx.array(rows)]))


# Fresh prompts up to this long attend as one group in a step, right-padded to a
# multiple of PACK_TO tokens: one group's ops instead of one group per prompt (a
# group's fixed cost is most of a short prompt's). Padding keys come after every real
# one: the causal mask keeps them out of each prompt's attention, and its cache gets
# only its own keys.
PACK_MAX = 64
PACK_TO = 8


class PackCache:
    """One layer's caches for a pack of fresh prompts of `lens` tokens (as one
    attention group of right-padded rows): each cache gets its own prompt's keys."""

    offset = 0

    def __init__(self, caches: list[LayerCache], lens: list[int]) -> None:
        self.caches, self.lens = caches, lens

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        for i, (c, n) in enumerate(zip(self.caches, self.lens, strict=True)):
            c.update_and_fetch(keys[i : i + 1, :, :n], values[i : i + 1, :, :n])
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None) -> Mask:
        return "causal"


def packs(chunks: list[Chunk], layers: int) -> list[list[int]]:
    """The chunks (indices) that attend together: fresh prompts of up to PACK_MAX
    tokens through every layer, by length rounded up to PACK_TO, two or more to a
    pack; every other chunk alone."""
    by: dict[int, list[int]] = {}
    alone: list[list[int]] = []
    for i, c in enumerate(chunks):
        whole = c.first == 0 and (c.end or layers) == layers and c.h is None
        fresh = whole and int(c.cache[0].offset) == 0
        if fresh and len(c.tokens) <= PACK_MAX and not c.every:
            by.setdefault(-(-len(c.tokens) // PACK_TO), []).append(i)
        else:
            alone.append([i])
    return [p for p in by.values() if len(p) > 1] + [p for p in by.values() if len(p) == 1] + alone


def _chunk_group(chunks: list[Chunk], pack: list[int], layers: int) -> Group:
    if len(pack) == 1:
        c = chunks[pack[0]]
        return Group(1, len(c.tokens), c.cache, c.first, c.end, c.h)
    lens = [len(chunks[i].tokens) for i in pack]
    caches = [PackCache([chunks[i].cache[li] for i in pack], lens) for li in range(layers)]
    return Group(len(pack), max(lens), caches)


def fused_step(
    model: Model,
    dec: list[int] | mx.array,
    dec_groups: DecGroups,
    chunks: list[Chunk],
    pad_to: int = 1,
) -> tuple[mx.array | None, list[mx.array | None]]:
    """`dec`: the decode rows' tokens (a lazy array when the step is queued ahead),
    in the order of `dec_groups` -> the decode rows' logits, and per chunk: its last
    position's logits when it ends the prompt (every position's, [n, vocab], when
    scored: Chunk.every), its hidden state when it stops short of the last layer,
    else None. `pad_to`: a step of decodes only multiplies its weights for a multiple
    of this many rows, the extra ones zero: on one thread OpenBLAS's sgemm here is
    fastest at multiples of 4 rows (docs/NOTES.md)."""
    inner = model.model
    B = len(dec)
    pad = (-B) % pad_to if B and not chunks else 0
    last = len(inner.layers)
    order = [(p, _chunk_group(chunks, p, last)) for p in packs(chunks, last)]
    ids = [dec.astype(mx.int32) if isinstance(dec, mx.array) else mx.array(dec, dtype=mx.int32)]
    for p, g in order:
        if g.first == 0:
            for i in p:
                toks = chunks[i].tokens
                ids.append(mx.array(toks + [0] * (g.n - len(toks)), dtype=mx.int32))
    if sum(a.size for a in ids):  # [T, D], the step's tokens that enter at layer 0, packed
        h = inner.embed_tokens(mx.concatenate(ids) if len(ids) > 1 else ids[0])
    else:
        h = no_rows(model)
    groups = groups_of(dec_groups, []) + [g for _, g in order]
    h = run_layers(inner.layers, _padded(h, pad), groups, pad)
    # The last layer's rows to take logits of; per chunk: (its first, how many; 0: its last).
    rows, at = list(range(B)), B
    want: dict[int, tuple[int, int]] = {}
    for p, g in order:
        if (g.end or last) != last:
            continue
        if chunks[p[0]].every:  # (alone: packs)
            want[p[0]] = (len(rows), g.n)
            rows += range(at, at + g.n)
            at += g.n
            continue
        got, wanted = sampled_rows(0, [(len(chunks[i].tokens), chunks[i].logits) for i in p], g.n)
        for i, w in zip(p, wanted, strict=True):
            if w is not None:
                want[i] = (len(rows) + w, 0)
        rows += [at + r for r in got]
        at += g.rows * g.n
    logits = logits_of(model, h, rows + list(range(B, B + pad))) if rows else None
    outs: list[mx.array | None] = [None] * len(chunks)
    for p, g in order:
        for i in p:
            if (g.end or last) != last:
                outs[i] = g.out
            elif i in want and logits is not None:
                k, n = want[i]
                outs[i] = logits[k : k + n] if n else logits[k]
    return (logits[:B] if B and logits is not None else None), outs


def step_forward(
    model: Model,
    dec: list[int],
    dec_groups: DecGroups,
    chunks: list[Chunk],
    fused: bool,
    pad_to: int = 1,
    span: Span | None = None,
) -> tuple[mx.array | None, list[mx.array | None]]:
    if fused:
        return fused_step(model, dec, dec_groups, chunks, pad_to)
    assert span is not None, "the plain step runs the model's own forward"
    return plain_step(model, span, dec, dec_groups, chunks)


def matmul_table(model: Model, max_rows: int = 64, reps: int = 3) -> list[float]:
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

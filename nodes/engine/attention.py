"""Attention for the fused step, faster than MLX's on the CPU backend.

MLX's CPU `exp` is scalar code: about 24 ns per element here, against 0.3 ns
for a multiply. Attention's softmax does one exp per query per key, so for a
prompt chunk over a long cache the exps cost more than every matmul in the layer
(a 64-token chunk over 2k keys: 19 of the 27 ms its attention takes). This
module computes exp as 2^k * p(f) from multiplies and adds that `mx.compile`
fuses into one vectorised loop (about 1 ns per element; relative error below
3e-7, float32's own rounding), and runs grouped-query attention as two batched
matmuls without repeating the keys. On a GPU backend MLX's fused kernel wins, so
`attend` uses it there.

A prompt chunk's attention (`attend_chunk`) goes through numpy instead, about
twice as fast again (a 256-token chunk over 2k keys, 9 heads: 40 ms against 65-82):
its scores are the one large array of a prefill (19 MB there), each MLX op makes
a new one (about 14 passes over it, at the memory's speed), where numpy works in
place in blocks of queries, with a vectorised exp, and skips the keys a block
cannot see. Chunks of a long prompt go this way in the lane and in the step
alike (from CHUNK_MIN); a 2k prompt's first token alone 11.1-12.9 s against
12.9-15.5 s, the same tokens.
"""

from __future__ import annotations

import math

import numpy as np

from exo.nodes.engine.mlxenv import Mask, mx, numpy_blas_single

LOG2E = 1.4426950408889634
ROUND = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds a float32 to an integer
# Taylor coefficients of 2**f = e**(f ln 2), |f| <= 0.5.
C = [math.log(2) ** i / math.factorial(i) for i in range(7)]
# A mask value: exp of it underflows to the smallest normal float, weight ~1e-38.
MASKED = -1e30


@mx.compile
def _split(x: mx.array) -> tuple[mx.array, mx.array]:
    t = mx.maximum(x * LOG2E, -126.0)
    k = (t + ROUND) - ROUND
    return t - k, k


@mx.compile
def _pow2(f: mx.array, k: mx.array) -> mx.array:
    # Split in two compiled functions: past about a dozen ops MLX splits the
    # fused kernel on its own, badly (3 ns per element instead of 1).
    p = (((((C[6] * f + C[5]) * f + C[4]) * f + C[3]) * f + C[2]) * f + C[1]) * f + 1.0
    return p * mx.left_shift(k.astype(mx.int32) + 127, 23).view(mx.float32)


def fast_exp(x: mx.array) -> mx.array:
    """exp for float32 x <= 0 (softmax after subtracting the max)."""
    return _pow2(*_split(x))


def additive_mask(mask: Mask, n: int, cached: int) -> mx.array | None:
    """mlx-lm's mask for `n` queries (None, "causal", or a bool array [B, 1, n,
    keys]) as float to add to the scores; made once per step, shared by every
    layer. `cached`: the keys before these queries, read only for "causal"."""
    if mask is None:
        return None
    if isinstance(mask, str):
        length = int(cached) + n
        q = mx.arange(length - n, length)[:, None]
        mask = (q >= mx.arange(length)[None]).reshape(1, 1, n, length)
    return mx.where(mask, 0.0, MASKED).astype(mx.float32)


def attend(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """q [B, H, n, d]; k, v [B, Hk, L, d]; mask additive, broadcastable to
    [B, 1, n, L] -> [B, H, n, d]."""
    B, H, n, d = q.shape
    Hk = k.shape[1]
    g = H // Hk
    s = (q * scale).reshape(B, Hk, g * n, d) @ k.swapaxes(-1, -2)
    if mask is not None:
        s = (s.reshape(B, Hk, g, n, -1) + mx.expand_dims(mask, 2)).reshape(B, Hk, g * n, -1)
    p = fast_exp(s - mx.max(s, axis=-1, keepdims=True))
    o = (p @ v) / mx.sum(p, axis=-1, keepdims=True)
    return o.reshape(B, H, n, d)


BLOCK = 32  # queries per block in attend_chunk: a block's scores stay in the core's cache
# Within a block's own keys, which each query may not see (its top-left b x b for a
# shorter last block).
_FUTURE = np.triu(np.ones((BLOCK, BLOCK), bool), 1)
# Queries x keys from which a chunk goes through attend_chunk. Below, its sync (the
# step's graph waits for the chunk's q, k, v) and copies cost more than MLX's passes
# save (a short prompt's first token came later through numpy).
CHUNK_MIN = 32768


def attend_chunk(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention of a prompt chunk: q [1, H, n, d], the chunk's queries; k, v
    [1, Hk, L, d], the prompt's keys so far, the chunk's last -> [1, H, n, d].
    Evaluates its inputs: the caller's graph waits here."""
    numpy_blas_single()
    mx.eval(q, k, v)
    _, H, n, d = q.shape
    Hk, L = k.shape[1], k.shape[2]
    g, past = H // Hk, L - n
    qs = np.asarray(q[0] * scale)
    ks, vs = np.asarray(k[0]), np.asarray(v[0])
    out = np.empty((H, n, d), np.float32)
    for h in range(Hk):
        kt, vh = np.ascontiguousarray(ks[h].T), vs[h]
        for i in range(0, n, BLOCK):
            b = min(BLOCK, n - i)
            seen = past + i + b  # keys up to the block's last query: no query sees past them
            s = qs[g * h : g * (h + 1), i : i + b].reshape(g * b, d) @ kt[:, :seen]
            # the block's own b keys, causally: query j sees up to key j
            s.reshape(g, b, seen)[:, :, seen - b :][:, _FUTURE[:b, :b]] = -np.inf
            s -= s.max(axis=1, keepdims=True)
            np.exp(s, out=s)
            o = (s @ vh[:seen]) / s.sum(axis=1, keepdims=True)
            out[g * h : g * (h + 1), i : i + b] = o.reshape(g, b, d)
    return mx.array(out[None])

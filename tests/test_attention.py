"""The fused step's own attention against MLX's kernel, and its exp."""

from __future__ import annotations

import pytest

from exo.nodes.engine import attention
from exo.nodes.engine.mlxenv import mx


def test_fast_exp_is_exact_to_float32_rounding_over_the_softmax_range() -> None:
    x = mx.concatenate([mx.linspace(-87.0, 0.0, 100_001), mx.array([0.0, -1e-8, -0.5])])
    got, want = attention.fast_exp(x), mx.exp(x)
    assert mx.max(mx.abs(got - want) / want).item() < 1e-6
    # far below the smallest normal float it gives a negligible weight, never inf or nan
    tiny = attention.fast_exp(mx.array([-200.0, -1e30]))
    assert mx.all(tiny >= 0).item() and mx.max(tiny).item() < 1e-37


@pytest.mark.parametrize(
    ("batch", "n", "length", "mask"),
    [
        (1, 1, 300, None),  # one decode row
        (1, 17, 300, "causal"),  # a prompt chunk over a cache
        (1, 40, 40, "causal"),  # a first chunk
        (3, 1, 50, "padded"),  # a left-padded decode batch
    ],
)
def test_attend_equals_mlx_attention(batch: int, n: int, length: int, mask: str | None) -> None:
    mx.random.seed(0)
    q = mx.random.normal((batch, 9, n, 64))
    k, v = mx.random.normal((batch, 3, length, 64)), mx.random.normal((batch, 3, length, 64))
    given: mx.array | str | None = mask
    if mask == "padded":  # row i sees only its last length - 7 * i keys
        pad = mx.array([7 * i for i in range(batch)])
        given = (mx.arange(length)[None] >= pad[:, None]).reshape(batch, 1, 1, length)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=given)
    got = attention.attend(q, k, v, 0.125, attention.additive_mask(given, n, length - n))
    assert got.shape == want.shape
    assert mx.max(mx.abs(got - want)).item() < 1e-5


@pytest.mark.parametrize(
    ("n", "length"),
    [
        (40, 40),  # a first chunk, blocks of queries and a partial last block
        (17, 300),  # a chunk over a cache, shorter than a block
        (256, 1024),  # the lane's chunk over 1k keys
    ],
)
def test_attend_chunk_equals_mlx_causal_attention_over_a_sliced_cache(n: int, length: int) -> None:
    mx.random.seed(1)
    q = mx.random.normal((1, 9, n, 64))
    # keys and values as a KVCache hands them over: a slice of a longer buffer
    k, v = (mx.random.normal((1, 3, length + 256, 64))[:, :, :length] for _ in range(2))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    got = attention.attend_chunk(q, k, v, 0.125)
    assert got.shape == want.shape and got.dtype == mx.float32
    assert mx.max(mx.abs(got - want)).item() < 1e-5

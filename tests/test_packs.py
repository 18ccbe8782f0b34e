"""Fresh short prompts in one step attend as one right-padded group (forward.packs):
each gets the logits and the cache it gets alone."""

from __future__ import annotations

from pathlib import Path

from exo.nodes.engine.mlxenv import mx  # before mlx_lm: it loads OpenBLAS for MLX (mlxenv.py)

# isort: split
from mlx_lm.models.cache import KVCache

from exo.nodes.engine.forward import PACK_MAX, Chunk, fused_step, packs
from exo.nodes.engine.model import load_model

LAYERS = 4


def chunk(tokens: list[int], end: int | None = None) -> Chunk:
    return Chunk(tokens, [KVCache() for _ in range(LAYERS)], logits=True, end=end)


def test_fresh_prompts_pack_by_length_and_the_rest_go_alone() -> None:
    started = chunk([1] * 4)
    started.cache[0].update_and_fetch(mx.zeros((1, 1, 3, 2)), mx.zeros((1, 1, 3, 2)))
    chunks = [
        chunk([1] * 5),
        chunk([1] * 7),  # 5, 7, 3, 2: all round up to 8 tokens
        chunk([1] * 20),  # alone in its length (24)
        chunk([1] * 3),
        chunk([1] * 6, end=2),  # through some layers only
        started,  # past its first tokens
        chunk([1] * (PACK_MAX + 1)),  # too long to pad
        chunk([1] * 2),
    ]
    assert packs(chunks, LAYERS) == [[0, 1, 3, 7], [2], [4], [5], [6]]


def test_packed_prompts_get_their_own_logits_and_keys(tiny_path: Path) -> None:
    lm = load_model("tiny", tiny_path)
    layers = len(lm.model.model.layers)
    # one pack of four lengths (right-padded to 8), one prompt alone
    prompts = [
        [5, 6, 7, 8, 9],
        [10, 11, 12, 13, 14, 15, 16],
        [3, 4, 5],
        [20, 21],
        list(range(30, 50)),
    ]

    def fresh(p: list[int]) -> Chunk:
        return Chunk(p, [KVCache() for _ in range(layers)], logits=True)

    together = [fresh(p) for p in prompts]
    assert packs(together, layers) == [[0, 1, 2, 3], [4]]
    dec, outs = fused_step(lm.model, [], [], together)
    assert dec is None
    for p, c, out in zip(prompts, together, outs, strict=True):
        alone = fresh(p)
        _, (ref,) = fused_step(lm.model, [], [], [alone])
        assert out is not None and ref is not None
        assert mx.allclose(out, ref, atol=1e-4).item(), p
        for mine, theirs in zip(c.cache, alone.cache, strict=True):
            assert mine.offset == theirs.offset == len(p)
            for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                assert mx.allclose(a[..., : len(p), :], b[..., : len(p), :], atol=1e-5).item()

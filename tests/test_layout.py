"""Input-major weights (nodes/engine/layout.py): the same products as mlx-lm's layers."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from exo.nodes.engine.layout import (
    InputMajorEmbedding,
    InputMajorLinear,
    embedding_dims,
    input_major,
)
from exo.nodes.engine.mlxenv import mx
from exo.nodes.engine.model import Part, load_model


@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_mlx_linear(bias: bool) -> None:
    mx.random.seed(1)
    lin = nn.Linear(48, 80, bias=bias)
    if bias:
        lin.bias = mx.random.normal((80,))
    x = mx.random.normal((5, 48))
    ours = InputMajorLinear(lin)
    assert ours.weight_t.shape == (48, 80)
    assert mx.allclose(ours(x), lin(x), atol=1e-5).item()


def test_embedding_equals_mlx_embedding() -> None:
    mx.random.seed(2)
    emb = nn.Embedding(100, 24)
    ours = InputMajorEmbedding(emb)
    ids = mx.array([[3, 99, 0], [7, 7, 42]])
    assert (ours(ids) == emb(ids)).all().item()  # a lookup: exact
    assert ours(ids).shape == (2, 3, 24)
    assert (ours(mx.array([5]))[0] == emb.weight[5]).all().item()
    x = mx.random.normal((4, 24))
    assert mx.allclose(ours.as_linear(x), emb.as_linear(x), atol=1e-5).item()
    assert embedding_dims(ours) == embedding_dims(emb) == 24


def _kinds(module: nn.Module) -> set[type]:
    return {type(m) for _, m in module.named_modules()}


@pytest.mark.parametrize("which", ["tiny", "smollm"])
def test_loaded_model_is_input_major_and_computes_the_same(
    which: str, tiny_path: Path, smollm_path: Path
) -> None:
    from mlx_lm.utils import load_model as mlx_load_model

    path = tiny_path if which == "tiny" else smollm_path
    lm = load_model(which, path)
    kinds = _kinds(lm.model)
    assert nn.Linear not in kinds and nn.Embedding not in kinds
    assert InputMajorLinear in kinds and InputMajorEmbedding in kinds
    ref, _ = mlx_load_model(path)
    # same parameters, same bytes
    params = cast(list[tuple[str, mx.array]], tree_flatten(ref.parameters()))
    assert lm.nbytes == sum(v.nbytes for _, v in params)
    ids = mx.array([[1, 5, 9, 200, 17, 3, 64, 101]])
    ours, theirs = lm.model(ids), ref(ids)
    assert mx.allclose(ours, theirs, atol=1e-4, rtol=1e-4).item()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all().item()


def test_a_stage_converts_only_what_it_holds(tiny_path: Path) -> None:
    middle = load_model("m", tiny_path, Part(1, 3, 4))
    inner = middle.model.model
    assert all(
        type(layer.self_attn.q_proj) is InputMajorLinear
        and type(layer.mlp.down_proj) is InputMajorLinear
        for layer in inner.layers
    )
    # Neither the embedding nor the head is this stage's: left as loaded, not read.
    assert type(inner.embed_tokens) is nn.Embedding
    assert type(middle.model.lm_head) is nn.Linear
    first = load_model("f", tiny_path, Part(0, 2, 4))
    assert type(first.model.model.embed_tokens) is InputMajorEmbedding
    assert type(first.model.lm_head) is nn.Linear


def test_quantized_and_integer_layers_are_left_alone() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.QuantizedLinear(64, 64))
    assert input_major(model) == 1
    assert type(model.layers[0]) is InputMajorLinear
    assert type(model.layers[1]) is nn.QuantizedLinear

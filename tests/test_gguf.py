"""The GGUF import against a reference path and on perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import pytest

from exo.nodes.engine.mlxenv import mx

PROSE = (
    "The history of the city goes back more than two thousand years. It began as a small "
    "fishing village on the banks of the river, where a few families built their houses from "
    "wood and stone. Over the centuries the village grew into a town, and the town into a city "
    "with markets, churches and a university. Today it is known for its museums, its parks and "
    "its busy streets, and millions of visitors come every year to walk along the river and "
    "see the old buildings that still stand in the centre."
)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    out = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=make_sampler(0.0)):
        out.append(int(tok))
    return out


def reference_model(gguf: Path, config: dict):
    """SmolLM2 straight from the GGUF's packed 4-bit weights, run by MLX's quantized kernels."""
    import mlx.nn as nn
    from mlx_lm.models.llama import Model, ModelArgs

    from exo.tools.gguf import GGUF_GROUP_SIZE, hf_name, unpermute_rope

    tensors = mx.load(str(gguf))
    model = Model(ModelArgs.from_dict(config))
    bits = {}  # GGUF mixes widths (SmolLM2's Q4_1 file keeps embeddings at 8 bits)
    for name, arr in tensors.items():
        if name.endswith(".scales"):
            base = name.removesuffix(".scales")
            packed = tensors[base + ".weight"].shape[-1]
            bits[hf_name(base + ".weight").removesuffix(".weight")] = (
                packed * 32 // (arr.shape[-1] * GGUF_GROUP_SIZE)
            )
    nn.quantize(
        model,
        class_predicate=lambda path, m: (
            {"group_size": GGUF_GROUP_SIZE, "bits": bits[path]} if path in bits else False
        ),
    )
    weights = {}
    for name, arr in tensors.items():
        base, leaf = name.rsplit(".", 1)
        if leaf != "weight" and arr.dtype == mx.float16:
            arr = arr.astype(mx.float32)
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
        kind = base.split(".")[2] if base.startswith("blk") else ""
        if kind in heads:
            arr = unpermute_rope(arr, heads[kind])
        weights[hf_name(f"{base}.{leaf}")] = arr
    model.load_weights(list(weights.items()))
    return model


def perplexity(model, ids: list[int]) -> float:
    logits = model(mx.array([ids[:-1]]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, mx.array(ids[1:])[:, None], axis=-1).mean()
    return math.exp(cast(float, nll.item()))


@pytest.fixture(scope="module")
def imported(smollm_path: Path):
    from mlx_lm import load

    return load(str(smollm_path))


def test_import_matches_the_quantized_reference(imported, smollm_path: Path) -> None:
    from exo.tools.default_model import fetch_gguf

    model, tok = imported
    config = json.loads((smollm_path / "config.json").read_text())
    ref = reference_model(fetch_gguf(), config)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], add_generation_prompt=True
    )
    ours = greedy(model, prompt, 24)
    theirs = greedy(ref, prompt, 24)
    assert ours == theirs
    assert len(set(ours)) > 5  # a real answer, not one token repeated


def test_perplexity_on_prose_is_that_of_a_working_model(imported) -> None:
    model, tok = imported
    ids = tok.encode(PROSE)
    assert len(ids) > 80
    ppl = perplexity(model, ids)
    assert ppl < 40, ppl


def test_tokenizer_round_trips_and_knows_the_chat_tokens(imported) -> None:
    _, tok = imported
    text = "Hello, world! 12345 naïve café"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_end|>") == [2]
    assert 2 in tok.eos_token_ids


def test_unsupported_architecture_is_a_clear_error() -> None:
    from exo.tools.gguf import GGUFError, build_config

    with pytest.raises(GGUFError, match="llama"):
        build_config({"general.architecture": "mamba"}, has_output=True)

"""Every architecture people run answers what mlx-lm answers: whole, batched and
split. Tiny random-weight models of each (exo-tools models make-tiny --arch),
greedy, token by token against mlx-lm's own `generate_step` on the same folder.

Each case drives the engine with requests joining mid-stream (arrivals at steps
0, 3 and 7) and a prefill budget of 12 tokens, so prompts longer than a chunk
prefill in pieces beside running decodes, and prompts longer than the sliding
windows (8 tokens) of mistral and gemma3 reach past them; on one node, and split
into 2 and 3 pipeline stages (tests/test_stages.py's in-process pipeline).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exo.nodes.engine.mlxenv import mx
from exo.nodes.engine.model import load_model, model_meta
from exo.nodes.engine.span import SPLITTABLE
from exo.tools.tiny import ARCHS, make_tiny
from tests.test_stages import PROMPTS, drive, pipeline

LAYERS = 6
EOS = 2  # the tiny tokenizer's
ARRIVALS = {0: ["r0", "r1"], 3: ["r2"], 7: ["r3"]}
# (arch, bits, group size): every architecture in float32, and quantized ones as
# mlx-community ships them (embeddings quantized too).
CASES = [(a, None, 0) for a in sorted(ARCHS)] + [
    ("llama", 4, 64),
    ("qwen3", 4, 32),
    ("qwen3", 8, 64),
    ("qwen3_moe", 4, 32),
    ("gemma3_text", 4, 32),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("archs")


def reference(path: Path, rid: str, max_tokens: int) -> list[int]:
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as mlx_load
    from mlx_lm.utils import load_tokenizer

    model, _ = mlx_load(path)
    prompt = load_tokenizer(path).encode(PROMPTS[int(rid[1:]) % len(PROMPTS)])
    out = []
    greedy = lambda x: mx.argmax(x, axis=-1)  # noqa: E731
    for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=greedy):
        if int(t) == EOS:
            break
        out.append(int(t))
    return out


@pytest.mark.parametrize("arch,bits,group", CASES, ids=lambda v: str(v))
def test_whole_batched_and_split_answer_what_mlx_lm_answers(
    tiny_dir: Path, arch: str, bits: int | None, group: int
) -> None:
    path = make_tiny(
        tiny_dir / f"{arch}-{bits}-{group}",
        arch=arch,
        hidden=128,
        layers=LAYERS,
        bits=bits,
        group_size=group or 32,
    )
    assert model_meta(path)["split"] == (arch in SPLITTABLE)
    # drive() gives the i-th arrival of a step max_tokens 8 + i
    want = {
        rid: reference(path, rid, 8 + i) for rid, i in (("r0", 0), ("r1", 1), ("r2", 0), ("r3", 0))
    }
    assert sum(len(v) for v in want.values()) >= 12  # not trivially equal
    for bounds in ([0, LAYERS], [0, 3, LAYERS], [0, 1, 4, LAYERS]):
        assert drive(pipeline(path, bounds), ARRIVALS) == want, f"stages {bounds}"


def test_every_splittable_architecture_is_checked_here() -> None:
    assert set(ARCHS) >= SPLITTABLE


def test_quantized_embeddings_report_their_real_width(tiny_dir: Path) -> None:
    from exo.nodes.engine.layout import embedding_dims

    path = make_tiny(tiny_dir / "q-width", arch="qwen3", hidden=128, layers=2, bits=4)
    lm = load_model("q", path)
    assert embedding_dims(lm.model.model.embed_tokens) == 128

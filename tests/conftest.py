from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

TINY = "test/tiny-llama"
# A non-llama architecture for the tests over real processes: sliding windows, a
# head tied by its absence from the checkpoint, a scaled embedding.
TINY_GEMMA3 = "test/tiny-gemma3_text"
# A tiny llama whose chat template renders tools (Qwen's way): tool calls' shapes.
TINY_TOOLS = "test/tiny-tools"
# A tiny llama that thinks (<think> tokens; its template opens the block).
TINY_THINK = "test/tiny-think"


def test_models_dir() -> Path:
    d = Path(os.environ.get("EXO_TEST_MODELS", Path.home() / ".exo" / "test-models"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """A models directory holding the tiny model and SmolLM2 (built once, kept between runs)."""
    from exo.nodes.store.store import ModelStore, incomplete_reason
    from exo.tools.default_model import pull_default
    from exo.tools.tiny import make_tiny

    d = test_models_dir()
    tiny = ModelStore(d).path(TINY)
    if incomplete_reason(tiny) is not None:
        make_tiny(tiny)
    gemma = ModelStore(d).path(TINY_GEMMA3)
    if incomplete_reason(gemma) is not None:
        make_tiny(gemma, arch="gemma3_text", hidden=128, layers=6)
    tools = ModelStore(d).path(TINY_TOOLS)
    if incomplete_reason(tools) is not None:
        make_tiny(tools, tools=True)
    think = ModelStore(d).path(TINY_THINK)
    if incomplete_reason(think) is not None:
        make_tiny(think, thinking=True)
    pull_default(d)
    return d


@pytest.fixture(scope="session")
def tiny_path(models_dir: Path) -> Path:
    from exo.nodes.store.store import ModelStore

    return ModelStore(models_dir).path(TINY)


@pytest.fixture(scope="session")
def smollm_path(models_dir: Path) -> Path:
    from exo.nodes.store.store import ModelStore
    from exo.tools.default_model import DEFAULT_MODEL

    return ModelStore(models_dir).path(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def cluster(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Broker (with the API) and one node, as separate processes on loopback."""
    from exo.tools.cluster import LocalCluster

    c = LocalCluster.on_free_ports(models_dir, log_dir=tmp_path_factory.mktemp("cluster-logs"))
    with c:
        yield c


def needs_root_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    return None

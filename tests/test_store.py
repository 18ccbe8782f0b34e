import json
from pathlib import Path

from exo.nodes.store.store import ModelStore, incomplete_reason


def make(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_complete_partial_empty_and_missing_shard(tmp_path: Path) -> None:
    ok = make(tmp_path / "org--ok", {"config.json": "{}", "model.safetensors": "x"})
    partial = make(
        tmp_path / "org--partial", {"config.json": "{}", "model.safetensors.partial": "x"}
    )
    empty = make(tmp_path / "org--empty", {})
    index = {"weight_map": {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}}
    sharded = make(
        tmp_path / "org--sharded",
        {
            "config.json": "{}",
            "model-00001.safetensors": "x",
            "model.safetensors.index.json": json.dumps(index),
        },
    )
    assert incomplete_reason(ok) is None
    assert "partial" in (incomplete_reason(partial) or "")
    assert incomplete_reason(empty) == "empty folder"
    assert "model-00002" in (incomplete_reason(sharded) or "")
    assert ModelStore(tmp_path).scan() == {"org/ok": ok}


def test_ids_map_to_folders(tmp_path: Path) -> None:
    assert ModelStore(tmp_path).path("HuggingFaceTB/SmolLM2-135M-Instruct").name == (
        "HuggingFaceTB--SmolLM2-135M-Instruct"
    )

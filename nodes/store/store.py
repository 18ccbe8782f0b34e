"""The node's model store: which models are on this machine's disk, complete.

A model with id `org/name` lives in the folder `org--name` under the models
directory. A folder is a complete model when it is non-empty, holds no
`*.partial` file, has a config.json, and holds every weight shard its
safetensors index names. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from exo.common.names import valid_model_id


def default_models_dir() -> Path:
    env = os.environ.get("EXO_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".exo" / "models"


def folder_name(model_id: str) -> str:
    if not valid_model_id(model_id):
        raise ValueError(f"{model_id!r} is not a model id (ORG/NAME, as on the hub)")
    return model_id.replace("/", "--")


def model_id_of(folder: str) -> str:
    return folder.replace("--", "/", 1)


def incomplete_reason(path: Path) -> str | None:
    """None if `path` is a complete model folder, else why it is not."""
    if not path.is_dir():
        return "not a folder"
    files = [p for p in path.rglob("*") if p.is_file()]
    if not files:
        return "empty folder"
    partial = [p.name for p in files if p.name.endswith(".partial")]
    if partial:
        return f"partial files: {', '.join(sorted(partial)[:3])}"
    if not (path / "config.json").is_file():
        return "no config.json"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as e:
            return f"unreadable safetensors index: {e}"
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            return f"missing shards: {', '.join(sorted(missing)[:3])}"
    elif not any(p.suffix == ".safetensors" for p in files):
        return "no safetensors weights"
    return None


class ModelStore:
    """One writable models directory (downloads go there) and any number of
    read-only ones (a shared disk, a folder copied by hand)."""

    def __init__(self, models_dir: Path, extra_dirs: list[Path] | None = None) -> None:
        self.models_dir = models_dir
        self.extra_dirs = list(extra_dirs or [])

    def path(self, model_id: str) -> Path:
        """Where a download of `model_id` goes."""
        return self.models_dir / folder_name(model_id)

    def scan(self) -> dict[str, Path]:
        """Complete models on disk, by id; the writable directory wins a tie."""
        found: dict[str, Path] = {}
        for d in [*reversed(self.extra_dirs), self.models_dir]:
            if not d.is_dir():
                continue
            for entry in sorted(d.iterdir()):
                if entry.name.endswith(".partial") or entry.name.startswith("."):
                    continue
                if incomplete_reason(entry) is None:
                    found[model_id_of(entry.name)] = entry
        return found

"""Options more than one exo-tools command takes."""

from __future__ import annotations

from pathlib import Path

import click


def resolve_models_dir(value: Path | None) -> Path:
    from exo.nodes.store.store import default_models_dir

    return value or default_models_dir()


models_dir_option = click.option(
    "--models-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Models directory (env EXO_MODELS_DIR, default ~/.exo/models).",
)

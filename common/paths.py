"""Where exo keeps its files on a machine."""

from __future__ import annotations

import os
from pathlib import Path


def exo_home() -> Path:
    """`EXO_HOME`, or ~/.exo: keys, logs, caches, the broker's journal."""
    return Path(os.environ.get("EXO_HOME", Path.home() / ".exo")).expanduser()


def write_private(path: Path, data: bytes) -> None:
    """`data` into `path`, readable by this user only (0600, its folder 0700 when
    made here), whole or not at all: written beside it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)

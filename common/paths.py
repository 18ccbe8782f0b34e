"""Where exo keeps its files on a machine."""

from __future__ import annotations

import os
from pathlib import Path


def exo_home() -> Path:
    """`EXO_HOME`, or ~/.exo: keys, logs, caches, the broker's journal."""
    return Path(os.environ.get("EXO_HOME", Path.home() / ".exo")).expanduser()

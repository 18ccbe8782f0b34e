"""Logging set-up shared by every exo process.

One line per event. The console gets INFO (or what `--log`/`EXO_LOG` say per
module); a log file, when given, gets DEBUG for everything so that a failure
can be read after the fact without re-running at a higher level.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from exo.common.paths import exo_home

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"


def parse_spec(spec: str) -> tuple[int | None, dict[str, int]]:
    """Parse "info" or "broker=info,nodes.engine=debug" into (default, per-module)."""
    default: int | None = None
    per: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, level = part.rpartition("=")
        lvl = logging.getLevelName(level.strip().upper())
        if not isinstance(lvl, int):
            raise ValueError(f"unknown log level {level!r} in {spec!r}")
        if sep:
            mod = name.strip()
            per[mod if mod.startswith("exo") else f"exo.{mod}"] = lvl
        else:
            default = lvl
    return default, per


class _ModuleFilter(logging.Filter):
    """Console filter: a record passes if its most specific configured module allows it."""

    def __init__(self, default: int, per: dict[str, int]) -> None:
        super().__init__()
        self.default = default
        self.per = sorted(per.items(), key=lambda kv: -len(kv[0]))

    def filter(self, record: logging.LogRecord) -> bool:
        for mod, lvl in self.per:
            if record.name == mod or record.name.startswith(mod + "."):
                return record.levelno >= lvl
        return record.levelno >= self.default


def setup(spec: str | None = None, log_file: str | Path | None = None) -> None:
    spec = spec if spec is not None else os.environ.get("EXO_LOG", "")
    default, per = parse_spec(spec)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG)
    fmt = logging.Formatter(FORMAT, DATEFMT)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.addFilter(_ModuleFilter(default if default is not None else logging.INFO, per))
    root.addHandler(console)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        fh.setLevel(logging.DEBUG)
        root.addHandler(fh)
    # Third-party chatter stays at WARNING unless asked for by name.
    for noisy in (
        "httpx",
        "httpcore",
        "httpx2",
        "httpcore2",
        "urllib3",
        "filelock",
        "asyncio",
        "huggingface_hub",
    ):
        logging.getLogger(noisy).setLevel(per.get(noisy, logging.WARNING))
    logging.getLogger("uvicorn.access").setLevel(per.get("uvicorn.access", logging.WARNING))


def default_log_file(process: str) -> Path:
    return exo_home() / "logs" / f"{process}-{os.getpid()}.log"

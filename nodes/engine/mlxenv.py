"""Import MLX the fast way.

The Linux `mlx[cpu]` wheel links the reference BLAS (about 4 GFLOP/s on float32
matmul). Loading OpenBLAS with RTLD_GLOBAL before `mlx.core` makes MLX resolve
its BLAS symbols there instead: prefill gets about 15x faster. numpy's bundled
OpenBLAS cannot serve, its symbols are prefixed. Every module that needs MLX
imports it through here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from typing import Any, TypeAlias, cast

log = logging.getLogger(__name__)

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

blas: str = "native" if platform.system() == "Darwin" else "reference"
_openblas: ctypes.CDLL | None = None
_openblas_threads = 0  # OpenBLAS's own thread count, as it started


def _preload_openblas() -> None:
    global blas, _openblas, _openblas_threads
    if platform.system() != "Linux" or "mlx.core" in sys.modules:
        return
    override = os.environ.get("EXO_OPENBLAS")
    paths = (override,) if override else OPENBLAS_CANDIDATES
    for path in paths:
        if path and os.path.exists(path):
            try:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:  # pragma: no cover - depends on the host
                log.warning("could not load %s: %s", path, e)
                continue
            blas = f"openblas ({path})"
            _openblas, _openblas_threads = lib, lib.openblas_get_num_threads()
            return


_preload_openblas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

# What mlx-lm leaves loose, typed once. A model is an nn.Module whose layers and
# arguments are its own attributes (Module's __getattr__: untyped). A layer's cache is
# one of mlx-lm's KVCache, RotatingKVCache, ArraysCache... or this project's RowCache:
# they share no public base class, and mlx-lm passes them as Any itself.
Model: TypeAlias = nn.Module
LayerCache: TypeAlias = Any
# An attention mask as mlx-lm makes them: none, "causal", or an array
Mask: TypeAlias = mx.array | str | None

if blas == "reference":
    log.warning(
        "MLX runs without OpenBLAS: prefill will be about 15x slower. "
        "Install it (Debian/Ubuntu: apt-get install libopenblas0-pthread) or set EXO_OPENBLAS."
    )


def ints(a: mx.array) -> list[int]:
    """A 1-D integer array's values (mlx's stubs type tolist() for every shape)."""
    return cast(list[int], a.tolist())


def floats(a: mx.array) -> list[float]:
    """A 1-D float array's values."""
    return cast(list[float], a.tolist())


def blas_threads_now() -> int:
    """OpenBLAS's threads per call now, as OpenBLAS reports it (0 without it)."""
    return int(_openblas.openblas_get_num_threads()) if _openblas is not None else 0


def blas_max_threads() -> int:
    """OpenBLAS's thread count as it started (0 without OpenBLAS)."""
    return _openblas_threads if _openblas is not None else 0


def blas_threads(n: int | None) -> None:
    """OpenBLAS's threads per call: `n`, or None (or 0) for as many as it started
    with. Not while any thread is inside a BLAS call (OpenBLAS resizes its pool)."""
    n = n or _openblas_threads
    if _openblas is not None and n != blas_threads_now():
        _openblas.openblas_set_num_threads(n)


_numpy_single = False


def numpy_blas_single() -> None:
    """numpy's own OpenBLAS (its wheels bundle one, apart from MLX's) to one thread,
    once: attention.attend_chunk runs its matmuls beside the engine's step on a
    core of its own, where a second thread would only contend with the step."""
    global _numpy_single
    if _numpy_single:
        return
    _numpy_single = True
    import glob

    import numpy as np

    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in glob.glob(os.path.join(libs, "libscipy_openblas*.so*")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(1)
                return


__all__ = [
    "mx",
    "blas",
    "blas_max_threads",
    "blas_threads",
    "blas_threads_now",
    "numpy_blas_single",
]

"""MLX gets OpenBLAS whichever of the node's modules is imported first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NODES = Path(__file__).resolve().parent.parent / "nodes"


def _mlx_modules() -> list[str]:
    """The node's modules that bring in MLX, directly or through mlx-lm."""
    out = []
    for f in sorted(NODES.rglob("*.py")):
        text = f.read_text()
        if f.stem not in ("mlxenv", "__init__") and ("mlx" in text and "import" in text):
            out.append("exo.nodes." + ".".join(f.relative_to(NODES).with_suffix("").parts))
    return out


def _openblas_here() -> bool:
    return any(
        Path(f"/usr/lib/{a}-linux-gnu/openblas-pthread").exists() for a in ("x86_64", "aarch64")
    )


@pytest.mark.skipif(
    not os.environ.get("CI") and (sys.platform != "linux" or not _openblas_here()),
    reason="OpenBLAS is a Linux package here (make installs it)",
)
@pytest.mark.parametrize("module", _mlx_modules())
def test_mlx_resolves_blas_in_openblas_whatever_is_imported_first(module: str) -> None:
    code = f"import {module}\nfrom exo.nodes.engine import mlxenv\nprint(mlxenv.blas)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # "reference" is MLX's bundled BLAS: ~15x slower prefill (mlxenv.py)
    assert out.stdout.strip().startswith("openblas"), (module, out.stdout, out.stderr)

"""Weights laid out the way MLX's CPU backend multiplies them fastest.

mlx-lm keeps a Linear's weight as [out, in] and multiplies `x @ weight.T`. On the
CPU backend that goes to OpenBLAS's sgemm with the weight transposed, which is
20-30% slower than the same product over the weight stored [in, out]
(docs/NOTES.md). A decode step reads every weight once
for a handful of rows, so the layout is most of its time. So a node on the CPU
backend stores its float weights transposed once, at load, and multiplies them
as they lie. Same parameters, same memory; the embedding lookup reads a
column per token instead of a row, a few thousand scattered reads a step.
"""

from __future__ import annotations

import os
from typing import cast

from exo.nodes.engine.mlxenv import mx  # before mlx.nn: it loads OpenBLAS for MLX (mlxenv.py)

# isort: split
import mlx.nn as nn

FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def wanted() -> bool:
    """On MLX's CPU backend, unless EXO_INPUT_MAJOR=0 (to compare, or to rule it out)."""
    return mx.default_device() == mx.cpu and os.environ.get("EXO_INPUT_MAJOR", "1") != "0"


class InputMajorLinear(nn.Module):
    """nn.Linear's product over its weight stored [in, out]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(linear.weight.T)
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight_t)
        return x @ self.weight_t


class InputMajorEmbedding(nn.Module):
    """nn.Embedding with its table stored [dims, vocab]: as the output projection
    of tied embeddings it is the largest matrix a decode step reads."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(embedding.weight.T)

    @property
    def dims(self) -> int:
        return int(self.weight_t.shape[0])

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.moveaxis(mx.take(self.weight_t, ids, axis=1), 0, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight_t


def input_major(module: nn.Module, within: list[nn.Module] | None = None) -> int:
    """Replace the float Linear and Embedding layers under `module` with input-major
    ones, one weight at a time (the peak is one matrix more than the model). Only
    those in or under a module of `within` (default: all): a pipeline stage leaves
    the layers it does not hold unloaded. Returns how many were replaced."""
    return _walk(module, within, within is None or any(module is w for w in within))


def _walk(module: nn.Module, within: list[nn.Module] | None, inside: bool) -> int:
    swapped = 0
    for name, child in list(module.children().items()):
        items = list(enumerate(child)) if isinstance(child, list) else [(None, child)]
        for i, c in items:
            if not isinstance(c, nn.Module):
                continue
            here = inside or any(c is w for w in within or [])
            new = _swap(c) if here else None
            if new is None:
                swapped += _walk(c, within, here)
            elif i is None:
                setattr(module, name, new)
                swapped += 1
            else:
                module[name][i] = new  # children() hands back a copy of the list
                swapped += 1
    return swapped


def _swap(m: nn.Module) -> nn.Module | None:
    kind = type(m)
    if kind not in (nn.Linear, nn.Embedding) or m.weight.dtype not in FLOATS:
        return None
    new: nn.Module = (
        InputMajorLinear(cast(nn.Linear, m))
        if kind is nn.Linear
        else InputMajorEmbedding(cast(nn.Embedding, m))
    )
    mx.eval(new.parameters())
    return new


def embedding_dims(embedding: nn.Module) -> int:
    """The width of an embedding layer: either layout, or quantized (its weight
    packs 32 // bits values into each uint32)."""
    if isinstance(embedding, InputMajorEmbedding):
        return embedding.dims
    if isinstance(embedding, nn.QuantizedEmbedding):
        return int(embedding.weight.shape[1]) * 32 // int(embedding.bits)
    return int(embedding.weight.shape[1])

"""Batch-invariant matmuls: every row of a step computed bit for bit as it would be alone.

CPU matmul kernels pick their code path by shape: one row (a matrix-vector path) or a
ragged tail of rows goes through other kernels, and so a row's result can depend on how many
rows share the call (measured: MKL float32 for M < 4 and for the last M % 4 rows, oneDNN
bfloat16 for M = 1 with 1536 inputs). Padding the rows to a multiple of ROW_TILE with zeros
makes every row take the full-tile path; the padded rows are dropped after. Reductions over
keys that end with masked (zero-probability) keys add exact zeros, so keys padded to a
multiple of KEY_TILE make attention independent of how many keys the batch pads to.
tests/numerics/test_batch_invariance.py checks these kernel properties on the machine at hand.

In this mode a row's linear layers use the 4-bit weights if and only if its position is a
generated one (decode), never by the step's size: prompt positions use the dequantized
weights. The runner orders rows so that the generated ones come first and sets `rows()`
around the model call (a context variable: per thread, so engines sharing a model on
several threads do not see each other's)."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROW_TILE = 4
KEY_TILE = 16


@dataclass(frozen=True)
class Rows:
    quantized: int  # rows [0, quantized) multiply with 4-bit weights where a layer has them


_rows: ContextVar[Rows | None] = ContextVar("tokenwire_invariant_rows", default=None)


@contextmanager
def rows(quantized: int):
    """Run the model batch-invariantly; the first `quantized` rows are generated positions."""
    token = _rows.set(Rows(quantized))
    try:
        yield
    finally:
        _rows.reset(token)


def current() -> Rows | None:
    """The batch-invariant row plan of this thread's model call (None: the default, fastest paths)."""
    return _rows.get()


def pad_rows(x: torch.Tensor, tile: int = ROW_TILE) -> torch.Tensor:
    """x (..., M, K) with M rounded up to a multiple of `tile` by zero rows."""
    extra = -x.shape[-2] % tile
    if not extra:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-2], extra, x.shape[-1])], dim=-2)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on rows padded to whole tiles: each row's result is independent of the others."""
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0])
    return F.linear(pad_rows(x), weight, bias)[:x.shape[0]]


class Linear(nn.Linear):
    """nn.Linear that pads its rows in batch-invariant mode (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows.get() is None:
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)

"""Matrix products whose output rows do not depend on the rows beside them (batch invariance).

A product's kernel, and so the order in which each output sums its terms, can change with the
number of rows: on CPU, products of fewer than 4 rows take another kernel, and the same row
alone and in a batch then differs in its last bits. Inside `batch_invariant()` products take
rows in multiples of 4, zero-padded: measured, every row is then bit-identical at any batch
size (1 to 2048), position and thread count, in float32 and bfloat16."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

ROW_MULTIPLE = 4
_local = threading.local()  # per thread: each engine steps on a thread of its own


@contextmanager
def batch_invariant(on: bool = True):
    """Within this block, on this thread, products follow the batch-invariant rules."""
    before = getattr(_local, "on", False)
    _local.on = on
    try:
        yield
    finally:
        _local.on = before


def invariant() -> bool:
    return getattr(_local, "on", False)


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., rows, features) with zero rows added up to a multiple of ROW_MULTIPLE."""
    return F.pad(x, (0, 0, 0, -x.shape[-2] % ROW_MULTIPLE))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not invariant():
        return F.linear(x, weight, bias)
    return F.linear(pad_rows(x), weight, bias)[:x.shape[0]]


class Linear(nn.Linear):
    """nn.Linear that honours batch_invariant() (inputs are (rows, features))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

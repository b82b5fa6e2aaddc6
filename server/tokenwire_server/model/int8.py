"""8-bit weights used as stored: Q8_0 GGUF tensors (the default model's output head, or every
layer of a Q8_0 file), multiplied by single rows inside a compiled decode step.

A Q8_0 tensor holds, per group of 32 inputs of an output row, 8-bit codes q and a scale d:
w = d * q. A decode step of one row is bound by reading weights; written as elementwise
products and sums, the compiler turns it into one loop that reads the 8-bit codes, half the
bytes of bfloat16, and sums in float32 (measured on the 49152 x 576 head, 2 threads: 1.5 ms
against 3.1 ms for the bfloat16 matmul). The loop does not reuse a weight across rows, so
only single rows take it, and only when compiled (eagerly it would materialise the products)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .linear import linear

GROUP = 32  # inputs per scale in Q8_0


@dataclass
class Q8Weight:
    codes: np.ndarray  # (N, K) int8
    scale: np.ndarray  # (N, K / 32) float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def __getitem__(self, rows) -> Q8Weight:
        return Q8Weight(self.codes[rows], self.scale[rows])

    @staticmethod
    def cat(parts: list[Q8Weight]) -> Q8Weight:
        """The parts' output rows, one after another."""
        return Q8Weight(np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]))


def unpack(data: np.ndarray) -> Q8Weight:
    """Raw GGUF Q8_0 blocks (N, bytes per row) -> codes and scales."""
    blocks = data.reshape(data.shape[0], -1, 2 + GROUP)  # per block: float16 scale, 32 codes
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = blocks[..., 2:].copy().view(np.int8).reshape(data.shape[0], -1)
    return Q8Weight(codes, scale)


class Int8Linear(nn.Module):
    """A Linear that multiplies single rows with the 8-bit weights inside compiled code."""

    def __init__(self, module: nn.Linear, q8: Q8Weight):
        super().__init__()
        self.weight = module.weight  # for everything else (same parameter, tied or not)
        self.bias = module.bias
        n, k = q8.shape
        self.register_buffer("codes", torch.from_numpy(q8.codes).view(n, k // GROUP, GROUP), persistent=False)
        self.register_buffer("scale", torch.from_numpy(q8.scale)[..., None], persistent=False)
        self.register_buffer("row", torch.zeros(k), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and torch.compiler.is_compiling():
            # Through a buffer: the compiler then stores the row once, where it would otherwise
            # recompute the operations that made it (the final norm) for every output (1.5 ms
            # against ~4 ms for the head, measured).
            self.row.copy_(x[0])
            groups = self.row.view(1, 1, *self.codes.shape[1:])
            y = (groups * self.codes * self.scale).sum((-1, -2))  # summed in float32: (1, N)
            return (y if self.bias is None else y + self.bias).to(x.dtype)
        return linear(x, self.weight, self.bias)


def attach(model: nn.Module, weights: dict[str, Q8Weight], tied: dict[str, str] | None = None) -> int:
    """Give every Linear whose weight has 8-bit blocks the 8-bit path; returns how many.
    tied: module weight name -> the stored tensor it shares (a head tied to the embedding)."""
    count = 0
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        q8 = weights.get((tied or {}).get(key, key))
        if isinstance(module, nn.Linear) and q8 is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, Int8Linear(module, q8))
            count += 1
    return count

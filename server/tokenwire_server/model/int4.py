"""4-bit weights used as stored: Q4_0/Q4_1 GGUF tensors packed for torch's int4 CPU kernel.

A GGUF Q4 tensor holds, per group of 32 inputs of an output row, 4-bit codes q and a
scale d (and a minimum m for Q4_1): w = d * q + m. torch's kernel computes with
w = (q - 8) * scale + zero, so zero = m + 8 d and the codes carry over unchanged.
Small batches are bound by reading weights from memory; there the 4-bit kernel reads a
quarter of the bytes and runs about 4x faster than bfloat16 (measured on this model's
shapes). Large batches are bound by arithmetic, where the plain matmul on the dequantized
weights is faster, so each layer keeps both and picks by the number of rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .linear import invariant

GROUP = 32  # inputs per scale in Q4_0 and Q4_1


@dataclass
class Q4Weight:
    codes: np.ndarray  # (N, K) uint8 in [0, 15]
    scale: np.ndarray  # (N, K / 32) float32
    minimum: np.ndarray  # (N, K / 32) float32: the value of code 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def __getitem__(self, rows) -> Q4Weight:
        """Some output rows (an index array or a slice), as a numpy array's rows would be."""
        return Q4Weight(self.codes[rows], self.scale[rows], self.minimum[rows])

    @staticmethod
    def cat(parts: list[Q4Weight]) -> Q4Weight:
        """The parts' output rows, one after another."""
        return Q4Weight(np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]),
                        np.concatenate([p.minimum for p in parts]))


def unpack(data: np.ndarray, kind: str) -> Q4Weight:
    """Raw GGUF blocks (N, bytes per row) of type Q4_0 or Q4_1 -> codes, scales, minimums."""
    header = {"Q4_0": 2, "Q4_1": 4}[kind]
    blocks = data.reshape(data.shape[0], -1, header + GROUP // 2)  # (N, K/32, bytes per block)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_1":
        minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:  # Q4_0: w = d * (q - 8)
        minimum = -8 * scale
    packed = blocks[..., header:]
    # Low nibbles hold inputs 0-15 of a group, high nibbles inputs 16-31.
    codes = np.concatenate([packed & 0xF, packed >> 4], axis=-1).reshape(data.shape[0], -1)
    return Q4Weight(codes, scale, minimum)


class Int4Linear(nn.Module):
    """A Linear that multiplies small batches with the 4-bit weights."""

    def __init__(self, linear: nn.Linear, q4: Q4Weight, max_rows: int):
        super().__init__()
        self.weight = linear.weight  # the dequantized weight, for larger batches (same parameter)
        self.bias = linear.bias  # Qwen2's q, k and v have one
        self.max_rows = max_rows
        dtype = linear.weight.dtype
        codes = torch.from_numpy(q4.codes.astype(np.int32))
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes, 1), persistent=False)
        scale = torch.from_numpy(q4.scale).t()  # (K/32, N)
        zero = torch.from_numpy(q4.minimum + 8 * q4.scale).t()
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).to(dtype).contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Batch-invariant steps take the 4-bit kernel at every size: its rows never depend on
        # each other (measured at 1 to 600 rows), where a switch by step size would.
        if x.shape[0] <= self.max_rows or invariant():
            y = torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def attach(model: nn.Module, weights: dict[str, Q4Weight], max_rows: int) -> int:
    """Give every Linear whose weight has 4-bit blocks the 4-bit path; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        q4 = weights.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and q4 is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, Int4Linear(module, q4, max_rows))
            count += 1
    return count

"""What a quantizer does, as a frozen, validated value: `QuantSpec`.

One notion of granularity covers every case (the torchao "block size" idea): a scale is shared by a
block of the tensor, and the block is

- ``tensor``:  the whole tensor,
- ``channel``: one output row of a weight ``[out, in]`` (reduce over ``in``),
- ``group``:   ``group_size`` consecutive inputs of one row (reduce over each slice of ``in``),
- ``token``:   one token of an activation ``[..., features]`` (reduce over ``features``);
- ``block``:   one ``block_shape`` tile ``[rows, columns]`` of a 2-D weight (DeepSeek-V3's 128 x 128 FP8 blocks;
  compressed-tensors' strategy ``block``); edge tiles of a weight whose sides are not multiples of the tile are
  partial: the tensor is padded with zeros for the range (zeros change no absmax, and min <= 0 <= max holds
  anyway), as compressed-tensors pads;
- ``attn_head``: one attention head of keys or values ``[batch, heads, positions, head_dim]`` (a static scale per
  KV head: compressed-tensors' strategy of that name, which vLLM reads as per-head ``k_scale`` / ``v_scale``).

Integer ranges (said once here, used everywhere):

- symmetric, signed ``b`` bits: q in [-2^(b-1), 2^(b-1) - 1], scale = absmax / (2^(b-1) - 1), zero = 0;
- asymmetric, unsigned ``b`` bits: q in [0, 2^b - 1], scale = (max - min) / (2^b - 1),
  zero = round(-min / scale), with min <= 0 <= max so that 0.0 is exact.

A ``clip_ratio`` r < 1 shrinks every range before the scale is computed (min, max -> r min, r max; absmax -> r
absmax), values beyond it clamped: QuaRot clips 4-bit activations at 0.9 and the KV cache at 0.95 of their range.
A dynamic quantizer may instead take a ``clip_grid`` of ratios and choose one per block at run time (per token, or for
the tensor): the ratio whose fake-quantized block has the least squared error, sum (x_hat - x)^2, the first of the
grid on ties (`llmquant.quant.primitives.searched_clip_ratios`).

Floating-point codes (``type="float"``): 8-bit E4M3 (``torch.float8_e4m3fn``, Micikevicius et al. 2022, "FP8
Formats for Deep Learning"): q = fp8(clamp(x / scale, -448, 448)) rounded to the nearest E4M3 value (ties to
even), always symmetric: scale = absmax / 448, zero = 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

Granularity = Literal["tensor", "channel", "group", "token", "block", "attn_head"]
ObserverName = Literal["minmax", "percentile", "mse"]
NumberType = Literal["int", "float"]
FP8_E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def check_clip_grid(name: str, grid: tuple[float, ...]) -> None:
    """A clip grid's ratios (``name``: the field that holds them, for the error): at least two, each in (0, 1]."""
    if len(grid) < 2 or not all(0.0 < ratio <= 1.0 for ratio in grid):
        raise ValueError(f"{name} needs at least two ratios in (0, 1], got {list(grid)}")


class QuantSpec(BaseModel):
    """How one tensor (a weight, an activation, a key or value cache) is quantized."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int = 8
    type: NumberType = "int"
    symmetric: bool = True
    granularity: Granularity = "tensor"
    group_size: int | None = None
    block_shape: tuple[int, int] | None = None
    dynamic: bool = False
    observer: ObserverName = "minmax"
    percentile: float = 99.99
    clip_ratio: float = 1.0
    clip_grid: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> QuantSpec:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.type == "float" and (self.bits != 8 or not self.symmetric):
            raise ValueError(f"float codes are 8-bit E4M3 and symmetric, got {self.bits} bits, "
                             f"{'symmetric' if self.symmetric else 'asymmetric'}")
        if self.granularity == "group":
            if self.group_size is None or self.group_size < 2:
                raise ValueError(f"granularity 'group' needs group_size >= 2, got {self.group_size}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only allowed with granularity 'group', not '{self.granularity}'")
        if self.granularity == "block":
            if self.block_shape is None or min(self.block_shape) < 1 or self.block_shape == (1, 1):
                raise ValueError(f"granularity 'block' needs block_shape [rows, columns] of positive sizes (not "
                                 f"1 x 1), got {self.block_shape}")
            if self.dynamic:
                raise ValueError("granularity 'block' tiles a weight, which is quantized once: dynamic must be False")
        elif self.block_shape is not None:
            raise ValueError(f"block_shape is only allowed with granularity 'block', not '{self.granularity}'")
        if self.dynamic and self.observer != "minmax":
            raise ValueError("a dynamic quantizer computes its range at run time: observer must be 'minmax'")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.clip_grid is not None:
            self._check_clip_grid(self.clip_grid)
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        return self

    def _check_clip_grid(self, grid: tuple[float, ...]) -> None:
        if not self.dynamic or self.type != "int":
            raise ValueError("clip_grid chooses a clip ratio per block at run time: it needs a dynamic integer "
                             "quantizer")
        check_clip_grid("clip_grid", grid)
        if self.clip_ratio != 1.0:
            raise ValueError(f"give either clip_ratio ({self.clip_ratio:g}) or clip_grid, not both")

    @property
    def clip(self) -> float | tuple[float, ...]:
        """The clip of a dynamic quantizer as the run-time code paths take it: the fixed ratio, or the grid."""
        return self.clip_grid if self.clip_grid is not None else self.clip_ratio

    @property
    def qmin(self) -> float:
        if self.type == "float":
            return -FP8_E4M3_MAX
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> float:
        if self.type == "float":
            return FP8_E4M3_MAX
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """The dtype codes are stored in (unpacked): float8_e4m3fn, uint8 for asymmetric 8-bit, else int8."""
        if self.type == "float":
            return torch.float8_e4m3fn
        return torch.uint8 if (not self.symmetric and self.bits == 8) else torch.int8

    def describe(self) -> str:
        grain = self.granularity
        if self.granularity == "group":
            grain = f"group{self.group_size}"
        elif self.block_shape is not None:
            grain = f"block{self.block_shape[0]}x{self.block_shape[1]}"
        mode = "dynamic" if self.dynamic else "static"
        if self.clip_ratio != 1.0:
            mode += f"-clip{self.clip_ratio:g}"
        if self.clip_grid is not None:
            mode += f"-clip{max(self.clip_grid):g}..{min(self.clip_grid):g}"
        if self.type == "float":
            return f"fp8-e4m3-per-{grain}-{mode}"
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}-{kind}-per-{grain}-{mode}"

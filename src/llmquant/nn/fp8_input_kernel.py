"""Dynamic E4M3 codes of a Linear's input rows in one Triton kernel, for CUDA tensors (`llmquant.nn.fp8_linear`).

Per token (or per token and group of ``group`` columns): s = max(max|x| / 448, MIN_SCALE), codes = E4M3(clamp(x / s,
+-448)), the primitives' formulas (`qparams_from_min_max` of a symmetric float spec, then `quantize`) in their
float32 arithmetic on CUDA: torch divides a tensor by a number there as a product with the number's float32
reciprocal (``div_true_kernel_cuda``), so s = max|x| * fl(1 / 448) here too; x / s is an IEEE-rounded division,
and the float8 cast (Triton's default) rounds to the nearest even. The primitives take about fifteen small tensor
operations, each a kernel launch of a few microseconds on a GPU (a 4096 -> 14336 Linear at 2048 rows: 369 us with
them, 258 us with this kernel, 343 us in bf16; H200, `scripts/runtime_profile.py fp8`).

On an H200 (2026-12-04) a first version, which divided by 448, gave the primitives' codes at some shapes and
differed in the last bit of some scales at others (tests/test_fp8.py's GPU test); the layers still agreed with
the simulation within the bf16 tolerance of the GPU agreement tests, which passed with it. This version's bit
equality awaits the next GPU run of that test.

The scales are written column-major, ``[groups, rows]`` in memory and returned as its ``[rows, groups]`` view: the
layout ``torch._scaled_mm``'s blockwise scaling reads.

This module imports Triton: `llmquant.nn.fp8_linear` imports it only when `fused_codes_available` says so.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns a program reads at a time


@triton.jit
def _row_codes(x_ptr, x_stride, c_ptr, c_stride, s_ptr, rows, group, qmax, inverse_qmax, min_scale,
               BLOCK: tl.constexpr):  # noqa: N803
    row = tl.program_id(0)
    g = tl.program_id(1)
    offsets = tl.arange(0, BLOCK)
    start = g * group
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, group, BLOCK):
        inside = k + offsets < group
        x = tl.load(x_ptr + row * x_stride + start + k + offsets, mask=inside, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = tl.maximum(tl.max(absmax, axis=0) * inverse_qmax, min_scale)
    tl.store(s_ptr + g * rows + row, scale)
    for k in range(0, group, BLOCK):
        inside = k + offsets < group
        x = tl.load(x_ptr + row * x_stride + start + k + offsets, mask=inside, other=0.0).to(tl.float32)
        code = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -qmax), qmax)
        tl.store(c_ptr + row * c_stride + start + k + offsets, code.to(tl.float8e4nv), mask=inside)


@functools.cache
def _inverse(value: float) -> float:
    """fl(1 / value) in float32, as torch's CUDA division by ``value`` computes it."""
    return torch.tensor(1.0, dtype=torch.float32).div(value).item()


def fp8_row_codes(rows: torch.Tensor, group: int, qmax: float, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes ``[n, k]`` of ``rows`` ``[n, k]`` (CUDA, any float dtype) and their scales ``[n, k / group]``
    float32, column-major (module docstring); ``group`` divides ``k`` (``k``: per token)."""
    n, k = rows.shape
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    codes = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=rows.device)
    scales = torch.empty(k // group, n, dtype=torch.float32, device=rows.device)
    if n:
        _row_codes[(n, k // group)](rows, rows.stride(0), codes, codes.stride(0), scales, n, group, qmax,
                                    _inverse(qmax), min_scale, BLOCK=min(BLOCK, triton.next_power_of_2(group)))
    return codes, scales.t()

"""GPTQ's column sweep over one block as one Triton kernel, for CUDA tensors (`llmquant.algorithms.gptq`).

The reference loop quantizes the block's columns one by one with about ten small tensor operations each; on a
GPU every one is a kernel launch of a few microseconds, so a Llama-3-8B layer (26,624 columns once q/k/v and
gate/up are stacked) spends most of its time launching. The rows of a GPTQ sweep are independent (each row's
rounding errors flow only into that row's later columns, through the shared H^-1), so one program takes a tile
of ``ROWS`` rows x the block's columns into registers and runs the block's columns in order there:

    for column i:  c = clamp(round_half_even(w_i / s) + z, qmin, qmax);  q = (c - z) s
                   e = (w_i - q) / U_ii;  W -= e U_{i, :}   (U upper triangular: only columns >= i change)

writing the codes, the errors e (for the lazy update of the later columns, done by the caller as one matrix
product) and the block's columns, which end as q. The scale and zero point of each column come from a column ->
group index (per channel and per tensor: one group), so the scales must be known before the sweep: per tensor,
per channel, or static groups (what activation order uses). Same formulas as the reference loop; float32
division is IEEE-rounded as torch's, but the update may be contracted to fused multiply-adds, so a code on a
rounding boundary can differ from the loop's (the tests compare reconstruction errors, not bits).

This module imports Triton: `llmquant.algorithms.gptq` imports it only when `fused_sweep_available` says so
(Triton installed, and the tensor on a CUDA device or Triton's interpreter asked for with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16  # rows per program: a 16 x 128 float32 tile is 16 registers a thread for 4 warps


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f  # exact: f <= x < f + 1
    odd = f - 2.0 * tl.floor(f * 0.5)
    return f + tl.where(d > 0.5, 1.0, tl.where(d < 0.5, 0.0, odd))


@triton.jit
def _sweep_block(w_ptr, w_stride, h_ptr, h_stride, s_ptr, z_ptr, qp_stride, g_ptr, c_ptr, c_stride, e_ptr,
                 e_stride, rows, width, qmin, qmax, ROWS: tl.constexpr, BLOCK: tl.constexpr):  # noqa: N803
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK)
    rmask, cmask = r < rows, c < width
    tile = rmask[:, None] & cmask[None, :]
    w = tl.load(w_ptr + r[:, None] * w_stride + c[None, :], mask=tile, other=0.0)
    errors = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    codes = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for i in range(0, BLOCK):  # columns past ``width`` hold zeros and change nothing (their U_ii reads as 1)
        inside = i < width
        here = (c == i)[None, :]
        column = tl.sum(tl.where(here, w, 0.0), axis=1)
        group = tl.load(g_ptr + i, mask=inside, other=0)
        scale = tl.load(s_ptr + r * qp_stride + group, mask=rmask, other=1.0)
        zero = tl.load(z_ptr + r * qp_stride + group, mask=rmask, other=0.0)
        code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(column, scale)) + zero, qmin), qmax)
        diagonal = tl.load(h_ptr + i * h_stride + i, mask=inside, other=1.0)
        error = tl.where(inside, tl.math.div_rn(column - (code - zero) * scale, diagonal), 0.0)
        h_row = tl.load(h_ptr + i * h_stride + c, mask=cmask & (c >= i), other=0.0)
        w = w - error[:, None] * h_row[None, :]
        errors = tl.where(here, error[:, None], errors)
        codes = tl.where(here, code[:, None], codes)
    tl.store(w_ptr + r[:, None] * w_stride + c[None, :], w, mask=tile)
    tl.store(c_ptr + r[:, None] * c_stride + c[None, :], codes, mask=tile)
    tl.store(e_ptr + r[:, None] * e_stride + c[None, :], errors, mask=tile)


def sweep_block(w: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                groups: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweep the columns of ``w`` ``[rows, width]`` (a float32 view with unit column stride; overwritten with the
    quantized values) with the block ``hinv`` ``[width, width]`` of the upper Cholesky factor of H^-1 (unit column
    stride); column i takes its scale and zero point from column ``groups[i]`` of ``scales`` and ``zeros``
    ``[rows, n_groups]``. Returns the codes (as float32) and the scaled errors e, each ``[rows, width]``."""
    rows, width = w.shape
    if w.stride(1) != 1 or hinv.stride(1) != 1:
        raise ValueError("sweep_block needs unit column strides")
    codes = torch.empty(rows, width, dtype=torch.float32, device=w.device)
    errors = torch.empty_like(codes)
    scales, zeros = scales.float().contiguous(), zeros.float().contiguous()
    block = max(16, 1 << (width - 1).bit_length())
    _sweep_block[(triton.cdiv(rows, ROWS),)](
        w, w.stride(0), hinv, hinv.stride(0), scales, zeros, scales.stride(0), groups.to(torch.int32).contiguous(),
        codes, codes.stride(0), errors, errors.stride(0), rows, width, float(qmin), float(qmax),
        ROWS=ROWS, BLOCK=block,
    )
    return codes, errors


__all__ = ["ROWS", "sweep_block"]

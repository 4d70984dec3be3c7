"""Pure functions over tensors: blocks, quantization parameters, quantize, dequantize, fake-quantize.

Every function works on the "block view" of a tensor: a 2-D ``[n_blocks, block_len]`` reshape in which
each row shares one scale and zero point (see `QuantSpec` for the granularities). Scales and zero
points are therefore always ``[n_blocks, 1]`` and broadcast against the block view.

Formulas (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"):  q = clamp(round(x / scale) + zero, qmin, qmax),
x_hat = (q - zero) * scale. For float codes (`QuantSpec` ``type="float"``) ``round`` is the rounding to the
nearest E4M3 value (`round_to_grid`) and zero = 0.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from llmquant.errors import LlmquantError
from llmquant.quant.spec import QuantSpec

MIN_SCALE = 1e-8


def to_blocks(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape ``x`` so that each row is one block sharing a scale (a view when possible; `from_blocks` undoes it)."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "attn_head":  # keys or values [b, h, s, d]: one block per head
        if x.dim() != 4:
            raise LlmquantError(f"granularity 'attn_head' quantizes keys and values [batch, heads, positions, "
                                f"head_dim], not a tensor of shape {list(x.shape)}; weights and activations take "
                                "tensor, channel, group or token")
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    if spec.granularity == "channel":
        return x.reshape(x.shape[0], -1)
    if spec.granularity == "block":
        return _tiles(x, spec)
    if spec.granularity == "token":
        return x.reshape(-1, x.shape[-1])
    group_size = spec.group_size
    assert group_size is not None  # guaranteed by QuantSpec validation
    if x.shape[-1] % group_size:
        raise LlmquantError(
            f"group_size {group_size} does not divide the last dimension {x.shape[-1]}; "
            f"use a group size that divides it"
        )
    return x.reshape(-1, group_size)


def _tile_grid(shape: torch.Size, spec: QuantSpec) -> tuple[int, int, int, int]:
    """Tiles down and across a 2-D ``shape`` (partial edge tiles counted), and the tile's rows and columns."""
    assert spec.block_shape is not None  # guaranteed by QuantSpec validation
    tile_rows, tile_columns = spec.block_shape
    return math.ceil(shape[0] / tile_rows), math.ceil(shape[1] / tile_columns), tile_rows, tile_columns


def _tiles(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """One row per ``block_shape`` tile of a 2-D ``x``, row-major over the tiles, zero-padded at the edges."""
    if x.dim() != 2:
        raise LlmquantError(f"granularity 'block' tiles a 2-D weight [out, in], not a tensor of shape "
                            f"{list(x.shape)}; activations take tensor, token or group")
    down, across, tile_rows, tile_columns = _tile_grid(x.shape, spec)
    padded = F.pad(x, (0, across * tile_columns - x.shape[1], 0, down * tile_rows - x.shape[0]))
    return padded.reshape(down, tile_rows, across, tile_columns).transpose(1, 2).reshape(down * across, -1)


def block_grid_shape(shape: torch.Size, spec: QuantSpec) -> tuple[int, int]:
    """The scales of a ``block`` weight of ``shape`` as a grid ``[tiles down, tiles across]`` (compressed-tensors'
    ``weight_scale`` shape; the block view's rows in this order)."""
    down, across, _, _ = _tile_grid(shape, spec)
    return down, across


def from_blocks(blocks: torch.Tensor, shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    """The tensor of ``shape`` whose block view (`to_blocks`) is ``blocks``."""
    if spec.granularity == "attn_head":
        return blocks.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    if spec.granularity == "block":
        down, across, tile_rows, tile_columns = _tile_grid(shape, spec)
        padded = blocks.reshape(down, across, tile_rows, tile_columns).transpose(1, 2)
        return padded.reshape(down * tile_rows, across * tile_columns)[: shape[0], : shape[1]].contiguous()
    return blocks.reshape(shape)


def block_min_max(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block minimum and maximum, each ``[n_blocks, 1]``."""
    blocks = to_blocks(x, spec)
    return blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)


def qparams_from_min_max(
    min_vals: torch.Tensor, max_vals: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point from per-block ranges (conventions in `QuantSpec`, its ``clip_ratio`` included;
    ``clip``: per-block ratios ``[n_blocks, 1]`` in its place, as `searched_clip_ratios` gives them)."""
    min_vals = min_vals.float().clamp(max=0.0)
    max_vals = max_vals.float().clamp(min=0.0)
    ratio = clip if clip is not None else (spec.clip_ratio if spec.clip_ratio != 1.0 else None)
    if ratio is not None:
        min_vals, max_vals = min_vals * ratio, max_vals * ratio
    if spec.symmetric:
        absmax = torch.maximum(-min_vals, max_vals)
        scale = (absmax / spec.qmax).clamp(min=MIN_SCALE)
        zero = torch.zeros_like(scale)
    else:
        scale = ((max_vals - min_vals) / (spec.qmax - spec.qmin)).clamp(min=MIN_SCALE)
        zero = (spec.qmin - torch.round(min_vals / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero


def codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of ``codes`` (any integer dtype, or float8). Float8 codes on the CPU are read through a table
    of the 256 E4M3 values, indexed by their bytes: the same values as ``codes.float()``, which converts one element
    at a time there (2.7 ms against 0.6 ms for 1536 x 576 codes on one thread of this CPU:
    `scripts/gptq_sweep_time.py`)."""
    if codes.dtype != torch.float8_e4m3fn or codes.device.type != "cpu":
        return codes.float()
    indices = codes.reshape(-1).view(torch.uint8).int()
    return _e4m3_values().index_select(0, indices).reshape(codes.shape)


@functools.cache
def _e4m3_values() -> torch.Tensor:
    """The float32 value of every E4M3 byte (NaN for 0x7F and 0xFF), by torch's own conversion."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def round_to_grid(values: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``values`` (already divided by the scale) rounded to the spec's grid: the nearest integer (half to even),
    or for float codes the nearest E4M3 value (half to even) after clamping to +-448 (float32 results)."""
    if spec.type == "float":
        return codes_to_float(values.clamp(spec.qmin, spec.qmax).to(spec.code_dtype))
    return torch.round(values)


def grid_steps(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The step of the spec's grid at each code (float values): 1 on an integer grid; on E4M3 (3 mantissa bits) the
    spacing 2^(e - 3) of the binade [2^e, 2^(e + 1)) that holds |code|, and the subnormals' 2^-9 below the smallest
    normal 2^-6. A code plus d steps, rounded to the grid, is the code itself for |d| < 1/2 (1/4 towards zero from a
    binade's lowest value, where the grid is twice as fine), and the next code away from zero for d in (1/2, 1]."""
    if spec.type != "float":
        return torch.ones_like(codes)
    return torch.exp2(torch.floor(torch.log2(codes.abs().clamp_min(2.0 ** -6))) - 3)


def round_to_codes(values: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``values`` in code units rounded to the nearest code of the spec's grid and clamped to its range (float32
    results): the integers from qmin to qmax, or the E4M3 values."""
    return round_to_grid(values, spec).clamp(spec.qmin, spec.qmax)


def quantize_blocks(blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes (as float values) of a block view."""
    return torch.clamp(round_to_grid(blocks / scale, spec) + zero, spec.qmin, spec.qmax)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes of ``x`` in its own shape, in `QuantSpec.code_dtype` (int8, uint8 for unsigned 8-bit, float8). Float
    codes are cast once (the cast rounds to the nearest E4M3 value, as `round_to_grid` does; their zero is 0)."""
    blocks = to_blocks(x, spec)
    if spec.type == "float":
        return from_blocks((blocks / scale).clamp_(spec.qmin, spec.qmax), x.shape, spec).to(spec.code_dtype)
    return from_blocks(quantize_blocks(blocks, scale, zero, spec), x.shape, spec).to(spec.code_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float values of codes ``q`` (any integer dtype, or float8) in ``q``'s shape."""
    blocks = to_blocks(codes_to_float(q), spec)
    return from_blocks((blocks - zero) * scale, q.shape, spec)


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize then dequantize ``x``; with no scale given, the range is taken from ``x`` (dynamic)."""
    blocks = to_blocks(x.float(), spec)
    if scale is None:
        low, high = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
        clip = None
        if spec.clip_grid is not None:
            clip = searched_clip_ratios(blocks, low.clamp(max=0.0), high.clamp(min=0.0), spec.clip_grid,
                                        spec.symmetric, int(spec.qmin), int(spec.qmax))
        scale, zero = qparams_from_min_max(low, high, spec, clip)
    assert zero is not None
    codes = quantize_blocks(blocks, scale, zero, spec)
    return from_blocks((codes - zero) * scale, x.shape, spec).to(x.dtype)


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` (a function of ``x`` with a zero gradient: rounding) in the forward pass; in the backward pass the
    identity's gradient, where ``x`` requires one (the straight-through estimator, Bengio et al. 2013, "Estimating or
    Propagating Gradients Through Stochastic Neurons"): x + (q(x) - x) detached. Without a gradient to pass,
    ``quantized`` itself, bit for bit."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (quantized - x).detach()
    return quantized


def pairwise_row_sums(values: torch.Tensor) -> torch.Tensor:
    """Each row's sum ``[n, 1]`` of ``values`` ``[n, width]`` in one fixed order: zeros appended up to a power of two
    columns, then column j plus column j + half, halving until one column is left. An order a kernel repeats bit for
    bit (the ops' `block_codes`, ``block_codes.h``), where torch's reductions choose theirs by the CPU's vector
    width. The padding is not materialised: the first step adds the columns past the half that exist and adds 0 to
    the others (the same operations)."""
    width = values.shape[1]
    if width <= 1:
        return values if width == 1 else values.new_zeros(values.shape[0], 1)
    half = 1 << ((width - 1).bit_length() - 1)  # half the padded width: half < width <= 2 half
    paired = width - half  # columns j < paired have a partner j + half; the others' partner is a padded zero
    if paired == half:  # a power of two: one call (the other branch's two calls cost more on narrow blocks)
        sums = values[:, :half] + values[:, half:]
    else:
        sums = torch.empty(values.shape[0], half, dtype=values.dtype, device=values.device)
        torch.add(values[:, :paired], values[:, half:], out=sums[:, :paired])
        torch.add(values[:, paired:half], 0.0, out=sums[:, paired:])
    while half > 1:
        half //= 2
        sums = sums[:, :half] + sums[:, half:]
    return sums


def searched_clip_ratios(blocks: torch.Tensor, low: torch.Tensor, high: torch.Tensor, grid: tuple[float, ...],
                         symmetric: bool, qmin: int, qmax: int) -> torch.Tensor:
    """Per block (row of ``blocks``), the ratio r of ``grid`` whose range [r low, r high] (``low`` <= 0 <= ``high``,
    ``[n, 1]``) quantizes the block with the least squared error sum (x_hat - x)^2 (summed in `pairwise_row_sums`'
    order), the first of the grid on ties; ``[n, 1]`` float32. A dynamic quantizer's clip chosen at run time
    (`QuantSpec.clip_grid`): the same function for the simulation (`fake_quantize`) and the integer runtimes
    (`llmquant.nn.int8_linear.input_codes`; the AVX2 op's `block_codes` in C++), so all choose the same ratios. Each
    candidate's scale and zero point follow `qparams_from_min_max`. An error measured on the block itself, not on the
    Linear's output: a proxy, as in the MSE weight ranges."""
    blocks, low, high = blocks.detach(), low.detach(), high.detach()  # (a choice: no gradient reaches it)
    work = torch.empty_like(blocks)  # each candidate's x_hat - x, in one buffer
    best_error = best_ratio = None
    for ratio in grid:
        lo, hi = low * ratio, high * ratio
        if symmetric:
            scale = (torch.maximum(-lo, hi) / qmax).clamp_(min=MIN_SCALE)
            torch.div(blocks, scale, out=work).round_().clamp_(qmin, qmax).mul_(scale)
        else:
            scale = ((hi - lo) / (qmax - qmin)).clamp_(min=MIN_SCALE)
            zero = (qmin - torch.round(lo / scale)).clamp_(qmin, qmax)
            torch.div(blocks, scale, out=work).round_().add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)
        error = pairwise_row_sums(work.sub_(blocks).square_())
        candidate = torch.full_like(error, ratio)
        if best_error is None or best_ratio is None:
            best_error, best_ratio = error, candidate
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, candidate, best_ratio)
    assert best_ratio is not None  # (a grid holds at least two ratios: `QuantSpec`)
    return best_ratio


def qparams_for(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max quantization parameters of ``x`` itself."""
    return qparams_from_min_max(*block_min_max(x.float(), spec), spec)

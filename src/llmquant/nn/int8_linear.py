"""The W8A8 int8 linear: y = s_x * s_w * (x_q @ W_q^T) + b, with x_q = round(x / s_x) (symmetric int8 codes of the
input; s_x its static scale, or absmax / 127 of each row or of the whole input, dynamic) and an exact int8 x int8
integer product.

Three parts, each in as few passes as the algebra allows (a decode step, one row, pays for every operation):

- the input codes (`input_codes`: ``abs().amax()`` for a dynamic scale, a division rounded in place), made once
  for all the Linears that read the same tensor, unchanged (q/k/v, gate/up: `shared_input_codes`);
- the integer product (`int8_product`): oneDNN's int8 linear (``torch.ops.onednn.qlinear_pointwise`` on the
  weight's codes prepacked once in its blocked layout, `Int8Weight`, with unit scales: x_q @ W_q^T as exact float32
  values) on a CPU with AMX from 128 rows (a prefill), else ``torch._int_mm`` (int32; with VNNI but no AMX oneDNN
  takes its reference kernel for these signed inputs, `onednn_refusal`);
  on a CPU with neither (AVX2 only), where ``torch._int_mm`` is many times slower than float32, the float32
  product of the codes (`int_mm_refusal`); all exact (tested);
- the scaling (`scale_output`): oneDNN's float32 product times the outer product s_x * s_w in place (an int32
  product needs a promoting multiplication into a new tensor), then the bias in place: the order the simulation
  keeps.

Weights in groups of columns (W4A8, `grouped_linear`) and inputs per token in groups (`input_grouped_linear`) take
one integer product per group, each scaled by its group's scales and summed in group order.

On a CPU with AVX512-VNNI a small C++ op (`llmquant.nn.int8_gemv`) makes the codes (per token, or under a static
scale) and scales oneDNN's products in one pass each; up to four rows (a decode step at batch 1 to 4) the three parts
are two of its calls (a decode step pays for every operation, and torch's int8 products at one row are not bound by
memory), made by each layer's `DecodeRows`, resolved once, with little Python around them. On a CPU with AVX2 but
neither VNNI nor AMX, a smaller AVX2 op makes the per-token codes and multiplies every row count the same way
(`Avx2Weight`), from a copy of the weight's int8 codes packed once, not a float32 copy. The same bits throughout.

With ``LLMQUANT_COMPILE=1`` the codes and the scaling are compiled by ``torch.compile`` (inductor) on the CPU from
`COMPILE_MIN_ELEMENTS` input values: fused loops over the input and the output, the same bits (division and
half-to-even rounding as in eager; tested). It is off by default: compiling costs seconds once per process and
shape class, and it gained little in a whole prefill (`scripts/runtime_profile.py compile --model DIR`, BENCHMARKS.md
"Runtimes"). Where it cannot run (no C++ compiler) the eager path is used and the reason logged once.
``LLMQUANT_ONEDNN=0`` keeps ``torch._int_mm`` at every shape (no copy of the weights).

`input_codes` is shared with the simulation of `llmquant.nn.quant_linear.QuantLinear`, which must give the same
codes (its float32 product of the codes is exact, so both runtimes return the same logits).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from llmquant.nn import int8_gemv
from llmquant.nn.int8_gemv import (
    GEMV_MAX_ROWS,
    GROUPED_GEMM_MULTIPLE,
    avx2_gemm,
    avx2_gemm_pack,
    avx2_gemv_refusal,
    avx2_kernel,
    avx2_static_linear,
    avx2_token_linear,
    block_codes,
    cpu_kernel,
    gemv_kernel,
    gemv_linear,
    gemv_refusal,
    grouped_gemm,
    grouped_pack,
    scale_product,
    static_codes,
    tensor_codes,
    token_codes,
    weight_row_sums,
)
from llmquant.nn.last_result import LastResult
from llmquant.quant.primitives import MIN_SCALE, searched_clip_ratios

log = logging.getLogger(__name__)

COMPILE_MIN_ELEMENTS = 1 << 17  # rows x in_features from which the compiled kernel runs (a 512-token prefill: 295k)
_compiled: tuple[Callable, Callable] | None = None  # (codes, scaling) by torch.compile
_compile_off: str | None = None  # why the compiled kernel is not used in this process


Clip = float | tuple[float, ...]  # a dynamic input's clip: a fixed ratio, or a grid searched per block at run time


def input_codes(rows: torch.Tensor, dynamic: str | None, static_scale: torch.Tensor | None, qmin: int,
                qmax: int, clip_ratio: Clip = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes of ``rows`` ``[n, in]`` as rounded float32 values, and their scale (``[n, 1]`` per token,
    ``[1, 1]`` per tensor). ``dynamic``: "token" or "tensor" (the scale from the rows themselves: clip_ratio * absmax
    / qmax; unclipped, no code can leave [-qmax, qmax]; a grid of ratios: each row's, or the tensor's, chosen by
    `searched_clip`), or None for ``static_scale`` (codes clamped to [qmin, qmax])."""
    if dynamic is None:
        assert static_scale is not None
        return torch.div(rows, static_scale).round_().clamp_(qmin, qmax), static_scale
    absmax = rows.abs().amax(-1, keepdim=True) if dynamic == "token" else rows.abs().amax().reshape(1, 1)
    if isinstance(clip_ratio, tuple):
        clip_ratio = searched_clip(rows, dynamic, clip_ratio, True, qmin, qmax)
    if isinstance(clip_ratio, torch.Tensor) or clip_ratio != 1.0:
        scale = (absmax * clip_ratio / qmax).clamp_(min=MIN_SCALE)
        return torch.div(rows, scale).round_().clamp_(qmin, qmax), scale
    scale = (absmax / qmax).clamp_(min=MIN_SCALE)
    return torch.div(rows, scale).round_(), scale


@dataclass
class Int8Weight:
    """A weight's int8 codes ``[out, in]`` (the stored tensor) for the int8 runtime, and, where oneDNN runs
    (`onednn_refusal`), their copy in oneDNN's blocked layout (``torch.ops.onednn.qlinear_prepack``) with unit
    scales and zero zero points, made the first time a shape calls for it (`int8_product`); where the decode op
    runs (`llmquant.nn.int8_gemv.gemv_refusal`), the codes' row sums."""

    codes: torch.Tensor
    onednn: bool
    packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (blocked codes, ones, int32 zeros)
    gemv: bool = False  # whether the decode op runs (`llmquant.nn.int8_gemv`)
    row_sums: torch.Tensor | None = None  # the decode op's int32 row sums of the codes, made on its first call
    float_codes: torch.Tensor | None = None  # the codes as float32, where `int_mm_refusal` (made on the first call)

    def gemv_row_sums(self, group_size: int = 0) -> torch.Tensor:
        """The row sums of the codes (over each group of ``group_size`` columns, the same at every call)."""
        if self.row_sums is None:
            self.row_sums = weight_row_sums(self.codes, group_size)
        return self.row_sums

    def codes_as_float(self) -> torch.Tensor:
        if self.float_codes is None:
            self.float_codes = self.codes.float()
        return self.float_codes

    def onednn_packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.packed is None:
            out = self.codes.shape[0]
            self.packed = (torch.ops.onednn.qlinear_prepack(self.codes, None), torch.ones(out),
                           torch.zeros(out, dtype=torch.int32))
        return self.packed


@dataclass(frozen=True)
class GroupedWeight:
    """A weight quantized in groups of input columns (W4A8) as the decode op's `grouped_gemm` reads it, for every
    row count where the op runs: the codes packed in VPDPBUSD's layout with 128 times each group's code sums and
    the scales (`grouped_pack`), made once from the codes, which it does not keep (1 byte a weight in all)."""

    op: ModuleType
    packed: torch.Tensor
    sums128: torch.Tensor
    scales: torch.Tensor
    outputs: int
    group_size: int

    @classmethod
    def from_codes(cls, codes: torch.Tensor, weight_scale: torch.Tensor, group_size: int) -> GroupedWeight:
        op = gemv_kernel()
        assert op is not None  # (made where the op runs: `grouped_gemm_refusal`)
        return cls(op, *grouped_pack(codes, weight_scale, group_size), codes.shape[0], group_size)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.sums128, self.scales]

    def __call__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 input_groups: bool = False) -> torch.Tensor:
        """y for int8 ``codes`` ``[n, in]`` with ``scale``: the bits of `grouped_linear` or, ``input_groups``, of
        `input_grouped_linear` (the input per token in groups of ``group_size`` columns, ``scale`` ``[n,
        groups]``)."""
        return grouped_gemm(self.op, codes, (self.packed, self.sums128, self.scales), scale, bias, self.outputs,
                            self.group_size, input_groups)


@dataclass(frozen=True)
class Avx2Weight:
    """A W8A8, W4A8 or W4A4 weight as the AVX2 op's `avx2_gemm` reads it, at every row count, on a CPU with AVX2 but
    neither VNNI nor AMX (`avx2_weight_refusal`): the codes packed once in panels of 16 outputs with the scales
    (`avx2_gemm_pack`), made from the codes, which it does not keep (1 byte a weight in all; a 4-bit weight is not
    unpacked beside it)."""

    op: ModuleType
    packed: torch.Tensor
    scales: torch.Tensor
    outputs: int
    group_size: int

    @classmethod
    def from_codes(cls, codes: torch.Tensor, weight_scale: torch.Tensor, group_size: int) -> Avx2Weight:
        op = avx2_kernel(codes)
        assert op is not None  # (made where the op runs: `avx2_weight_refusal`)
        return cls(op, *avx2_gemm_pack(codes, weight_scale, group_size), codes.shape[0], group_size)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales]

    def __call__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 input_group_size: int = 0) -> torch.Tensor:
        """y for int8 ``codes`` ``[..., in]`` with ``scale``: the bits of `scale_output` (no groups), of
        `grouped_linear` (the weight in groups) or, ``input_group_size`` > 0, of `input_grouped_linear` (the input
        per token in groups of that many columns, ``scale`` ``[rows, groups]``)."""
        return avx2_gemm(self.op, codes, (self.packed, self.scales), scale, bias, self.outputs, self.group_size,
                         input_group_size)


def avx2_weight_refusal(device: torch.device, in_features: int, group_size: int) -> str | None:
    """Why the AVX2 op does not run a layer on ``device``, or None (building the op if needed): it takes an even
    input width, in even groups."""
    if in_features % 2 or group_size % 2:
        return f"an input of {in_features} columns in groups of {group_size} (the AVX2 op takes even ones)"
    if (refusal := avx2_gemv_refusal(device)) is not None:
        return refusal
    avx2_kernel(torch.empty(0))  # (built here if not yet: a failed build is the refusal below)
    return avx2_gemv_refusal(device)


def grouped_gemm_refusal(device: torch.device, in_features: int, group_size: int) -> str | None:
    """Why the op's `grouped_gemm` does not run a grouped layer on ``device``, or None (building the op if needed)."""
    if group_size % GROUPED_GEMM_MULTIPLE or in_features % group_size:
        return f"groups of {group_size} columns (it takes multiples of {GROUPED_GEMM_MULTIPLE} dividing the input)"
    if gemv_refusal(device) is None:
        gemv_kernel()  # (built here if not yet: a failed build is the refusal below)
    return gemv_refusal(device)


def onednn_refusal(device: torch.device) -> str | None:
    """Why oneDNN's int8 product does not run on ``device``, or None. Without VNNI or AMX, x86 int8 kernels
    multiply in 16-bit pairs that can saturate; with VNNI but no AMX, oneDNN (torch 2.13) runs this product of signed
    int8 inputs with its reference kernel, ``ref_int8`` in ``ONEDNN_VERBOSE``'s words: on an AMD EPYC with AVX512-VNNI
    a 512 x 576 by 576 x 576 product took 2.9 s against 0.9 ms for ``torch._int_mm`` (one thread; BENCHMARKS.md,
    "A CPU with AVX512-VNNI and bfloat16 but no AMX"; `scripts/runtime_profile.py onednn`). ``torch._int_mm`` is used
    there."""
    if os.environ.get("LLMQUANT_ONEDNN", "1") == "0":
        return "off (LLMQUANT_ONEDNN=0)"
    if device.type != "cpu":
        return "not on the CPU"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")):
        return "this torch has no oneDNN int8 linear"
    features = int8_gemv.cpu_features()
    if not features.int8_instructions:
        return "the CPU has no VNNI or AMX int8 instructions"
    if not features.amx:
        return "the CPU has no AMX (oneDNN's int8 linear of signed inputs takes its reference kernel there)"
    return None


def int_mm_refusal(device: torch.device) -> str | None:
    """Why ``torch._int_mm`` is not the integer product on ``device``, or None. On an x86 CPU without VNNI or AMX
    (AVX2 only: an AMD EPYC of BENCHMARKS.md, torch 2.13) it takes 6x float32's time at one row and 28x at 512
    (576 x 576: 220 against 35 us, 150 against 5.4 ms), and oneDNN's int8 product saturates its 16-bit pairs there
    (`onednn_refusal`): the AVX2 op multiplies there (`Avx2Weight`), and where it cannot run the codes are
    multiplied as float32 (`float_product`, the simulation's own product: exact while partial sums stay below 2^24, so
    the same bits), the weight's codes kept as float32 too (the float model's memory). ``LLMQUANT_INT_MM=1`` keeps
    ``torch._int_mm`` there."""
    if device.type != "cpu" or int8_gemv.cpu_features().int8_instructions:
        return None
    if os.environ.get("LLMQUANT_INT_MM", "0") == "1":
        return None
    return "the CPU has no VNNI or AMX int8 instructions (torch._int_mm is many times slower than float32 there)"


_UNIT = torch.ones(())
_ZERO = torch.zeros((), dtype=torch.int32)


def onednn_product(x_codes: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x_q @ W_q^T as float32 (the int32 sums converted, as a promotion of ``torch._int_mm``'s result would) for
    int8 ``x_codes`` ``[n, in]``: oneDNN's int8 linear with unit scales (run eagerly: inductor takes a prepacked
    weight only as a frozen constant, so ``LLMQUANT_COMPILE`` compiles the codes and the scaling around it)."""
    packed, unit_scale, zero_point = weight.onednn_packed()
    return torch.ops.onednn.qlinear_pointwise.tensor(
        x_codes, _UNIT, _ZERO, packed, unit_scale, zero_point, None, 1.0, 0, torch.float32, "none", [], "")


ONEDNN_MIN_ROWS = 128  # oneDNN's product from this many input rows (a prefill), ``torch._int_mm`` below (decoding)


def int8_product(x_codes: torch.Tensor, weight: torch.Tensor | Int8Weight) -> torch.Tensor:
    """x_q @ W_q^T by oneDNN (float32) from `ONEDNN_MIN_ROWS` rows where it runs, else by `int8_matmul` (int32).
    Over the default model's 30 layers, one thread, oneDNN against ``_int_mm`` (`scripts/runtime_profile.py
    kernels`, bench/speed_2026-12-01_onednn/kernels_t1.txt): at 512 rows q_proj (576 outputs) 242 against 361 us,
    k_proj (192) 103 / 129, gate_proj (1536) 600 / 1,122, down_proj (1536 -> 576) 681 / 784, and oneDNN's float32
    output saves the int32 product's promoting multiplication; at 64 rows 70 / 76, 43 / 25, 199 / 209. At one row
    with at most 256 outputs oneDNN takes a slow path (k_proj, 192 outputs: 4,275 against 19 us; a decode step 339
    ms with oneDNN at every shape against 66); with 1536 outputs it is faster alone (119 against 165 us), a gain
    this rule leaves out to keep decoding on one kernel. A 512-token prefill took 772 ms against 1,016 with
    ``_int_mm`` only (the same file).
    """
    if isinstance(weight, Int8Weight):
        if weight.onednn and x_codes.shape[0] >= ONEDNN_MIN_ROWS:
            return onednn_product(x_codes, weight)
        if int_mm_refusal(x_codes.device) is not None:
            return float_product(x_codes.float(), weight.codes_as_float())
        weight = weight.codes
    return int8_matmul(x_codes, weight)


def int8_codes(rows: torch.Tensor, dynamic: str | None, static_scale: torch.Tensor | None, qmin: int, qmax: int,
               clip_ratio: Clip = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_codes` as int8 (what the integer product takes)."""
    codes, scale = input_codes(rows, dynamic, static_scale, qmin, qmax, clip_ratio)
    return codes.to(torch.int8), scale


def searched_clip(rows: torch.Tensor, dynamic: str, grid: tuple[float, ...], symmetric: bool, qmin: int, qmax: int
                  ) -> torch.Tensor:
    """The clip ratio of each row (``dynamic`` "token", ``[n, 1]``) or of all of them ("tensor", ``[1, 1]``) chosen
    from ``grid`` by `searched_clip_ratios` on the blocks `fake_quantize` sees, so the simulation chooses the same."""
    blocks = rows if dynamic == "token" else rows.reshape(1, -1)
    low = blocks.amin(1, keepdim=True).clamp_(max=0.0)
    high = blocks.amax(1, keepdim=True).clamp_(min=0.0)
    return searched_clip_ratios(blocks, low, high, grid, symmetric, qmin, qmax)


def asymmetric_input_codes(rows: torch.Tensor, dynamic: str | None, static_scale: torch.Tensor | None, qmin: int,
                           qmax: int, clip_ratio: Clip = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric dynamic codes of ``rows`` ``[n, in]`` shifted by their zero point, c = q - z = clamp(round(x / s) +
    z, qmin, qmax) - z, as rounded float32 values, and their scale s (``[n, 1]`` per token, ``[1, 1]`` per tensor):
    s = r (max - min) / (qmax - qmin), z = qmin - round(r min / s), with min <= 0 <= max (`QuantSpec`). c * s is
    `fake_quantize`'s value, bit for bit, so c @ W_q^T scaled by s * s_w is the simulation's product; |c| <= qmax -
    qmin, which fits int8 up to 7 bits: an integer kernel multiplies c (or q and subtracts z times the weight's row
    sums). ``static_scale`` must be None (asymmetric inputs are dynamic here). Their qmin (0)
    keeps them apart from symmetric codes (qmin < 0) in `shared_input_codes`' key."""
    assert static_scale is None and dynamic in ("token", "tensor")
    low = rows.amin(-1, keepdim=True) if dynamic == "token" else rows.amin().reshape(1, 1)
    high = rows.amax(-1, keepdim=True) if dynamic == "token" else rows.amax().reshape(1, 1)
    low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    if isinstance(clip_ratio, tuple):
        clip_ratio = searched_clip(rows, dynamic, clip_ratio, False, qmin, qmax)
    if isinstance(clip_ratio, torch.Tensor) or clip_ratio != 1.0:
        low, high = low * clip_ratio, high * clip_ratio
    scale = ((high - low) / (qmax - qmin)).clamp_(min=MIN_SCALE)
    zero = (qmin - torch.round(low / scale)).clamp_(qmin, qmax)
    return torch.div(rows, scale).round_().add_(zero).clamp_(qmin, qmax).sub_(zero), scale


def asymmetric_int8_codes(rows: torch.Tensor, dynamic: str | None, static_scale: torch.Tensor | None, qmin: int,
                          qmax: int, clip_ratio: Clip = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`asymmetric_input_codes` as int8 (what the integer product takes)."""
    codes, scale = asymmetric_input_codes(rows, dynamic, static_scale, qmin, qmax, clip_ratio)
    return codes.to(torch.int8), scale


def scale_output(product: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
                 ) -> torch.Tensor:
    """y = product * (s_x * s_w) + b for an integer product: int32 promoted by the float scales, or float32
    (oneDNN's, or the simulation's product of float codes, new tensors) scaled in place; the same values."""
    outer = scale * weight_scale
    y = product.mul_(outer) if product.dtype == torch.float32 else product * outer
    return y.add_(bias) if bias is not None else y


def _same_arguments(kept: tuple, arguments: tuple) -> bool:
    """The quantizer's arguments match (the static scale by identity: the kept key holds it, so its identity cannot
    pass to another tensor)."""
    return kept[1] is arguments[1] and kept[0] == arguments[0] and kept[2:] == arguments[2:]


_last_codes = LastResult()  # the input codes of the last Linear that ran on this thread


def shared_input_codes(source: torch.Tensor, rows: torch.Tensor, dynamic: str | None,
                       static_scale: torch.Tensor | None, qmin: int, qmax: int, clip_ratio: Clip, as_int8: bool,
                       quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                       input_groups: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_codes` of ``rows`` (``source``, the Linear's input, as rows), as int8 (`int8_codes`, or
    ``quantize``: the same function compiled) or as float32 codes, kept for the next Linear that quantizes the
    same tensor, unchanged, in the same way: q/k/v and gate/up quantize their shared input once. An unchanged
    tensor is the same object at the same version (its counter of in-place changes); a tensor made under
    ``torch.inference_mode`` has no version, so its codes are not kept. The entry goes when its tensor does.
    ``input_groups``: the size of the groups ``quantize`` takes (`in_input_groups`), 0 for none; part of the key."""
    arguments = (dynamic, static_scale, qmin, qmax, clip_ratio, as_int8, input_groups)
    tracked = not source.is_inference()
    if tracked and (kept := _last_codes.get(source, lambda key, _: _same_arguments(key, arguments))) is not None:
        return kept
    quantize = quantize or (int8_codes if as_int8 else input_codes)
    codes, scale = quantize(rows, dynamic, static_scale, qmin, qmax, clip_ratio)
    if tracked:
        _last_codes.put(source, arguments, (codes, scale))
    else:
        _last_codes.clear()
    return codes, scale


def in_input_groups(quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]], group_size: int
                    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``quantize`` (a dynamic per-token quantizer such as `asymmetric_input_codes`) applied to each group of
    ``group_size`` consecutive columns of a row: codes ``[n, in]`` and scales ``[n, in / group_size]``, the blocks
    `fake_quantize` takes for a spec in groups (`llmquant.quant.primitives.to_blocks`), so the same values."""
    def quantize_groups(rows: torch.Tensor, dynamic: str | None, static_scale: torch.Tensor | None, qmin: int,
                        qmax: int, clip_ratio: Clip = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        assert dynamic == "group" and static_scale is None
        count, width = rows.shape
        codes, scale = quantize(rows.reshape(-1, group_size), "token", None, qmin, qmax, clip_ratio)
        return codes.reshape(count, width), scale.reshape(count, width // group_size)
    return quantize_groups


def grouped_inputs_forward(source: torch.Tensor, rows: torch.Tensor,
                           weight_groups: list[torch.Tensor] | Avx2Weight | GroupedWeight, integer: bool,
                           weight_scale: torch.Tensor, bias: torch.Tensor | None, group_size: int, qmin: int,
                           qmax: int, clip_ratio: Clip = 1.0, asymmetric: bool = False) -> torch.Tensor:
    """`input_grouped_linear` of ``rows`` ``[n, in]`` (``source``, the Linear's input, as rows; its codes per token in
    groups of ``group_size`` columns, shared as in `shared_input_codes`) and ``weight_groups``, the weight's codes
    ``[out, group_size]`` of each group of columns in order: ``integer``, int8 codes multiplied by ``torch._int_mm``
    group by group (`int8_matmul`), else float32 codes (the simulation, and the int8 runtime where `int_mm_refusal`:
    exact products, so the same bits); or a `GroupedWeight` (``integer``; a CPU with AVX512-VNNI), every group in one
    call of the decode op's `grouped_gemm`, or an `Avx2Weight` (``integer``; a CPU with AVX2 but neither VNNI nor
    AMX), every group in one call of the AVX2 op, the same bits. ``asymmetric``: the codes shifted by their zero
    points (`asymmetric_input_codes`)."""
    if isinstance(weight_groups, Avx2Weight):  # (the op's codes of every group in one call)
        quantize = _avx2_quantizer(weight_groups.op, asymmetric)
    elif integer:  # (an op's `block_codes` where one runs)
        quantize = _op_kernels(rows, asymmetric)[0]
    else:
        quantize = asymmetric_input_codes if asymmetric else input_codes
    codes, scale = shared_input_codes(source, rows, "group", None, qmin, qmax, clip_ratio, integer,
                                      in_input_groups(quantize, group_size), input_groups=group_size)
    if isinstance(weight_groups, Avx2Weight):
        return weight_groups(codes, scale, bias, input_group_size=group_size)
    if isinstance(weight_groups, GroupedWeight):
        return weight_groups(codes, scale, bias, input_groups=True)
    if integer:
        return input_grouped_linear(codes, scale, weight_groups, weight_scale, bias,
                                    lambda a, w: int8_matmul(a.contiguous(), w))
    return input_grouped_linear(codes, scale, weight_groups, weight_scale, bias, float_product)


def grouped_int8_linear(rows: torch.Tensor, weight: Int8Weight | GroupedWeight | Avx2Weight,
                        weight_scale: torch.Tensor, bias: torch.Tensor | None, group_size: int, dynamic: str | None,
                        static_scale: torch.Tensor | None, qmin: int, qmax: int, clip_ratio: Clip = 1.0,
                        asymmetric: bool = False) -> torch.Tensor:
    """W4A8 / W4A4 on the int8 runtime (`grouped_linear` with int8 products), ``weight_scale`` ``[out, groups]``:
    a `GroupedWeight` by the decode op's `grouped_gemm` at every row count (one call; the same bits); else
    ``weight`` the codes ``[out, in]`` as int8: up to `GEMV_MAX_ROWS` rows, where the op runs, its `gemv_linear` (one
    call for every group, the same bits), else one ``torch._int_mm`` per group; an `Avx2Weight` by the AVX2 op's one
    call (the same bits); on a CPU without VNNI or AMX where that op does not run, one float32 product of the codes
    per group (`int_mm_refusal`). ``asymmetric``: the input's codes are asymmetric ones shifted by their zero point
    (`asymmetric_int8_codes`; an op's `block_codes` where one runs), which every product takes as it takes
    symmetric ones: c * s is the input's fake-quantized value."""
    if isinstance(weight, GroupedWeight):
        return weight(*_op_quantizer(weight.op, asymmetric)(rows, dynamic, static_scale, qmin, qmax, clip_ratio), bias)
    if isinstance(weight, Avx2Weight):
        quantize = _avx2_quantizer(weight.op, asymmetric)
        return weight(*quantize(rows, dynamic, static_scale, qmin, qmax, clip_ratio), bias)
    codes, scale = _op_kernels(rows, asymmetric)[0](rows, dynamic, static_scale, qmin, qmax, clip_ratio)
    if weight.gemv and rows.shape[0] <= GEMV_MAX_ROWS and (op := cpu_kernel(rows)) is not None:
        return gemv_linear(op, codes, weight.codes, weight.gemv_row_sums(group_size), scale, weight_scale, bias,
                           group_size)
    if int_mm_refusal(rows.device) is not None:  # the weight's float32 codes, made once (`Int8Weight.codes_as_float`)
        groups = list(weight.codes_as_float().split(group_size, dim=1))
        return grouped_linear(codes.float(), scale, groups, weight_scale, bias, float_product)
    groups = [group.contiguous() for group in weight.codes.split(group_size, dim=1)]
    return grouped_linear(codes, scale, groups, weight_scale, bias, lambda a, w: int8_matmul(a.contiguous(), w))


def float_product(codes: torch.Tensor, weight_codes: torch.Tensor) -> torch.Tensor:
    """x_q @ W_q^T of codes held as float32: exact while every partial sum stays below 2^24."""
    return codes @ weight_codes.t()


def grouped_linear(codes: torch.Tensor, scale: torch.Tensor, weight_groups: list[torch.Tensor],
                   weight_scale: torch.Tensor, bias: torch.Tensor | None,
                   product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """y = s_x * sum_g s_w,g * (x_q,g @ W_q,g^T) + b for weights quantized in groups of input columns (W4A8): one
    integer product per group (``product``: int8 x int8 -> int32, or the float32 product of the codes, exact below
    2^24), scaled by its group's weight scales (``weight_scale`` ``[out, groups]``) and summed in group order, as
    a grouped integer kernel does; ``codes`` ``[n, in]``, ``weight_groups`` each ``[out, group]``."""
    y = _scaled_group_products(codes, weight_groups, lambda index: (weight_scale[:, index],), product) * scale
    return y + bias if bias is not None else y


def input_grouped_linear(codes: torch.Tensor, scale: torch.Tensor, weight_groups: list[torch.Tensor],
                         weight_scale: torch.Tensor, bias: torch.Tensor | None,
                         product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """y = s_w * sum_g s_x,g * (x_q,g @ W_q,g^T) + b for inputs quantized per token in groups of columns (Atom's
    activations, arXiv:2310.19102; weights per tensor or channel): one integer product per group (``product``, as in
    `grouped_linear`), scaled by each row's scale of that group (``scale`` ``[n, groups]``) and summed in group
    order, then by ``weight_scale`` ``[1, out]``; ``codes`` ``[n, in]``, ``weight_groups`` each ``[out, group]``.
    A weight in the same groups of columns (Atom's weights, the MX formats' blocks), ``weight_scale`` ``[groups,
    out]``: y = sum_g (s_x,g * (x_q,g @ W_q,g^T)) * s_w,g + b, both scales applied to each group's product."""
    if weight_scale.shape[0] > 1:  # (one group: the two orders are the same operations)
        y = _scaled_group_products(codes, weight_groups, lambda index: (scale[:, index:index + 1],
                                                                         weight_scale[index]), product)
    else:
        y = _scaled_group_products(codes, weight_groups, lambda index: (scale[:, index:index + 1],),
                                   product) * weight_scale
    return y + bias if bias is not None else y


def _scaled_group_products(codes: torch.Tensor, weight_groups: list[torch.Tensor],
                           group_scales: Callable[[int], tuple[torch.Tensor, ...]],
                           product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_g product(x_q,g, W_q,g) times each of group_scales(g) in turn, the groups of columns in order (each
    ``[out, group]``)."""
    size = weight_groups[0].shape[1]
    y = None
    for index, group in enumerate(weight_groups):
        part = product(codes[:, index * size:(index + 1) * size], group)
        for factor in group_scales(index):
            part = part * factor
        y = part if y is None else y.add_(part)
    assert y is not None
    return y


CUDA_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows


def int8_matmul(x_codes: torch.Tensor, weight_codes: torch.Tensor) -> torch.Tensor:
    """x_q @ W_q^T as int32, for int8 ``x_codes`` ``[n, in]`` and ``weight_codes`` ``[out, in]``: int8 x int8 ->
    int32 through ``torch._int_mm`` (the weight as a transposed view: no copy). On CUDA fewer than 17 rows (a
    decode step) are padded with zero rows, which the kernel requires; they are cut off the result."""
    rows = x_codes.shape[0]
    if int_mm_refusal(x_codes.device) is not None:  # (exact below 2^24 as float32; returned as the int32 values)
        return float_product(x_codes.float(), weight_codes.float()).to(torch.int32)
    if x_codes.is_cuda and rows < CUDA_INT_MM_MIN_ROWS:
        padded = torch.nn.functional.pad(x_codes, (0, 0, 0, CUDA_INT_MM_MIN_ROWS - rows))
        return torch._int_mm(padded, weight_codes.t())[:rows]
    return torch._int_mm(x_codes, weight_codes.t())


def _compile_refusal(rows: torch.Tensor) -> str | None:
    if os.environ.get("LLMQUANT_COMPILE", "0") != "1":
        return "off (LLMQUANT_COMPILE=1 turns it on)"
    if rows.device.type != "cpu" or torch.compiler.is_compiling():
        return "not on the CPU"
    return _compile_off


def int8_linear(source: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor | Int8Weight | Avx2Weight,
                weight_scale: torch.Tensor, bias: torch.Tensor | None, dynamic: str | None,
                static_scale: torch.Tensor | None, qmin: int, qmax: int, clip_ratio: Clip = 1.0,
                asymmetric: bool = False) -> torch.Tensor:
    """y ``[n, out]`` float32 for ``rows`` ``[n, in]`` float32 (``source``, the Linear's input, as rows), int8
    ``weight`` ``[out, in]`` (or its `Int8Weight`), ``weight_scale`` ``[1, out]`` (or ``[1, 1]``): the input codes
    (shared by the Linears reading ``source``, `shared_input_codes`), their integer product, its scaling; the
    codes and the scaling compiled for large inputs on the CPU when allowed (module docstring). (Up to
    `GEMV_MAX_ROWS` rows, where the decode op runs, the layer's `DecodeRows` is called instead.) ``asymmetric``:
    the input's codes are asymmetric ones shifted by their zero point (`asymmetric_int8_codes`), made, as are clip
    ratios searched per token, by an op's `block_codes` where one runs (one call, the same bits), else by torch's
    operations."""
    if isinstance(weight, Avx2Weight):  # (the op's codes, a searched clip too, and its product and scaling)
        codes, scale = shared_input_codes(source, rows, dynamic, static_scale, qmin, qmax, clip_ratio, True,
                                          _avx2_quantizer(weight.op, asymmetric))
        return weight(codes, scale, bias)
    quantize, scaling = _compiled_kernels(rows) or _op_kernels(rows)
    if asymmetric or isinstance(clip_ratio, tuple):  # (an op's `block_codes` where one runs; never compiled)
        quantize = _op_kernels(rows, asymmetric)[0]
    codes, scale = shared_input_codes(source, rows, dynamic, static_scale, qmin, qmax, clip_ratio, True, quantize)
    return scaling(int8_product(codes, weight), scale, weight_scale, bias)


@dataclass(frozen=True)
class DecodeRows:
    """A W8A8 Linear's forward of a few rows (up to `GEMV_MAX_ROWS`: decode steps) on the decode op, resolved once
    per layer (`decode_rows`): the input codes by the op (shared by the Linears reading the same tensor,
    `shared_input_codes`), then y = s_x * s_w * (x_q @ W_q^T) + b in one call, the input's leading dimensions kept
    (no reshape either way). `int8_linear`'s bits with less Python around them: a decode step calls 210 Linears
    of the default model, and each Python operation costs about a microsecond there (a hot 1-row call: 8.5 against
    24.2 us, `scripts/runtime_profile.py rows`). With an `Avx2Weight` every row count, prefills too: the AVX2 op's
    packed product serves them all."""

    op: ModuleType
    quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    arguments: tuple  # `shared_input_codes`' (dynamic, static scale, qmin, qmax, clip ratio, as int8)
    weight: Int8Weight | Avx2Weight  # (an Int8Weight's row sums made on the first call)
    weight_scale: torch.Tensor  # [1, out] or [1, 1]
    bias: torch.Tensor | None
    max_values: int  # `GEMV_MAX_ROWS` rows of the Linear's input (an `Avx2Weight`: any number)
    # An `Avx2Weight` with symmetric per-token inputs (a clip ratio, not a searched one) or a static scale: up to
    # `GEMV_MAX_ROWS` rows (this many values) the codes and the product in one call of the op (`avx2_token_linear`,
    # `avx2_static_linear`: the same bits, not shared: a row's codes cost less than the Python that shares them);
    # else 0
    one_call_values: int = 0

    def __call__(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """y ``[..., out]`` for a float32 ``x`` ``[..., in]`` of at most `max_values` values (``source``: the
        Linear's input where ``x`` is its float32 copy, for the codes shared by the Linears reading it)."""
        if x.numel() <= self.one_call_values:
            dynamic, static_scale, qmin, qmax, clip_ratio, _ = self.arguments
            weight = self.weight
            pack = (weight.packed, weight.scales)
            if dynamic is None:
                return avx2_static_linear(self.op, x, static_scale, qmin, qmax, pack, self.bias, weight.outputs)
            return avx2_token_linear(self.op, x, qmax, qmin, clip_ratio, pack, self.bias, weight.outputs)
        codes, scale = shared_input_codes(x if source is None else source, x, *self.arguments, self.quantize)
        if isinstance(self.weight, Avx2Weight):
            return self.weight(codes, scale, self.bias)
        return gemv_linear(self.op, codes, self.weight.codes, self.weight.gemv_row_sums(), scale, self.weight_scale,
                           self.bias)


def decode_rows(weight: Int8Weight | Avx2Weight, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                in_features: int,
                dynamic: str | None, static_scale: torch.Tensor | None, qmin: int, qmax: int,
                clip_ratio: Clip = 1.0, asymmetric: bool = False) -> DecodeRows | None:
    """The layer's `DecodeRows` where the decode op runs (or, for an `Avx2Weight`, the AVX2 op at every row count),
    else None (`int8_linear` then decides at every call). ``asymmetric``: the input's codes shifted by their zero
    point (`asymmetric_op_codes`), which the products take as they take symmetric ones."""
    arguments = (dynamic, static_scale, qmin, qmax, clip_ratio, True)
    if isinstance(weight, Avx2Weight):
        one_call = ((dynamic is None or (dynamic == "token" and not isinstance(clip_ratio, tuple)))
                    and not asymmetric and weight.group_size == 0)
        return DecodeRows(weight.op, _avx2_quantizer(weight.op, asymmetric), arguments, weight, weight_scale, bias,
                          sys.maxsize, GEMV_MAX_ROWS * in_features if one_call else 0)
    if weight.gemv and (op := gemv_kernel()) is not None:
        return DecodeRows(op, _op_quantizer(op, asymmetric), arguments, weight, weight_scale, bias,
                          GEMV_MAX_ROWS * in_features)
    return None


def _op_kernels(rows: torch.Tensor, asymmetric: bool = False
                ) -> tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], Callable[..., torch.Tensor]]:
    """The input quantizer and the scaling of an integer product for ``rows``: where the decode op runs, its codes
    (`op_codes`, or ``asymmetric`` `asymmetric_op_codes`) and its one-pass `scale_product` for oneDNN's float32
    products and ``torch._int_mm``'s int32 ones (converted in their own memory: no promoted copy); where the AVX2 op
    runs, its codes (`avx2_codes`, `asymmetric_op_codes`) and torch's scaling; else torch's."""
    op = cpu_kernel(rows)
    if op is not None:
        return _op_quantizer(op, asymmetric), _in_place_scaling(op)
    avx2 = avx2_kernel(rows)
    if avx2 is not None:
        return _avx2_quantizer(avx2, asymmetric), scale_output
    return (asymmetric_int8_codes if asymmetric else int8_codes), scale_output


@functools.cache
def _in_place_scaling(op: ModuleType) -> Callable[..., torch.Tensor]:
    return functools.partial(_scaled_in_place, op)


def _scaled_in_place(op: ModuleType, product: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    if product.dtype in (torch.float32, torch.int32) and product.is_contiguous():
        return scale_product(op, product, scale, weight_scale, bias)
    return scale_output(product, scale, weight_scale, bias)


def op_codes(decode_op: ModuleType, rows: torch.Tensor, dynamic: str | None, static_scale: torch.Tensor | None,
             qmin: int, qmax: int, clip_ratio: Clip = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`int8_codes` by the decode op (`llmquant.nn.int8_gemv`), the same bits in one call: per token (one pass for
    the absmax, one for the codes, the rows in parallel), per tensor (one absmax over every value), clipped or not, or
    under a static scale (one pass)."""
    if dynamic is None:
        assert static_scale is not None
        return static_codes(decode_op, rows, static_scale, qmin, qmax), static_scale
    if isinstance(clip_ratio, tuple):  # (a searched clip: `block_codes` per token, torch's operations per tensor)
        if dynamic == "token":
            return block_codes(decode_op, rows, qmin, qmax, clip_ratio, asymmetric=False)
        return int8_codes(rows, dynamic, static_scale, qmin, qmax, clip_ratio)
    return (token_codes if dynamic == "token" else tensor_codes)(decode_op, rows, qmax, qmin, clip_ratio)


@functools.cache
def _op_quantizer(decode_op: ModuleType, asymmetric: bool = False) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`op_codes` (or `asymmetric_op_codes`) on ``decode_op``, with `int8_codes`' arguments."""
    return functools.partial(asymmetric_op_codes if asymmetric else op_codes, decode_op)


def avx2_codes(avx2_op: ModuleType, rows: torch.Tensor, dynamic: str | None, static_scale: torch.Tensor | None,
               qmin: int, qmax: int, clip_ratio: Clip = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`int8_codes`, per token or under a static scale by the AVX2 op (`llmquant.nn.int8_gemv`,
    ``int8_gemv_avx2.cpp``: the same bits in one call; `block_codes` where a grid of clip ratios is searched per
    token), otherwise (per tensor, dynamic) by torch's operations."""
    if dynamic is None:
        assert static_scale is not None
        return static_codes(avx2_op, rows, static_scale, qmin, qmax), static_scale
    if dynamic == "token" and not isinstance(clip_ratio, tuple):
        return token_codes(avx2_op, rows, qmax, qmin, clip_ratio)
    if dynamic == "token":
        return block_codes(avx2_op, rows, qmin, qmax, clip_ratio, asymmetric=False)
    return int8_codes(rows, dynamic, static_scale, qmin, qmax, clip_ratio)


def asymmetric_op_codes(op: ModuleType, rows: torch.Tensor, dynamic: str | None, static_scale: torch.Tensor | None,
                        qmin: int, qmax: int, clip_ratio: Clip = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`asymmetric_int8_codes`, per token by an op's `block_codes` (the VNNI op or the AVX2 op: one call, the same
    bits), otherwise by torch's operations."""
    if dynamic == "token":
        return block_codes(op, rows, qmin, qmax, clip_ratio, asymmetric=True)
    return asymmetric_int8_codes(rows, dynamic, static_scale, qmin, qmax, clip_ratio)


@functools.cache
def _avx2_quantizer(avx2_op: ModuleType, asymmetric: bool = False) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`avx2_codes` (or `asymmetric_op_codes`) on ``avx2_op``, with `int8_codes`' arguments."""
    return functools.partial(asymmetric_op_codes if asymmetric else avx2_codes, avx2_op)


def _compiled_kernels(rows: torch.Tensor) -> tuple[Callable, Callable] | None:
    """`int8_codes` and `scale_output` compiled (made once), for ``rows`` this large on the CPU where allowed."""
    global _compiled
    if rows.numel() < COMPILE_MIN_ELEMENTS or _compile_refusal(rows) is not None:
        return None
    if _compiled is None:
        _compiled = (_fallback_on_error(torch.compile(int8_codes, dynamic=True), int8_codes),
                     _fallback_on_error(torch.compile(scale_output, dynamic=True), scale_output))
    return _compiled


def _fallback_on_error(compiled: Callable, eager: Callable) -> Callable:
    def call(*args: object) -> object:
        if _compile_off is None:
            try:
                return compiled(*args)
            except Exception as err:
                _compile_failed(err)
        return eager(*args)
    return call


def _compile_failed(err: Exception) -> None:
    global _compile_off
    if _compile_off is None:
        _compile_off = f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        log.warning("int8 runtime: %s; the int8 Linears run eagerly", _compile_off)

"""The W4 weight-only CPU kernel: y = x @ W_hat^T + b, W_hat = (u - z) * s per group of input columns (u the 4-bit
field of a code, z its zero point in the field's domain, s its group's scale), computed as W4A16 kernels do
(vLLM's, Marlin, torch's tinygemm): activations, scales and zero points in bfloat16, float32 accumulation, the
output rounded to bfloat16. W3 and W2 weights run the same paths as 4-bit fields centred on 8 (`nibbles_of`: half a
byte a weight beside the checkpoint's packed words). Two paths, chosen by the number of rows, and on some CPUs one
before them or one instead:

- up to `GEMV_MAX_ROWS` rows on a CPU where the AVX512-VNNI op of `llmquant.nn.int8_gemv` runs (`Int4DecodeRows`,
  resolved once per layer by the Linear): the op's ``int4_gemv`` reads the checkpoint's packed words as they are (half
  a byte a weight, no copy) and multiplies the float32 inputs in float32, y = sum_g s_g (x_g . u_g - z_g sum(x_g)):
  the simulation's function within float32 roundings, no bfloat16 in it. Each field becomes a float once for all the
  rows. On the Xeon with AMX of BENCHMARKS.md ("W4 decode steps in float32"), a pass over the default model's 210 W4
  g64 Linears at one row: 9.1 against 11.0 ms through torch's int4 kernel on one thread, 6.2 against 8.4 on two
  (`scripts/runtime_profile.py w4rows`); a decode step at batch 1 1.95x / 1.65x as fast as float32 on one / two
  threads (torch's kernel: 1.80x / 1.50x). At 8 rows the two are even (a batch-8 decode was slower on one thread), so
  torch's kernel keeps them;
- up to `DECODE_MAX_ROWS` (a decode step, a GEMV-like shape that reads the weight once per row block): torch's CPU
  int4 kernel ``aten._weight_int4pack_mm_for_cpu``, which reads the 4-bit codes in its own layout (made once per
  layer, half a byte a weight) with one (scale, offset) pair per group: W_hat = (u - 8) * s + (8 - z) * s. On this
  CPU (AMD EPYC, 2 threads; `scripts/runtime_profile.py layer`) a 576 -> 1536 layer at one row: 38 us against 73 us
  for the float32 Linear; at 64 rows both about 0.68 ms.
- more rows (a prefill, compute-bound): the weight dequantized to bfloat16 straight from the checkpoint's packed
  int32 words, read as bytes (two codes a byte, the even one in the low nibble: compressed-tensors' 4-bit layout on a
  little-endian machine), then one bfloat16 GEMM (oneDNN; avx512_bf16 here). At 512 rows: 2.8 ms (about 0.4 of it
  the dequantization) against 4.7 ms for the float32 Linear. torch's int4 kernel is slower than float32 there (it
  does not use the bfloat16 dot-product instructions), the dequantized GEMM below about 64 rows. On a CPU without
  native bfloat16 products (`CpuFeatures.native_bfloat16`: no AVX512-BF16 or AMX), the same bfloat16 values are
  multiplied in float32 and the output rounded to bfloat16: the same function up to the order of the float32 sums.
- on a CPU with AVX2 but neither native bfloat16 products nor VNNI (`int16_linear`, where the AVX2 op of
  `llmquant.nn.int8_gemv` runs; `Int16Rows`, resolved once per layer), every row count: the inputs as per-token int16
  codes, multiplied exactly by the codes u - z in int32 (VPMADDWD), scaled per group in float32, in one call of the
  op. Closer to the simulation than bfloat16 (each input off by at most 2^-16 of its row's largest value), faster
  than float32 in prefills there (where the bfloat16 GEMM was slower) and than torch's int4 kernel in decode steps
  (BENCHMARKS.md "W4 on AVX2 in int16"); the codes u - z kept in the op's panels, 1 byte a weight, instead of the
  int4 kernel's copy.

A deviation from the simulation, on purpose: the simulation (``fake`` runtime) computes in float32, torch's int4
kernel and the bfloat16 GEMM in bfloat16 as the W4A16 kernels they stand for; the difference is the rounding of
bfloat16 (relative 2^-8 per value; on the default model's perplexity, see BENCHMARKS.md "Runtimes"). Nothing else is
kept than the kernel's copy of the codes and the bfloat16 scales (about half a byte a weight beside the checkpoint's
packed words) with, for `Int4DecodeRows`, the float32 zero points (and the scales, where the checkpoint's are not
already float32 [out, groups]), or the int16 path's panels.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from llmquant.nn import int8_gemv
from llmquant.nn.int8_gemv import avx2_gemv_refusal, call_op, switch_refusal
from llmquant.nn.int8_linear import Avx2Weight, avx2_weight_refusal

GEMV_MAX_ROWS = 4  # rows up to which the AVX512-VNNI op multiplies (`Int4DecodeRows`), where it runs (module docstring)
DECODE_MAX_ROWS = 64  # rows up to which torch's int4 kernel runs; the dequantized bfloat16 GEMM from there on
KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes torch's CPU int4 kernel takes
KERNEL_ROW_MULTIPLE = 16  # its output features must be a multiple of 16
FIELD_OFFSET = 8  # the kernel's codes are fields u in [0, 15] with W_hat = (u - 8) * s + offset
MIN_BITS = 2  # weights of 2 to 4 bits run as 4-bit fields


@dataclass(frozen=True)
class Int4Weight:
    """What the paths read, built once per layer (`prepare_int4`)."""

    nibbles: torch.Tensor  # uint8 [out, in / 2]: a 4-bit checkpoint's packed words as bytes (a view), else a copy
    scale: torch.Tensor  # bfloat16 [out, groups, 1]
    zero: torch.Tensor  # bfloat16 [out, groups, 1]: W_hat = (u - zero) * scale
    group_size: int
    # torch's int4 kernel: its layout of the same fields (uint8), and [in / kernel_group, out, 2] bfloat16 scales and
    # offsets (8 - z) * s; None where `int16_weight` is made instead
    kernel_codes: torch.Tensor | None
    kernel_scales: torch.Tensor | None
    kernel_group: int
    # On a CPU with AVX2 but neither native bfloat16 products nor VNNI: the codes u - z (int8) in the AVX2 op's panels
    # with the float32 group scales, which `int16_linear` multiplies at every row count; else None
    int16_weight: Avx2Weight | None
    # Where the VNNI op ran when the weight was prepared: s and z [out, groups] float32 for `Int4DecodeRows`; else None
    float_scale: torch.Tensor | None = None
    float_zero: torch.Tensor | None = None


def int4_refusal(bits: int, group_size: int, in_features: int, out_features: int, device: torch.device) -> str | None:
    """Why the kernel cannot run a weight of ``bits`` bits ``[out, in]`` quantized in groups of ``group_size`` input
    columns (``in`` for per-channel or per-tensor weights), or None. Weights of 2 or 3 bits run as 4-bit fields
    (`nibbles_of`): the same function W_hat = (u - z) * s, u and z shifted by the same integer."""
    if not MIN_BITS <= bits <= 4:
        return f"the int4 kernel takes weights of {MIN_BITS} to 4 bits, not {bits}-bit"
    if device.type != "cpu":
        return f"the int4 kernel runs on the CPU, not {device.type}"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") or sys.byteorder != "little":
        return "this torch has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) for this machine"
    if out_features % KERNEL_ROW_MULTIPLE:
        return f"the int4 kernel needs output features that are a multiple of 16, not {out_features}"
    if kernel_group(group_size) is None:
        return f"the int4 kernel needs groups of a multiple of 32 input columns, not {group_size}"
    return None


def kernel_group(group_size: int) -> int | None:
    """The largest group size of the kernel that divides ``group_size`` (its scales are then repeated)."""
    return next((size for size in KERNEL_GROUPS if group_size % size == 0), None)


def nibbles_of(fields: torch.Tensor) -> torch.Tensor:
    """Unsigned fields ``[out, in]`` below 16 (``in`` even) as bytes ``[out, in / 2]``, two a byte, the even one in the
    low nibble: the layout of 4-bit weights packed in int32 words read as bytes on a little-endian machine."""
    pairs = fields.to(torch.uint8).view(fields.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


@torch.no_grad()
def prepare_int4(nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int) -> Int4Weight:
    """Both paths' tensors for a weight held as 4-bit fields in ``nibbles`` ``[out, in / 2]`` (uint8, `nibbles_of`'s
    layout: a 4-bit checkpoint's packed int32 words ``[out, in / 8]`` viewed as bytes, `llmquant.quant.packing`), with
    ``scale`` and ``zero`` ``[out, groups]`` (float; W_hat = (u - zero) * scale, u the unsigned field)."""
    out_features, groups = scale.shape
    group_size = in_features // groups
    fields = torch.stack((nibbles & 15, nibbles >> 4), -1).reshape(out_features, in_features)
    size = kernel_group(group_size)
    assert size is not None
    common = {"nibbles": nibbles, "scale": scale.to(torch.bfloat16).unsqueeze(-1),
              "zero": zero.to(torch.bfloat16).unsqueeze(-1), "group_size": group_size, "kernel_group": size}
    if (int16_weight := _int16_weight(fields, scale, zero, group_size)) is not None:
        return Int4Weight(**common, kernel_codes=None, kernel_scales=None, int16_weight=int16_weight)
    if int8_gemv.cpu_kernel(nibbles) is not None:
        common |= {"float_scale": scale.float().contiguous(), "float_zero": zero.float().contiguous()}
    repeat = group_size // size
    kernel_scale = scale.float().repeat_interleave(repeat, dim=1)
    offset = (FIELD_OFFSET - zero.float().repeat_interleave(repeat, dim=1)) * kernel_scale
    return Int4Weight(
        **common,
        kernel_codes=torch.ops.aten._convert_weight_to_int4pack_for_cpu(fields.to(torch.int32), 1),
        kernel_scales=torch.stack((kernel_scale.t(), offset.t()), -1).to(torch.bfloat16).contiguous(),
        int16_weight=None,
    )


INT16_QMAX = 32767  # per-token int16 input codes of `int16_linear`


def _int16_weight(fields: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> Avx2Weight | None:
    """The codes u - z ``[out, in]`` with the scales as the AVX2 op reads them (`Avx2Weight`), where `int16_linear`
    runs: a CPU with AVX2 but neither native bfloat16 products nor VNNI, integral zero points (u - z exact in int8),
    and groups small enough that a group's int32 sum cannot overflow (|x_q| <= 32767, |u - z| <= 15)."""
    out_features, in_features = fields.shape
    if int8_gemv.cpu_features().native_bfloat16 or group_size * INT16_QMAX * 15 > torch.iinfo(torch.int32).max:
        return None
    if avx2_weight_refusal(fields.device, in_features, group_size) is not None or not torch.equal(zero, zero.round()):
        return None
    codes = fields.view(out_features, -1, group_size).to(torch.int8) - zero.to(torch.int8).unsqueeze(-1)
    return Avx2Weight.from_codes(codes.view(out_features, in_features), scale, group_size)


def int16_linear(rows: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y ``[..., out]`` = s_x * sum over groups of s_g * (x_q,g . (u - z)_g) + b in float32, for float ``rows`` ``[...,
    in]``: the inputs as per-token int16 codes x_q = round(x / s_x), s_x = max|x| / 32767 (`int16_token_codes`), the
    products exact in int32 by the AVX2 op (VPMADDWD, `avx2_gemm`), the scaling in float32; the op's two calls in one
    (``int16_linear``). Each input's error is at most s_x / 2 (2^-16 of its row's largest value), against 2^-9 of each
    value for the bfloat16 inputs of W4A16 kernels."""
    int16 = weight.int16_weight
    assert int16 is not None
    return call_op(int16.op, "int16_linear", rows.float(), int16.packed, int16.scales, bias, int16.outputs,
                   int16.group_size)


def dequantize_bf16(weight: Int4Weight) -> torch.Tensor:
    """W_hat ``[out, in]`` in bfloat16: the two nibbles of each byte written in place, then (u - z) * s per group."""
    out_features, half = weight.nibbles.shape
    groups = weight.scale.shape[1]
    fields = torch.empty(out_features, half, 2, dtype=torch.bfloat16)
    fields[..., 0] = weight.nibbles & 15
    fields[..., 1] = weight.nibbles >> 4
    fields.view(out_features, groups, -1).sub_(weight.zero).mul_(weight.scale)
    return fields.view(out_features, 2 * half)


@dataclass(frozen=True)
class Int4DecodeRows:
    """A W4 (W3, W2) Linear's forward of a few rows (up to `GEMV_MAX_ROWS`: decode steps) on the AVX512-VNNI op,
    resolved once per layer (`int4_decode_rows`) like the W8A8 Linears' `llmquant.nn.int8_linear.DecodeRows`: y =
    sum_g s_g (x_g . (u_g - z_g)) + b in float32 by ``int4_gemv`` (the checkpoint's packed words read as they are,
    each field converted to float once for all the rows), within float32 roundings of the simulation's x @ W_hat^T,
    the input's leading dimensions kept, with less Python around it than the layer's other paths (a decode step
    calls 210 Linears of the default model; module docstring)."""

    op: ModuleType
    weight: Int4Weight
    bias: torch.Tensor | None
    max_values: int  # `GEMV_MAX_ROWS` rows of the Linear's input

    def __call__(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """y ``[..., out]`` for a float32 ``x`` ``[..., in]`` of at most `max_values` values (``source``, the input
        ``x`` was made from, is not needed here)."""
        weight = self.weight
        y = call_op(self.op, "int4_gemv", x.reshape(-1, x.shape[-1]), weight.nibbles, weight.float_scale,
                    weight.float_zero, self.bias, weight.group_size)
        return y.view(*x.shape[:-1], y.shape[-1])


@dataclass(frozen=True)
class Int16Rows:
    """A W4 (W3, W2) Linear's forward at every row count where `int16_linear` runs (an AVX2 CPU without native
    bfloat16 products or VNNI), resolved once per layer (`int4_decode_rows`) like the W8A8 Linears' `DecodeRows`:
    `int16_linear`'s one call, the input's leading dimensions kept, with less Python around it than `int4_linear`'s
    path (a decode step calls 210 Linears of the default model; BENCHMARKS.md "One call of the op a Linear on
    AVX2"). ``LLMQUANT_GEMV=0`` is read at every call, as `int4_linear` reads it: then its bfloat16 GEMM."""

    weight: Int4Weight  # (its `int16_weight` set)
    bias: torch.Tensor | None
    max_values: int = sys.maxsize  # (every row count)

    def __call__(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """y ``[..., out]`` float32 for a float32 ``x`` ``[..., in]`` (``source``, the input ``x`` was made from,
        is not needed here)."""
        if switch_refusal(x.device) is not None:
            y = int4_linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        return int16_linear(x, self.weight, self.bias)


def int4_decode_rows(weight: Int4Weight, bias: torch.Tensor | None, in_features: int
                     ) -> Int4DecodeRows | Int16Rows | None:
    """The layer's `Int16Rows` where its weight was prepared for `int16_linear`, its `Int4DecodeRows` where the VNNI
    op runs and the weight was prepared for it, else None."""
    if weight.int16_weight is not None:
        return Int16Rows(weight, bias)
    if weight.float_scale is None or (op := int8_gemv.cpu_kernel(weight.nibbles)) is None:
        return None
    return Int4DecodeRows(op, weight, bias, GEMV_MAX_ROWS * in_features)


def int4_linear(rows: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y ``[n, out]`` in ``rows``' dtype for ``rows`` ``[n, in]``: on an AVX2 CPU without native bfloat16
    `int16_linear`; elsewhere torch's int4 kernel for few rows, the bfloat16 GEMM of the dequantized weight for more
    (module docstring; `Int4DecodeRows` before them where the VNNI op runs). With ``LLMQUANT_GEMV=0`` set after the
    weight was prepared for `int16_linear`, the bfloat16 GEMM at every row count."""
    if weight.int16_weight is not None and avx2_gemv_refusal(rows.device) is None:
        return int16_linear(rows, weight, bias).to(rows.dtype)
    inputs = rows.to(torch.bfloat16)
    if rows.shape[0] <= DECODE_MAX_ROWS and weight.kernel_codes is not None:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(inputs, weight.kernel_codes, weight.kernel_group,
                                                       weight.kernel_scales)
    elif int8_gemv.cpu_features().native_bfloat16:
        y = F.linear(inputs, dequantize_bf16(weight))
    else:  # the same bfloat16 values multiplied in float32, the output rounded to bfloat16 as the GEMM's
        y = F.linear(inputs.float(), dequantize_bf16(weight).float()).to(torch.bfloat16)
    y = y.to(rows.dtype)
    return y + bias if bias is not None else y

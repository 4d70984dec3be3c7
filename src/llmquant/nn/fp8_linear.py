"""The FP8 (E4M3) W8A8 linear on ``torch._scaled_mm``: y = s_x * s_w * (x_q @ W_q^T) + b, with x_q the E4M3 codes
of the input (x / s_x clamped to +-448 and rounded to the nearest E4M3 value; s_x its static scale, or absmax /
448 of each row or of the whole input, dynamic) and W_q the stored float8 weight codes.

``torch._scaled_mm`` multiplies float8 operands with float32 accumulation and applies the scales in its epilogue:
one scale per tensor, or (rowwise) ``[rows, 1]`` for the input and ``[1, out]`` for the weight. On CUDA it needs
compute capability 8.9 or higher (Ada, Hopper, Blackwell), inner and output sizes that are multiples of 16, and
rowwise scales write bfloat16 (CUTLASS's ``f8f8bf16_rowwise``): that rounding of the output is the one deviation
from the float32 simulation (`llmquant.nn.quant_linear.QuantLinear`, which computes fq(x) @ dequant(W)^T), as for
the int4 kernel. On the CPU the same operator runs in float32 (the reference product to float32 rounding, tested),
but slower than the simulation at every size measured here (`scripts/runtime_profile.py fp8`, BENCHMARKS.md), so
`QuantLinear.int8_refusal` keeps the simulation there.

DeepSeek-V3's block scheme (weights in 128 x 128 tiles, inputs per token in groups of 128 columns) runs on the same
operator's blockwise scaling (`fp8_block_linear`: cuBLAS on Hopper, CUDA 12.9 or later): one scale per row and
group of the input, ``[rows, in / 128]`` laid out column-major, and one per tile of the weight, ``[in / 128, out /
128]``; each 128-column product is scaled before the sums in float32, which is the simulation's sum of
fq(x)_g @ dequant(W)_g^T up to the order of float32 additions and the output's bfloat16 rounding.
"""

from __future__ import annotations

import os

import torch

from llmquant.device import triton_installed
from llmquant.quant.primitives import MIN_SCALE, qparams_for, quantize
from llmquant.quant.spec import QuantSpec

FP8_MIN_CAPABILITY = (8, 9)
FP8_ALIGNMENT = 16  # inner and output sizes of a CUDA float8 GEMM
FP8_BLOCK = 128  # the blockwise GEMM's tile: inputs in groups of 128 columns, weights in 128 x 128 tiles
FP8_BLOCK_CAPABILITY = (9, 0)  # cuBLAS's blockwise scaling: Hopper
FP8_BLOCK_ROWS = 16  # the blockwise GEMM's rows are padded to a multiple of this


def fused_codes_available(rows: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether `fp8_input_codes` makes its codes in one Triton kernel (`llmquant.nn.fp8_input_kernel`): dynamic
    symmetric inputs per token or in groups with neither a clip ratio nor a clip grid, CUDA rows, Triton installed.
    ``LLMQUANT_FP8_CODES=torch`` keeps the primitives (for comparison)."""
    return (rows.is_cuda and spec.dynamic and spec.symmetric and spec.granularity in ("token", "group")
            and spec.clip_ratio == 1.0 and spec.clip_grid is None
            and os.environ.get("LLMQUANT_FP8_CODES", "triton") != "torch" and triton_installed())


def fp8_input_codes(rows: torch.Tensor, spec: QuantSpec, static_scale: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes of ``rows`` ``[n, in]`` for the input ``spec`` and their scale (``[n, 1]`` per token, ``[n, in /
    group]`` per token in groups, column-major, ``[1, 1]`` per tensor): the static scale, or (dynamic) the spec's
    range of the rows themselves; the primitives' codes, so the simulation's (on a GPU from one kernel that repeats
    their float32 arithmetic: `fused_codes_available`, `llmquant.nn.fp8_input_kernel`)."""
    if fused_codes_available(rows, spec):
        from llmquant.nn.fp8_input_kernel import fp8_row_codes  # imports Triton

        group = spec.group_size if spec.granularity == "group" and spec.group_size else rows.shape[1]
        return fp8_row_codes(rows, group, spec.qmax, MIN_SCALE)
    if spec.dynamic:
        scale, zero = qparams_for(rows, spec)
    else:
        assert static_scale is not None
        scale = static_scale.reshape(1, 1).float()
        zero = torch.zeros_like(scale)
    return quantize(rows, scale, zero, spec), scale


def fp8_linear(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               spec: QuantSpec, static_scale: torch.Tensor | None) -> torch.Tensor:
    """y ``[n, out]`` for ``rows`` ``[n, in]`` quantized as the input ``spec`` says, float8 ``weight`` ``[out, in]``
    and ``weight_scale`` ``[1, out]`` (per channel) or ``[1, 1]`` (per tensor); bfloat16 where the kernel writes
    it (`scaled_product`), else float32."""
    codes, scale = fp8_input_codes(rows, spec, static_scale)
    out_features = weight.shape[0]
    rowwise = scale.numel() > 1 or weight_scale.numel() > 1
    if rowwise:  # both scales rowwise: the kernel takes no mix of a tensor-wise and a rowwise scale
        scale = scale.expand(codes.shape[0], 1).contiguous()
        weight_scale = weight_scale.reshape(1, -1).expand(1, out_features).contiguous()
    else:
        scale, weight_scale = scale.reshape(()), weight_scale.reshape(())
    return scaled_product(codes, weight, scale, weight_scale, bias, bfloat16=rowwise and rows.is_cuda)


def fp8_block_linear(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                     spec: QuantSpec) -> torch.Tensor:
    """y ``[n, out]`` bfloat16 (or float32, `scaled_product`) for ``rows`` ``[n, in]`` quantized per token in groups
    of 128 columns (the input ``spec``), float8 ``weight`` ``[out, in]`` in 128 x 128 tiles and their scales
    ``weight_scale`` ``[out / 128, in / 128]`` (module docstring)."""
    n, groups = rows.shape[0], rows.shape[1] // FP8_BLOCK
    padded = -n % FP8_BLOCK_ROWS  # cuBLAS refuses other row counts (CUBLAS_STATUS_NOT_SUPPORTED, seen at 1 and 3)
    if padded:
        rows = torch.cat([rows, rows.new_zeros(padded, rows.shape[1])])
    codes, scale = fp8_input_codes(rows, spec, None)
    if scale.shape != (rows.shape[0], groups):  # the primitives' [n * groups, 1]: the operator reads [n, groups],
        scale = scale.reshape(rows.shape[0], groups).t().contiguous().t()  # column-major (the kernel's already is)
    return scaled_product(codes, weight, scale, weight_scale.float().t(), bias, bfloat16=True)[:n]


def scaled_product(codes: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, bfloat16: bool) -> torch.Tensor:
    """``torch._scaled_mm`` of the codes and the weight, written in bfloat16 where ``bfloat16`` (the rowwise and
    blockwise kernels on CUDA), else in float32; a bias is added after, in float32 (the operator's own bias epilogue
    has not run on a GPU here)."""
    y = torch._scaled_mm(codes, weight.t(), scale_a=scale, scale_b=weight_scale,
                         out_dtype=torch.bfloat16 if bfloat16 else torch.float32)
    return y.float() + bias if bias is not None else y


def fp8_refusal(device: torch.device, in_features: int, out_features: int, blocks: bool = False) -> str | None:
    """Why ``torch._scaled_mm`` should not run an FP8 Linear on ``device``, or None (module docstring); ``blocks``:
    the block scheme's blockwise scaling."""
    if device.type != "cuda":
        return ("FP8 GEMMs (torch._scaled_mm) run on CUDA; on the CPU the operator is slower than the simulation "
                "(scripts/runtime_profile.py fp8)")
    if torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        return "torch._scaled_mm's FP8 GEMMs need CUDA compute capability 8.9 or higher"
    if in_features % FP8_ALIGNMENT or out_features % FP8_ALIGNMENT:
        return (f"torch._scaled_mm on CUDA needs in and out features that are multiples of {FP8_ALIGNMENT}, not "
                f"{in_features} x {out_features}")
    if blocks and torch.cuda.get_device_capability(device) != FP8_BLOCK_CAPABILITY:
        return "torch._scaled_mm's blockwise FP8 GEMMs run on Hopper (CUDA compute capability 9.0)"
    if blocks and (in_features % FP8_BLOCK or out_features % FP8_BLOCK or in_features == FP8_BLOCK):
        return (f"torch._scaled_mm's blockwise FP8 GEMMs need whole {FP8_BLOCK} x {FP8_BLOCK} tiles and more than one "
                f"group of inputs, not {in_features} x {out_features}")
    return None

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
"""

from __future__ import annotations

import torch

from llmquant.quant.primitives import qparams_for, quantize
from llmquant.quant.spec import QuantSpec

FP8_MIN_CAPABILITY = (8, 9)
FP8_ALIGNMENT = 16  # inner and output sizes of a CUDA float8 GEMM


def fp8_input_codes(rows: torch.Tensor, spec: QuantSpec, static_scale: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes of ``rows`` ``[n, in]`` for the input ``spec`` and their scale (``[n, 1]`` per token, ``[1, 1]`` per
    tensor): the static scale, or (dynamic) the spec's range of the rows themselves; the primitives' codes, so the
    simulation's."""
    if spec.dynamic:
        scale, zero = qparams_for(rows, spec)
    else:
        assert static_scale is not None
        scale = static_scale.reshape(1, 1).float()
        zero = torch.zeros_like(scale)
    return quantize(rows, scale, zero, spec), scale


def fp8_linear(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               spec: QuantSpec, static_scale: torch.Tensor | None) -> torch.Tensor:
    """y ``[n, out]`` float32 for ``rows`` ``[n, in]`` quantized as the input ``spec`` says, float8 ``weight``
    ``[out, in]`` and ``weight_scale`` ``[1, out]`` (per channel) or ``[1, 1]`` (per tensor)."""
    codes, scale = fp8_input_codes(rows, spec, static_scale)
    out_features = weight.shape[0]
    rowwise = scale.numel() > 1 or weight_scale.numel() > 1
    if rowwise:  # both scales rowwise: the kernel takes no mix of a tensor-wise and a rowwise scale
        scale = scale.expand(codes.shape[0], 1).contiguous()
        weight_scale = weight_scale.reshape(1, -1).expand(1, out_features).contiguous()
    else:
        scale, weight_scale = scale.reshape(()), weight_scale.reshape(())
    out_dtype = torch.bfloat16 if rowwise and rows.is_cuda else torch.float32
    y = torch._scaled_mm(codes, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=out_dtype).float()
    return y + bias if bias is not None else y


def fp8_refusal(device: torch.device, in_features: int, out_features: int) -> str | None:
    """Why ``torch._scaled_mm`` should not run an FP8 Linear on ``device``, or None (module docstring)."""
    if device.type != "cuda":
        return ("FP8 GEMMs (torch._scaled_mm) run on CUDA; on the CPU the operator is slower than the simulation "
                "(scripts/runtime_profile.py fp8)")
    if torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        return "torch._scaled_mm's FP8 GEMMs need CUDA compute capability 8.9 or higher"
    if in_features % FP8_ALIGNMENT or out_features % FP8_ALIGNMENT:
        return (f"torch._scaled_mm on CUDA needs in and out features that are multiples of {FP8_ALIGNMENT}, not "
                f"{in_features} x {out_features}")
    return None

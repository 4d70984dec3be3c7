"""The W8A8 int8 linear: y = s_x * s_w * (x_q @ W_q^T) + b, with x_q = round(x / s_x) (symmetric int8 codes of the
input; s_x its static scale, or absmax / 127 of each row or of the whole input, dynamic) and the int8 x int8 -> int32
product of ``torch._int_mm``.

Two implementations of the same arithmetic, chosen by shape:

- eager, in as few operations as the algebra allows (``abs().amax()`` for the dynamic scale, a division rounded in
  place, the int32 product scaled without a separate cast): a decode step (one row) is dominated by the cost of each
  operation, not by the data. On this CPU (2 threads) a 576 -> 1536 layer at one row: 27 us against 69 us for the
  float32 Linear.
- with ``LLMQUANT_COMPILE=1``, compiled by ``torch.compile`` (inductor) on the CPU from `COMPILE_MIN_ELEMENTS`
  input values: the scale, the codes and the epilogue become fused loops over the input and the output. The codes
  are the same bits (division and half-to-even rounding as in eager; tested). It is off by default: in the default
  model's 512-token prefill it saved 2% at batch 1 and 7% at batch 8 (462 against 469 ms, 3.39 against 3.64 s,
  2 threads; `scripts/runtime_profile.py compile --model DIR [--batch 8]`), where the int8 GEMMs (146 ms) and the
  float attention (133 ms) dominate, and compiling costs seconds once per process and shape class. Where it cannot
  run (no C++ compiler) the eager path is used and the reason logged once.

`input_codes` is shared with the simulation of `llmquant.nn.quant_linear.QuantLinear`, which must give the same
codes (its float32 product of the codes is exact, so both runtimes return the same logits).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from llmquant.quant.primitives import MIN_SCALE

log = logging.getLogger(__name__)

COMPILE_MIN_ELEMENTS = 1 << 17  # rows x in_features from which the compiled kernel runs (a 512-token prefill: 295k)
_compiled: Callable[..., torch.Tensor] | None = None
_compile_off: str | None = None  # why the compiled kernel is not used in this process


def input_codes(rows: torch.Tensor, dynamic: str | None, static_scale: torch.Tensor | None, qmin: int,
                qmax: int, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes of ``rows`` ``[n, in]`` as rounded float32 values, and their scale (``[n, 1]`` per token,
    ``[1, 1]`` per tensor). ``dynamic``: "token" or "tensor" (the scale from the rows themselves: clip_ratio * absmax
    / qmax; unclipped, no code can leave [-qmax, qmax]), or None for ``static_scale`` (codes clamped to [qmin,
    qmax])."""
    if dynamic is None:
        assert static_scale is not None
        return torch.div(rows, static_scale).round_().clamp_(qmin, qmax), static_scale
    absmax = rows.abs().amax(-1, keepdim=True) if dynamic == "token" else rows.abs().amax().reshape(1, 1)
    if clip_ratio != 1.0:
        scale = (absmax * clip_ratio / qmax).clamp_(min=MIN_SCALE)
        return torch.div(rows, scale).round_().clamp_(qmin, qmax), scale
    scale = (absmax / qmax).clamp_(min=MIN_SCALE)
    return torch.div(rows, scale).round_(), scale


def int8_linear_eager(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                      dynamic: str | None, static_scale: torch.Tensor | None, qmin: int, qmax: int,
                      clip_ratio: float = 1.0) -> torch.Tensor:
    """y ``[n, out]`` float32 for ``rows`` ``[n, in]`` float32, int8 ``weight`` ``[out, in]``, ``weight_scale``
    ``[1, out]`` (or ``[1, 1]``)."""
    codes, scale = input_codes(rows, dynamic, static_scale, qmin, qmax, clip_ratio)
    return scaled_product(codes.to(torch.int8), scale, weight, weight_scale, bias, int8_matmul)


def scaled_product(codes: torch.Tensor, scale: torch.Tensor, weight_codes: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
    """y = product(x_q, W_q) * (s_x * s_w) + b: the int32 product (`int8_matmul`) promoted by the float scales, or
    the float32 product of the codes (`float_product`, the simulation), the same values in the same order."""
    y = product(codes, weight_codes) * (scale * weight_scale)
    return y + bias if bias is not None else y


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
    size = weight_groups[0].shape[1]
    y = None
    for index, group in enumerate(weight_groups):
        part = product(codes[:, index * size:(index + 1) * size], group) * weight_scale[:, index]
        y = part if y is None else y.add_(part)
    assert y is not None
    y = y * scale
    return y + bias if bias is not None else y


CUDA_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows


def int8_matmul(x_codes: torch.Tensor, weight_codes: torch.Tensor) -> torch.Tensor:
    """x_q @ W_q^T as int32, for int8 ``x_codes`` ``[n, in]`` and ``weight_codes`` ``[out, in]``: int8 x int8 ->
    int32 through ``torch._int_mm`` (the weight as a transposed view: no copy). On CUDA fewer than 17 rows (a
    decode step) are padded with zero rows, which the kernel requires; they are cut off the result."""
    rows = x_codes.shape[0]
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


def int8_linear(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                dynamic: str | None, static_scale: torch.Tensor | None, qmin: int, qmax: int,
                clip_ratio: float = 1.0) -> torch.Tensor:
    """`int8_linear_eager`'s result, by the compiled kernel for large inputs on the CPU (module docstring)."""
    global _compiled, _compile_off
    args = (rows, weight, weight_scale, bias, dynamic, static_scale, qmin, qmax, clip_ratio)
    if rows.numel() < COMPILE_MIN_ELEMENTS or _compile_refusal(rows) is not None:
        return int8_linear_eager(*args)
    try:
        if _compiled is None:
            _compiled = torch.compile(int8_linear_eager, dynamic=True)
        return _compiled(*args)
    except Exception as err:
        _compile_off = f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        log.warning("int8 runtime: %s; the int8 Linears run eagerly", _compile_off)
        return int8_linear_eager(*args)

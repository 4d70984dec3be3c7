"""The simulation's FP8 (E4M3) quantize-dequantize of inputs and KV caches on the CPU in one pass, by a small C++ op
(``e4m3_rounding.cpp``): `fused_fake_quantize` gives `llmquant.quant.primitives.fake_quantize`'s bits for a float
spec per token, per group of columns, per tensor or per attention head (static), where the primitives take about
eleven passes over the tensor (division, clamp, cast to float8, a table read back, the zero point, the scale).

FP8 has no CPU kernel in this runtime: the simulation is what runs an FP8 checkpoint on the CPU, and what the engine
propagates an FP8 layer's calibration samples through. Where the op does not run (not float32 on the CPU, no AVX2,
``LLMQUANT_GEMV=0``, no compiler, a failed build) `fused_fake_quantize` returns None, and `simulated` (what the
simulation's callers use) takes the primitives.

For a float spec's weights the op also gives the float8 codes (`quantized_codes`: `quantize`'s codes in one pass,
where torch's cast alone takes about as long as the op) and their relative error against the float weight
(`fused_code_error`: the manifest's weight error without the dequantized copy, which reading float8 codes back
through their table makes; None where the op does not run, and `QuantLinear.weight_error` takes the primitives).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from llmquant.nn.int8_gemv import build_op, call_op, float32_avx2_refusal
from llmquant.quant.primitives import MIN_SCALE, fake_quantize, quantize
from llmquant.quant.spec import QuantSpec

SOURCE = Path(__file__).with_name("e4m3_rounding.cpp")
FLAGS = ["-O3", "-mavx2", "-ffp-contract=off", "-fopenmp"]  # (no contraction: the primitives' roundings)
_op: ModuleType | None = None
_build_error: str | None = None


def e4m3_op_refusal(x: torch.Tensor, spec: QuantSpec) -> str | None:
    """Why the op does not fake-quantize ``x`` by ``spec``, or None (it may still fail to build: `e4m3_op`)."""
    if spec.type != "float":
        return "an integer spec (the op rounds to E4M3)"
    if spec.granularity not in ("token", "group", "tensor", "channel", "attn_head"):
        return f"granularity {spec.granularity!r}"
    return float32_avx2_refusal(x, "values", _build_error)


def e4m3_op(x: torch.Tensor, spec: QuantSpec) -> ModuleType | None:
    """The built op where it runs for ``x`` and ``spec`` (built on the first call, once per machine), else None."""
    global _op, _build_error
    if e4m3_op_refusal(x, spec) is not None:
        return None
    if _op is None:
        _op, _build_error = build_op(SOURCE, "llmquant_e4m3_rounding", FLAGS, "the primitives' fake_quantize")
    return _op


def _rows(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` as the op's rows, each quantized with one scale, row r taking the r-th of the scales modulo their count:
    its block view (`to_blocks`); a static scale per tensor over its last dimension's rows; for one per head the rows
    [batch * heads, positions * dim] (row r takes head r % heads). None for a dynamic scale per head (not a scheme)
    and for scales of another count (the primitives' broadcasting then says what is wrong)."""
    if spec.granularity == "attn_head":
        if scale is None or x.dim() != 4 or scale.numel() != x.shape[1]:
            return None
        return x.reshape(x.shape[0] * x.shape[1], -1)
    if spec.granularity == "group":
        assert spec.group_size is not None  # guaranteed by QuantSpec validation
        if x.shape[-1] % spec.group_size:
            return None
        rows = x.reshape(-1, spec.group_size)
    elif spec.granularity == "channel":
        rows = x.reshape(x.shape[0], -1)
    elif spec.granularity == "token" or (spec.granularity == "tensor" and scale is not None):
        rows = x.reshape(-1, x.shape[-1])
    else:
        rows = x.reshape(1, -1)  # (per tensor, dynamic: one row)
    return rows if scale is None or scale.numel() in (1, rows.shape[0]) else None


def _scales(scale: torch.Tensor) -> torch.Tensor:
    """A given scale as the op reads it: contiguous float32 values, without a gradient."""
    return scale.detach().float().reshape(-1).contiguous()


def fused_fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """`fake_quantize` (x, spec, scale, zeros) of a float spec in one call of the op: the same bits for finite values
    (a NaN gives a NaN; the primitives spread it over its block), without a gradient (callers pass it straight through:
    `straight_through`). ``scale``: a static quantizer's (one value, or one per head for ``attn_head``), None for
    dynamic ones. None where the op does not run (`e4m3_op_refusal`) or the scale wants a gradient."""
    if scale is not None and scale.requires_grad and torch.is_grad_enabled():
        return None  # (a scale being trained: its gradient goes through the primitives' product)
    op = e4m3_op(x, spec)
    rows = None if op is None else _rows(x.detach(), spec, scale)
    if op is None or rows is None:
        return None
    scales = torch.empty(0) if scale is None else _scales(scale)
    out = call_op(op, "e4m3_fake_quantize", rows.contiguous(), scales, float(spec.qmax), float(spec.clip_ratio),
                  MIN_SCALE)
    return out.reshape(x.shape)


def simulated(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
              zero: torch.Tensor | None = None) -> torch.Tensor:
    """`fake_quantize` (x, spec, scale, zero; ``zero`` None: zeros) by the op where it runs (`fused_fake_quantize`),
    else by the primitives: the same values either way."""
    fused = fused_fake_quantize(x, spec, scale)
    if fused is not None:
        return fused
    return fake_quantize(x, spec, scale, None if scale is None else torch.zeros_like(scale) if zero is None else zero)


def _weight_rows(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor) -> tuple[ModuleType, torch.Tensor] | None:
    """The op and ``x``'s contiguous rows for a float spec's given scales (per tensor, per channel, per group; the
    zero point of a float spec is 0), or None where the op does not run for them."""
    op = e4m3_op(x, spec)
    if op is None or spec.granularity not in ("tensor", "channel", "group") or x.dim() != 2:
        return None
    rows = _rows(x.detach(), spec, scale)
    return None if rows is None else (op, rows.contiguous())


def quantized_codes(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """`quantize` (x, scale, zero, spec): the codes of a 2-D tensor (a weight) in its own shape. For a float spec by
    the op where it runs: E4M3(clamp(x / s, -448, 448)), the bytes torch's float8_e4m3fn cast gives those values."""
    found = _weight_rows(x, spec, scale) if spec.type == "float" else None
    if found is None:
        return quantize(x, scale, zero, spec)
    op, rows = found
    return call_op(op, "e4m3_codes", rows, _scales(scale), float(spec.qmax)).view(spec.code_dtype).reshape(x.shape)


def fused_code_error(codes: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, x: torch.Tensor) -> float | None:
    """||dequantize(codes) - x|| / ||x|| (0 / 0 reads 0) of a 2-D tensor's float8 codes (a weight's, zero point 0)
    against the float tensor ``x``, by the op: each row's sums in one pass over codes and ``x`` (float32 within a row,
    float64 over the rows). None where the op does not run for them (other codes, devices or granularities)."""
    found = _weight_rows(x, spec, scale) if codes.dtype == torch.float8_e4m3fn and codes.device == x.device else None
    if found is None:
        return None
    op, rows = found
    sums = call_op(op, "e4m3_code_errors", codes.contiguous().view(torch.uint8).reshape(rows.shape), _scales(scale),
                   rows).sum(dim=0)
    return float(sums[0].sqrt() / sums[1].sqrt().clamp(min=1e-30))

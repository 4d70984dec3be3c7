"""`QuantLinear`: a Linear whose weight is stored as integer codes and whose input is quantized.

Two runtimes compute the same function:

- ``fake`` (accuracy studies): y = fq_a(x) @ dequant(W_q)^T + b, where fq_a fake-quantizes the activation
  with a static scale (calibrated by an `Observer`) or a dynamic one (computed from x at run time);
- ``int8`` (speed, W8A8 with symmetric int8 weights per tensor or channel and int8 inputs per tensor or
  token): y = s_x * s_w * (x_q @ W_q^T) + b with the int8 x int8 -> int32 product of `torch._int_mm` and
  the scales applied once per output. Both round x the same way, so they differ only by float rounding.

Parameter names and storage shapes follow compressed-tensors, so a state dict is a checkpoint:
``weight`` (int8 codes), ``weight_scale`` ([1] per tensor, [out, 1] per channel, [out, in / g] per
group), ``weight_zero_point`` (asymmetric only), ``input_scale`` / ``input_zero_point`` (static only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.nn.online_rotation import attach_input_rotation, input_rotation_of
from llmquant.quant import Observer, QuantSpec, dequantize, fake_quantize, quantize
from llmquant.quant.observers import observe_once


def storage_shape(spec: QuantSpec, weight_shape: torch.Size) -> tuple[int, ...]:
    """Shape of a weight's scale/zero point as compressed-tensors stores it."""
    out_features, in_features = weight_shape
    if spec.granularity == "tensor":
        return (1,)
    if spec.granularity == "channel":
        return (out_features, 1)
    assert spec.group_size is not None
    return (out_features, in_features // spec.group_size)


class QuantLinear(nn.Module):
    """Fake-quant linear layer with integer weight storage (the accuracy runtime)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_spec: QuantSpec | None,
        input_spec: QuantSpec | None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.input_spec = weight_spec, input_spec
        shape = torch.Size((out_features, in_features))
        if weight_spec is None:
            self.weight = nn.Parameter(torch.zeros(shape), requires_grad=False)
        else:
            self.register_buffer("weight", torch.zeros(shape, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(storage_shape(weight_spec, shape)))
            if not weight_spec.symmetric:
                self.register_buffer("weight_zero_point", torch.zeros(storage_shape(weight_spec, shape)))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        if input_spec is not None and not input_spec.dynamic:
            self.register_buffer("input_scale", torch.ones(1))
            if not input_spec.symmetric:
                self.register_buffer("input_zero_point", torch.zeros(1))
        self.observer: Observer | None = None
        self._dequantized: torch.Tensor | None = None
        self._weight_t: torch.Tensor | None = None
        self.runtime = "fake"

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weight_spec: QuantSpec | None, input_spec: QuantSpec | None
    ) -> QuantLinear:
        """Quantize ``linear``'s weight by round-to-nearest with the spec's observer."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec, input_spec)
        rotation = input_rotation_of(linear)
        if rotation is not None:  # an online rotation (QuaRot's R4) stays in front of the quantized input
            attach_input_rotation(module, rotation)
        module.set_weight(linear.weight.detach())
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach().float())
        return module

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Store ``weight`` quantized with ``qparams`` (block view), or with the observer's when None."""
        weight = weight.float()
        if self.weight_spec is None:
            self.weight.data.copy_(weight)
        else:
            scale, zero = qparams if qparams is not None else observe_once(weight, self.weight_spec)
            self.weight.copy_(quantize(weight, scale, zero, self.weight_spec))
            self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
            if not self.weight_spec.symmetric:
                self.weight_zero_point.copy_(zero.reshape(self.weight_zero_point.shape))
        self._dequantized = None
        self._weight_t = None

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.weight_spec is not None
        scale = self.weight_scale.reshape(-1, 1)
        zero = self.weight_zero_point.reshape(-1, 1) if not self.weight_spec.symmetric else torch.zeros_like(scale)
        return scale, zero

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer computes with (cached)."""
        if self.weight_spec is None:
            return self.weight
        if self._dequantized is None:
            self._dequantized = dequantize(self.weight, *self.weight_qparams(), self.weight_spec)
        return self._dequantized

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._dequantized = None
        self._weight_t = None

    # --- integer runtime ----------------------------------------------------------------------
    @property
    def supports_int8(self) -> bool:
        """Whether this layer can run as an int8 x int8 GEMM (W8A8, symmetric)."""
        w, a = self.weight_spec, self.input_spec
        return (
            w is not None and a is not None and w.bits == 8 and a.bits == 8 and w.symmetric and a.symmetric
            and w.granularity in ("tensor", "channel") and a.granularity in ("tensor", "token")
        )

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.input_spec
        assert spec is not None
        rows = x.reshape(-1, self.in_features).float()
        if not spec.dynamic:
            x_scale = self.input_scale.reshape(1, 1)
        elif spec.granularity == "token":
            x_scale = (rows.abs().amax(dim=1, keepdim=True) / spec.qmax).clamp(min=1e-8)
        else:
            x_scale = (rows.abs().amax() / spec.qmax).clamp(min=1e-8).reshape(1, 1)
        x_codes = torch.clamp(torch.round(rows / x_scale), spec.qmin, spec.qmax).to(torch.int8)
        if self._weight_t is None:
            self._weight_t = self.weight.t().contiguous()
        accumulated = torch._int_mm(x_codes, self._weight_t)
        y = accumulated.float() * (x_scale * self.weight_scale.reshape(1, -1))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    # --- activation calibration -------------------------------------------------------------
    def start_observing(self) -> None:
        """Record input statistics on the next forwards (inputs pass unquantized meanwhile)."""
        if self.input_spec is not None and not self.input_spec.dynamic:
            self.observer = Observer(self.input_spec)

    @torch.no_grad()
    def stop_observing(self) -> None:
        """Freeze the static input scale from what was observed."""
        if self.observer is None:
            return
        scale, zero = self.observer.qparams()
        self.input_scale.copy_(scale.reshape(1))
        if self.input_spec is not None and not self.input_spec.symmetric:
            self.input_zero_point.copy_(zero.reshape(1))
        self.observer = None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.input_spec
        if spec is None:
            return x
        if self.observer is not None:
            self.observer.update(x)
            return x
        if spec.dynamic:
            return fake_quantize(x, spec)
        zero = self.input_zero_point if not spec.symmetric else torch.zeros_like(self.input_scale)
        return fake_quantize(x, spec, self.input_scale.reshape(1, 1), zero.reshape(1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime == "int8" and self.observer is None and self.supports_int8:
            return self._int8_forward(x)
        weight = self.dequantized_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(self.quantize_input(x), weight, bias)

    def extra_repr(self) -> str:
        w = self.weight_spec.describe() if self.weight_spec else "float"
        a = self.input_spec.describe() if self.input_spec else "float"
        return f"in={self.in_features}, out={self.out_features}, weight={w}, input={a}, runtime={self.runtime}"


def set_runtime(model: nn.Module, runtime: str) -> int:
    """Run every `QuantLinear` that can with ``runtime`` ("fake" or "int8"); return how many switched."""
    if runtime not in ("fake", "int8"):
        from llmquant.errors import LlmquantError

        raise LlmquantError(f"unknown runtime '{runtime}'; allowed: fake, int8")
    switched = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and (runtime == "fake" or module.supports_int8):
            module.runtime = runtime
            switched += 1
    return switched

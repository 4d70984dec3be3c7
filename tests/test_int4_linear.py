"""The W4 weight-only CPU kernel (`llmquant.nn.int4_linear`): torch's int4 kernel for few rows, the dequantized
bfloat16 GEMM for more; both compute the layer's function in bfloat16, checked against a float64 reference of the
same bfloat16 inputs and against the float32 simulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_model
from llmquant.nn import int4_linear
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.quant import QuantSpec

BF16_EPS = 2.0**-8  # bfloat16's relative rounding step

SPECS = [
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64),
    QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128),
    QuantSpec(bits=4, symmetric=True, granularity="channel"),
    QuantSpec(bits=4, symmetric=False, granularity="tensor"),
]


def _layer(spec: QuantSpec, in_features: int = 256, out_features: int = 96) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(in_features, out_features), spec, None)


def _bf16_reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x and the dequantized weight rounded to bfloat16, multiplied in float64: what a bfloat16 kernel with float
    accumulation computes, up to its output's rounding."""
    weight = layer.dequantized_weight().to(torch.bfloat16).double()
    return x.to(torch.bfloat16).double() @ weight.t() + layer.bias.double()


@pytest.mark.parametrize("rows", [1, 3, int4_linear.DECODE_MAX_ROWS, int4_linear.DECODE_MAX_ROWS + 1, 200])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("native", [True, False], ids=["bf16_gemm", "float32_gemm"])  # (no AVX512-BF16 or AMX: False)
def test_int4_runtime_computes_the_layer_in_bfloat16(spec: QuantSpec, rows: int, native: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int4_linear, "native_bfloat16", lambda: native)
    layer = _layer(spec)
    x = torch.randn(2, rows, 256)
    simulated = layer(x)
    assert set_runtime(layer, "int8") == 1 and layer.runtime == "int8"
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, rows, 96)
    scale = simulated.abs().max()
    # the bfloat16 rounding of the scales, the weights (GEMM path) and the output: a few steps of 2^-8
    assert (y.double() - _bf16_reference(layer, x)).abs().max() <= 4 * BF16_EPS * scale
    assert (y - simulated).abs().max() <= 4 * BF16_EPS * scale
    assert (y - simulated).abs().max() > 0  # a real kernel ran, not the simulation


@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: s.describe())
def test_both_paths_read_the_same_codes(spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(spec, 512, 64)
    set_runtime(layer, "int8")
    x = torch.randn(8, 512)
    by_kernel = layer(x)
    monkeypatch.setattr(int4_linear, "DECODE_MAX_ROWS", 0)
    by_gemm = layer(x)
    assert (by_kernel - by_gemm).abs().max() <= 4 * BF16_EPS * by_kernel.abs().max()
    weight = layer._int4_weight
    assert weight is not None
    exact = layer.dequantized_weight()
    assert (int4_linear.dequantize_bf16(weight).float() - exact).abs().max() <= 2 * BF16_EPS * exact.abs().max()


def test_int4_caches_are_counted_and_dropped_with_the_weight() -> None:
    layer = _layer(SPECS[0], 256, 96)
    set_runtime(layer, "int8")
    assert layer.runtime_caches() == []
    layer(torch.randn(1, 256))
    codes, scales = layer._int4_weight.kernel_codes, layer._int4_weight.kernel_scales
    assert codes.numel() * codes.element_size() == 96 * 256 // 2  # half a byte a weight
    cached = {id(t) for t in layer.runtime_caches()}
    assert id(codes) in cached and id(scales) in cached
    assert not any(t.untyped_storage().data_ptr() == layer.weight_packed.untyped_storage().data_ptr()
                   for t in layer.runtime_caches())  # the nibbles are a view of the state dict, not a cache
    layer.set_weight(torch.zeros(96, 256))
    assert layer._int4_weight is None
    assert torch.equal(layer(torch.randn(2, 256)), layer.bias.expand(2, 96))


@pytest.mark.parametrize(("spec", "shape", "reason"), [
    (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32), (64, 40), "multiple of 16, not 40"),
    (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16), (64, 32), "multiple of 32 input"),
    (QuantSpec(bits=3, symmetric=False, granularity="group", group_size=32), (64, 32), "4-bit weights, not 3-bit"),
])
def test_shapes_the_kernel_refuses_keep_the_simulation(spec: QuantSpec, shape: tuple[int, int], reason: str) -> None:
    layer = _layer(spec, *shape)
    x = torch.randn(3, shape[0])
    simulated = layer(x)
    set_runtime(layer, "int8")
    assert layer.runtime == "fake"
    in_features, out_features = shape
    group = spec.group_size or in_features
    assert reason in int4_linear.int4_refusal(spec.bits, group, in_features, out_features, torch.device("cpu"))
    assert layer.int8_fallback == (int4_linear.int4_refusal(spec.bits, group, *shape, torch.device("cpu"))
                                   if layer.supports_int4 else None)
    assert torch.equal(layer(x), simulated)


def test_w4_model_on_the_int4_kernel_keeps_its_logits(calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    import llmquant

    model = make_model("llama")
    llmquant.quantize(model, {"scheme": "w_uint4_per_group_asym", "group_size": 32}, calib=calib_ids, progress=False)
    with torch.no_grad():
        simulated = model(eval_ids).logits
        switched = set_runtime(model, "int8")
        assert switched == sum(isinstance(m, QuantLinear) for m in model.modules())
        kernel = model(eval_ids).logits
    assert (kernel - simulated).abs().max() <= 0.02 * simulated.abs().max()
    assert (kernel.argmax(-1) == simulated.argmax(-1)).float().mean() > 0.95

"""The FP8 simulation's one-pass op (`llmquant.nn.e4m3_simulation`, ``e4m3_rounding.cpp``): the bits of
`fake_quantize` at every granularity the simulation quantizes inputs and KV caches with, rounding ties and E4M3's
subnormals included; a float spec's weight codes and their error against the float weight; the same model with it
and without it; where it stands aside."""

from __future__ import annotations

import pytest
import torch

import llmquant
from conftest import VOCAB, logits, make_model, needs_avx2
from llmquant.nn import e4m3_simulation, int8_gemv
from llmquant.nn.e4m3_simulation import e4m3_op_refusal, fused_code_error, fused_fake_quantize, quantized_codes
from llmquant.nn.quant_linear import QuantLinear, shared_fake_quantize
from llmquant.quant import QuantSpec, dequantize, fake_quantize, quantize
from llmquant.quant.observers import observe_once

E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
FINITE = E4M3_VALUES[E4M3_VALUES.isfinite()].unique()


def _awkward_values(generator: torch.Generator) -> torch.Tensor:
    """Every E4M3 value, every midpoint between two neighbours (a tie, rounded to the even code), values past 448,
    the subnormals' range, signed zeros, and random values over 12 decades."""
    positive = FINITE[FINITE >= 0]
    midpoints = (positive[1:] + positive[:-1]) / 2
    ties = torch.cat([midpoints, -midpoints])
    special = torch.tensor([0.0, -0.0, 448.0, -448.0, 464.0, 479.9, 480.0, 1e6, -1e6, 2.0 ** -10, -(2.0 ** -10),
                            2.0 ** -12, 3 * 2.0 ** -10, 2.0 ** -6 - 2.0 ** -11, 2.0 ** -6 + 2.0 ** -12])
    spread = torch.randn(4000, generator=generator) * torch.logspace(-8, 4, 4000)
    return torch.cat([FINITE, ties, special, spread])


def _equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@needs_avx2
@pytest.mark.parametrize("width", [576, 13])  # (13: the op's eight lanes, then five one at a time)
def test_static_scales_give_the_primitives_bits_on_ties_subnormals_and_saturation(width: int) -> None:
    generator = torch.Generator().manual_seed(0)
    values = _awkward_values(generator)
    x = values[: values.numel() // width * width].reshape(-1, width)
    per_tensor = QuantSpec(bits=8, type="float", granularity="tensor", dynamic=False)
    for scale in (1.0, 0.37, 2.0 ** -7):  # (1: the values themselves are the ties)
        static = torch.tensor([[scale]])
        fused = fused_fake_quantize(x, per_tensor, static)
        assert fused is not None
        assert _equal_bits(fused, fake_quantize(x, per_tensor, static, torch.zeros_like(static)))
    # keys [batch, heads, positions, dim], one scale per head (the FP8 KV cache per head)
    per_head = QuantSpec(bits=8, type="float", granularity="attn_head", dynamic=False)
    keys = torch.randn(2, 3, 5, 16, generator=generator) * torch.tensor([1.0, 30.0, 1e-3]).reshape(1, 3, 1, 1)
    scales = torch.tensor([[0.01], [0.2], [1e-5]])
    fused = fused_fake_quantize(keys, per_head, scales)
    assert fused is not None and _equal_bits(fused, fake_quantize(keys, per_head, scales, torch.zeros_like(scales)))
    assert fused_fake_quantize(keys, per_head, scales[:2]) is None  # (not one scale a head: the primitives refuse)
    assert fused_fake_quantize(x, per_tensor, torch.ones(2, 1)) is None


@needs_avx2
@pytest.mark.parametrize("granularity", ["token", "group", "tensor"])
@pytest.mark.parametrize("clip_ratio", [1.0, 0.9])
def test_dynamic_scales_give_the_primitives_bits(granularity: str, clip_ratio: float) -> None:
    generator = torch.Generator().manual_seed(1)
    spec = QuantSpec(bits=8, type="float", granularity=granularity, dynamic=True, clip_ratio=clip_ratio,
                     group_size=32 if granularity == "group" else None)
    rows = torch.randn(3, 7, 96, generator=generator) * torch.logspace(-9, 3, 96)  # (some rows all subnormal codes)
    rows[0, 0] = 0.0  # (a zero row: the scale's floor)
    fused = fused_fake_quantize(rows, spec)
    assert fused is not None and _equal_bits(fused, fake_quantize(rows, spec))
    with_nan = rows.clone()
    with_nan[1, 2, 5] = float("nan")
    assert bool(fused_fake_quantize(with_nan, spec)[1, 2, 5].isnan())  # (a NaN stays one)


WEIGHT_SPECS = [QuantSpec(bits=8, type="float", granularity="channel"),
                QuantSpec(bits=8, type="float", granularity="tensor"),
                QuantSpec(bits=8, type="float", granularity="group", group_size=12)]


@needs_avx2
@pytest.mark.parametrize("spec", WEIGHT_SPECS, ids=lambda spec: spec.granularity)
@pytest.mark.parametrize("width", [96, 108])  # (108 and groups of 12: the op's eight lanes, then a tail of four)
def test_weight_codes_and_their_error_match_the_primitives(spec: QuantSpec, width: int) -> None:
    """The op's float8 codes of a weight are `quantize`'s bytes (ties, subnormals, saturation, signed zeros, a NaN),
    and its relative error is the primitives' ||dequantize(codes) - W|| / ||W|| to float32 rounding."""
    generator = torch.Generator().manual_seed(4)
    values = _awkward_values(generator)
    weight = values[: values.numel() // width * width].reshape(-1, width)
    assert e4m3_simulation.e4m3_op(weight, spec) is not None  # (the op itself, not the primitives' fallback)
    scale, zero = observe_once(weight, spec)
    codes = quantized_codes(weight, spec, scale, zero)
    expected = quantize(weight, scale, zero, spec)
    assert codes.dtype == torch.float8_e4m3fn and torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))
    for given in (scale, scale / 3):  # (the observer's scales, and scales that saturate many values)
        codes = quantized_codes(weight, spec, given, zero)
        assert torch.equal(codes.view(torch.uint8), quantize(weight, given, zero, spec).view(torch.uint8))
        plain = float((dequantize(codes, given, zero, spec) - weight).norm() / weight.norm())
        assert fused_code_error(codes, spec, given, weight) == pytest.approx(plain, rel=1e-5)
    with_nan = weight.clone()
    with_nan[1, 3] = float("nan")
    ones = torch.ones_like(scale)
    nan_codes = quantized_codes(with_nan, spec, ones, zero).view(torch.uint8)
    assert torch.equal(nan_codes, quantize(with_nan, ones, zero, spec).view(torch.uint8))


@needs_avx2
def test_a_layers_weight_error_is_the_dequantized_weights_error() -> None:
    """`QuantLinear.weight_error` (the manifest's weight error) for FP8 codes (the op), FP8 tiles, int8 codes and
    packed 4-bit codes (the dequantized weight): ||W_hat - W|| / ||W|| of the weight the layer computes with; 0 for a
    float layer."""
    linear = torch.nn.Linear(96, 40, bias=False)
    specs = [WEIGHT_SPECS[0], QuantSpec(bits=8, type="float", granularity="block", block_shape=(16, 16)),
             QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=4, granularity="group", group_size=32,
                                                                  symmetric=False)]
    for spec in specs:
        layer = QuantLinear.from_linear(linear, spec, None)
        w = linear.weight.detach()
        plain = float((layer.dequantized_weight(keep=False) - w).norm() / w.norm())
        assert layer.weight_error(w) == pytest.approx(plain, rel=1e-5) and 0 < plain < 0.2
    assert QuantLinear.from_linear(linear, None, None).weight_error(linear.weight) == 0.0


@needs_avx2
def test_the_same_model_with_the_op_and_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """FP8 per token with an FP8 KV cache per head, and FP8 per tensor static: quantized and evaluated with the op
    and with the primitives, the same weights, scales and logits."""
    calib = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(2))
    calls: list[str] = []
    real = e4m3_simulation.call_op
    for recipe in ({"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "kv_cache": "fp8_per_head"},
                   {"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static"}):
        calls.clear()
        monkeypatch.setattr(e4m3_simulation, "call_op", lambda *args: calls.append(args[1]) or real(*args))
        fused = llmquant.quantize(make_model("llama"), recipe, calib=calib, progress=False)
        fused_logits = logits(fused, calib[:2])
        assert calls  # (the op ran)
        monkeypatch.setattr(e4m3_simulation, "e4m3_op", lambda *_args: None)
        plain = llmquant.quantize(make_model("llama"), recipe, calib=calib, progress=False)
        state, expected = fused.state_dict(), plain.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
        assert torch.equal(fused_logits, logits(plain, calib[:2]))
        for ours, theirs in zip(fused.llmquant_manifest.layers, plain.llmquant_manifest.layers, strict=True):
            assert ours["weight_error"].keys() == theirs["weight_error"].keys()
            assert all(ours["weight_error"][k] == pytest.approx(v, rel=1e-5) for k, v in theirs["weight_error"].items())
        monkeypatch.undo()


def test_where_the_op_stands_aside_the_primitives_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Integer specs, other granularities and dtypes, the switch off and a scale being trained: no op (None), and the
    simulation's callers give `fake_quantize`'s values."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    fp8 = QuantSpec(bits=8, type="float", granularity="token", dynamic=True)
    int8 = QuantSpec(bits=8, granularity="token", dynamic=True)
    assert e4m3_op_refusal(x, int8) == "an integer spec (the op rounds to E4M3)"
    monkeypatch.setenv("LLMQUANT_GEMV", "1")
    assert e4m3_op_refusal(x.bfloat16(), fp8) == "torch.bfloat16 values (the op takes float32)"
    assert fused_fake_quantize(x.bfloat16(), fp8) is None
    tiles = QuantSpec(bits=8, type="float", granularity="block", block_shape=(16, 16))
    assert e4m3_op_refusal(x, tiles) == "granularity 'block'"
    for spec in (tiles, QuantSpec(bits=8, granularity="channel")):  # (tiles, integer codes: the primitives')
        scale, zero = observe_once(x, spec)
        codes = quantized_codes(x, spec, scale, zero)
        assert torch.equal(codes, quantize(x, scale, zero, spec))
        assert fused_code_error(codes, spec, scale, x) is None  # (`QuantLinear.weight_error` dequantizes them)
    trained = torch.tensor([[0.01]], requires_grad=True)
    static = QuantSpec(bits=8, type="float", granularity="tensor", dynamic=False)
    assert fused_fake_quantize(x, static, trained) is None  # (its gradient goes through the primitives)
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    assert e4m3_op_refusal(x, fp8) == "off (LLMQUANT_GEMV=0)" and fused_fake_quantize(x, fp8) is None
    assert torch.equal(shared_fake_quantize(x.clone(), fp8), fake_quantize(x, fp8))


def test_a_failed_build_is_kept_as_the_reason(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    def failing(**_kwargs: object) -> object:
        raise RuntimeError("Error building extension 'llmquant_e4m3_rounding'")

    from torch.utils import cpp_extension
    x = torch.randn(2, 16)
    fp8 = QuantSpec(bits=8, type="float", granularity="token", dynamic=True)
    monkeypatch.setattr(e4m3_simulation, "_op", None)
    monkeypatch.setattr(e4m3_simulation, "_build_error", None)
    monkeypatch.setattr(int8_gemv, "tool_refusal", lambda: None)
    monkeypatch.setattr(int8_gemv, "cpu_features", lambda: type("Features", (), {"avx2": True})())
    monkeypatch.setattr(cpp_extension, "load", failing)
    assert fused_fake_quantize(x, fp8) is None
    assert e4m3_op_refusal(x, fp8) == ("building e4m3_rounding.cpp failed (RuntimeError: Error building extension "
                                       "'llmquant_e4m3_rounding')")
    assert "the primitives' fake_quantize runs instead" in caplog.text

"""Numerics of layer 1: ranges, error bounds, observers, spec validation."""

from __future__ import annotations

import pytest
import torch

from llmquant.errors import LlmquantError
from llmquant.quant import Observer, QuantSpec, dequantize, fake_quantize, qparams_for, quantize
from llmquant.quant.primitives import to_blocks

SPECS = [
    QuantSpec(bits=8, granularity="tensor"),
    QuantSpec(bits=8, granularity="channel"),
    QuantSpec(bits=8, granularity="token", dynamic=True),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16),
    QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32),
    QuantSpec(bits=3, symmetric=False, granularity="channel"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_round_to_nearest_error_is_at_most_half_a_step(spec: QuantSpec) -> None:
    x = torch.randn(24, 64) * torch.linspace(0.1, 5.0, 64)
    scale, zero = qparams_for(x, spec)
    codes = quantize(x, scale, zero, spec)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    err = (dequantize(codes, scale, zero, spec) - x).abs()
    step = torch.ones_like(to_blocks(x, spec)) * scale  # the scale of each element's block
    assert (to_blocks(err, spec) <= step / 2 + 1e-6).all()
    assert torch.equal(fake_quantize(x, spec), dequantize(codes, scale, zero, spec))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_each_block_takes_at_most_2_to_the_bits_values(spec: QuantSpec) -> None:
    x = torch.randn(16, 64)
    blocks = to_blocks(fake_quantize(x, spec), spec)
    assert max(len(torch.unique(row)) for row in blocks) <= 2**spec.bits


def test_symmetric_int8_conventions() -> None:
    spec = QuantSpec(bits=8)
    x = torch.tensor([[-2.0, 0.5, 1.27]])
    scale, zero = qparams_for(x, spec)
    assert scale.item() == pytest.approx(2.0 / 127) and zero.item() == 0
    assert quantize(x, scale, zero, spec).tolist() == [[-127, 32, 81]]
    assert (spec.qmin, spec.qmax) == (-128, 127)


def test_asymmetric_keeps_zero_exact_and_uses_the_unsigned_range() -> None:
    spec = QuantSpec(bits=4, symmetric=False, granularity="channel")
    x = torch.tensor([[0.0, 1.0, 3.0, -0.7], [0.0, 5.0, 2.0, 4.0]])
    assert (spec.qmin, spec.qmax) == (0, 15)
    fq = fake_quantize(x, spec)
    assert fq[:, 0].abs().max() == 0.0


def test_static_scale_clamps_values_outside_the_calibrated_range() -> None:
    spec = QuantSpec(bits=8)
    observer = Observer(spec)
    observer.update(torch.tensor([[-1.0, 1.0]]))
    scale, zero = observer.qparams()
    out = fake_quantize(torch.tensor([[10.0, 0.5]]), spec, scale, zero)
    assert out[0, 0].item() == pytest.approx(1.0, abs=1e-6)


def test_observer_keeps_running_extremes_over_batches() -> None:
    spec = QuantSpec(bits=8)
    observer = Observer(spec)
    observer.update(torch.tensor([[-1.0, 2.0]]))
    observer.update(torch.tensor([[-3.0, 1.0]]))
    assert observer.qparams()[0].item() == pytest.approx(3.0 / 127)


def test_percentile_and_mse_observers_clip_outliers_and_mse_lowers_the_error() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 20000)
    x[0, :5] = 60.0  # a few huge outliers
    errors = {}
    for observer in ("minmax", "percentile", "mse"):
        spec = QuantSpec(bits=4, observer=observer, percentile=99.9)
        obs = Observer(spec)
        obs.update(x)
        scale, zero = obs.qparams()
        errors[observer] = float((fake_quantize(x, spec, scale, zero) - x).pow(2).mean())
        if observer != "minmax":
            assert scale.item() < 60.0 / spec.qmax
    assert errors["mse"] < errors["minmax"]
    assert errors["percentile"] < errors["minmax"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bits": 9}, "bits must be between 2 and 8"),
        ({"granularity": "group"}, "needs group_size"),
        ({"granularity": "channel", "group_size": 32}, "only allowed with granularity 'group'"),
        ({"dynamic": True, "observer": "mse"}, "observer must be 'minmax'"),
        ({"granularity": "row"}, "Input should be"),
    ],
)
def test_bad_specs_are_rejected_with_the_reason(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantSpec(**fields)


def test_group_size_that_does_not_divide_is_a_clear_error() -> None:
    spec = QuantSpec(bits=4, granularity="group", group_size=128)
    with pytest.raises(LlmquantError, match="does not divide the last dimension 576"):
        fake_quantize(torch.randn(4, 576), spec)

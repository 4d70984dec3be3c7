"""GPTQ: lower reconstruction error than round to nearest, values on the grid, static groups, stages."""

from __future__ import annotations

import pytest
import torch

import llmquant
from conftest import logits, make_model, relative_error
from llmquant.algorithms.gptq import GPTQ
from llmquant.nn.quant_linear import QuantLinear
from llmquant.quant import QuantSpec, fake_quantize, qparams_for
from llmquant.quant.primitives import to_blocks

SPECS = [
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32),
    QuantSpec(bits=4, symmetric=True, granularity="group", group_size=64),
    QuantSpec(bits=4, symmetric=True, granularity="channel"),
    QuantSpec(bits=3, symmetric=False, granularity="group", group_size=64),
    QuantSpec(bits=8, symmetric=True, granularity="channel"),
]


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=torch.Generator().manual_seed(99)) / features**0.5
    x = torch.randn(n, features, generator=generator) @ mixing
    x[:, :4] *= 10  # outlier channels
    return x


def _gptq(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, act_order: bool = False) -> tuple:
    state = GPTQ(weight)
    state.add_batch(x[: len(x) // 2])
    state.add_batch(x[len(x) // 2 :])
    return state.quantize(spec, block_size=32, act_order=act_order)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_calibration_and_held_out_inputs(spec: QuantSpec, act_order: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 128)
    calib, held_out = correlated_inputs(1024, 128, 1), correlated_inputs(1024, 128, 2)
    quantized, _ = _gptq(weight, calib, spec, act_order)
    rtn = fake_quantize(weight, spec)
    for x in (calib, held_out):
        reference = x @ weight.T
        assert (x @ quantized.T - reference).norm() < (x @ rtn.T - reference).norm()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_gptq_weights_lie_on_their_grid(spec: QuantSpec) -> None:
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    quantized, qparams = _gptq(weight, correlated_inputs(512, 128, 1), spec)
    layer = QuantLinear(128, 32, False, spec, None)
    layer.set_weight(quantized, qparams)
    assert torch.allclose(layer.dequantized_weight(), quantized, atol=1e-5)
    blocks = to_blocks(quantized, spec)
    assert max(len(torch.unique(row)) for row in blocks) <= 2**spec.bits


def test_activation_order_keeps_the_static_groups_of_the_original_weights() -> None:
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    weight = torch.randn(32, 128)
    _, (scale, zero) = _gptq(weight, correlated_inputs(512, 128, 1), spec, act_order=True)
    static_scale, static_zero = qparams_for(weight, spec)
    assert torch.equal(scale, static_scale) and torch.equal(zero, static_zero)


def test_hessian_of_two_batches_equals_the_hessian_of_their_concatenation() -> None:
    x = torch.randn(300, 16)
    two, one = GPTQ(torch.zeros(4, 16)), GPTQ(torch.zeros(4, 16))
    two.add_batch(x[:100])
    two.add_batch(x[100:])
    one.add_batch(x)
    assert torch.allclose(two.hessian, one.hessian) and torch.allclose(one.hessian, 2 * x.double().T @ x.double() / 300)


def test_dead_inputs_get_zero_weights_and_no_nan() -> None:
    x = correlated_inputs(256, 64, 1)
    x[:, 5] = 0.0
    quantized, _ = _gptq(torch.randn(8, 64), x, QuantSpec(bits=4, granularity="channel"))
    assert torch.isfinite(quantized).all() and (quantized[:, 5] == 0).all()


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("scheme", ["w_uint4_per_group_asym", "w_int4_per_group_sym"])
def test_gptq_in_the_pipeline_beats_round_to_nearest(
    family: str, scheme: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor
) -> None:
    errors = {}
    for algorithm in ("rtn", "gptq"):
        model = make_model(family)
        ref_calib, ref_eval = logits(model, calib_ids), logits(model, eval_ids)
        llmquant.quantize(model, {"scheme": scheme, "group_size": 32, "algorithm": algorithm}, calib=calib_ids,
                          progress=False)
        errors[algorithm] = (relative_error(ref_calib, logits(model, calib_ids)),
                             relative_error(ref_eval, logits(model, eval_ids)))
    assert errors["gptq"][0] < errors["rtn"][0] and errors["gptq"][1] < errors["rtn"][1]


def test_gptq_quantizes_the_layer_stage_by_stage(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    llmquant.quantize(model, {"scheme": "w_int8_per_channel_a_int8_per_tensor_static", "algorithm": "gptq"},
                      calib=calib_ids, progress=False)
    assert model.llmquant_manifest.layers[0]["gptq_stages"] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]

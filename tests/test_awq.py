"""AWQ: scale search and clipping beat round to nearest at the same bits and group size."""

from __future__ import annotations

import pytest
import torch

import llmquant
from conftest import logits, make_model, relative_error
from llmquant.algorithms.awq import awq_scales, search_clip
from llmquant.errors import LlmquantError
from llmquant.quant import QuantSpec, fake_quantize


def test_scales_are_normalised_by_the_geometric_mean_of_their_extremes() -> None:
    scales = awq_scales(torch.tensor([0.5, 2.0, 8.0]), 0.5)
    assert float(scales.max() * scales.min()) == pytest.approx(1.0)
    assert torch.equal(awq_scales(torch.tensor([0.5, 2.0]), 0.0), torch.ones(2, dtype=torch.float64))


def test_clipping_lowers_the_output_error_of_round_to_nearest() -> None:
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    weight[:, 3] *= 8  # an outlier column stretches every row's range
    tokens = torch.randn(256, 64)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    clipped = search_clip(weight, tokens, spec)
    reference = tokens @ weight.T
    rtn = (tokens @ fake_quantize(weight, spec).T - reference).pow(2).sum()
    awq = (tokens @ fake_quantize(clipped, spec).T - reference).pow(2).sum()
    assert awq < rtn
    assert (clipped.abs() <= weight.abs() + 1e-6).all()


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("scheme", ["w_uint4_per_group_asym", "w_int4_per_group_sym", "w_uint3_per_group_asym"])
def test_awq_beats_round_to_nearest_on_calibration_and_held_out_inputs(
    family: str, scheme: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor
) -> None:
    errors = {}
    for algorithm in ("rtn", "awq"):
        model = make_model(family)
        ref_calib, ref_eval = logits(model, calib_ids), logits(model, eval_ids)
        recipe = {"scheme": scheme, "group_size": 32, "algorithm": algorithm}
        llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
        errors[algorithm] = (
            relative_error(ref_calib, logits(model, calib_ids)),
            relative_error(ref_eval, logits(model, eval_ids)),
        )
        if algorithm == "awq":
            layer = model.llmquant_manifest.layers[0]
            assert layer["equivalence_error"] < 1e-4  # the scaling alone keeps the function
            assert all(0.0 <= row["awq_ratio"] < 1.0 for row in layer["smoothing"])
    assert errors["awq"][0] < errors["rtn"][0]
    assert errors["awq"][1] < errors["rtn"][1]


def test_awq_and_smoothquant_together_are_refused(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    recipe = {"scheme": "w_int4_per_group_sym", "algorithm": "awq", "pre_opts": [{"name": "smoothquant"}]}
    with pytest.raises(LlmquantError, match="choose one of them"):
        llmquant.quantize(model, recipe, calib=calib_ids, progress=False)

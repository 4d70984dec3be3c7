"""W4A4 with inputs per token in groups (`w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic`): each group of
``group_size`` consecutive inputs of a token is quantized on its own range (a scale and a zero point per group), so
a group errs no more than the whole token's range would make it, much less where a token's groups differ in size;
the recipe's ``group_size`` sets the groups (-1: per token), falls back to one that divides a Linear's inputs, and
the checkpoint goes through save and load to the same logits on both runtimes."""

from __future__ import annotations

import logging

import pytest
import torch

import llmquant
from conftest import logits, make_model
from llmquant.model.model_map import detect_model_map
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.quant.primitives import fake_quantize
from llmquant.quant.scheme import scheme_from_name
from llmquant.recipe import Recipe

W4A4_GROUPS = "w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic"
W4A4_TOKENS = "w_int4_per_channel_sym_a_uint4_per_token_asym_dynamic"


def test_each_group_of_a_token_takes_its_own_range() -> None:
    spec = scheme_from_name(W4A4_GROUPS, 16).input_activations
    token_spec = scheme_from_name(W4A4_TOKENS).input_activations
    assert (spec.granularity, spec.group_size, spec.bits, spec.symmetric, spec.dynamic) == ("group", 16, 4, False, True)
    x = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(0))
    expected = torch.cat([fake_quantize(x[..., i:i + 16], token_spec) for i in range(0, 64, 16)], dim=-1)
    assert torch.equal(fake_quantize(x, spec), expected)
    assert scheme_from_name(W4A4_GROUPS).input_activations.group_size == 64  # the default group size
    assert scheme_from_name(W4A4_GROUPS, -1).input_activations == token_spec  # -1: per token


def test_groups_err_less_than_whole_tokens() -> None:
    """Gaussian tokens: a group's range is narrower than its token's. Tokens whose groups differ in size (one group
    8x the others): the smaller groups no longer take the large one's step, their error falls by its squared ratio."""
    spec = scheme_from_name(W4A4_GROUPS, 16).input_activations
    token_spec = scheme_from_name(W4A4_TOKENS).input_activations
    generator = torch.Generator().manual_seed(1)
    gaussian = torch.randn(256, 128, generator=generator)
    sizes = torch.tensor([1.0, 8.0, 0.5, 2.0, 1.0, 0.25, 4.0, 1.0]).repeat_interleave(16)
    uneven = gaussian * sizes

    def error(x: torch.Tensor, quantizer: object, channels: torch.Tensor | None = None) -> float:
        squared = (fake_quantize(x, quantizer) - x).pow(2)
        return float(squared.sum() if channels is None else squared[:, channels].sum())

    assert error(gaussian, spec) < 0.8 * error(gaussian, token_spec)
    assert error(uneven, spec) < 0.25 * error(uneven, token_spec)
    small = sizes <= 1.0
    assert error(uneven, spec, small) < 0.05 * error(uneven, token_spec, small)


def test_a_group_size_that_does_not_divide_the_inputs_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model("llama")
    hidden = model.config.hidden_size
    recipe = Recipe.build(scheme=W4A4_GROUPS, group_size=hidden * 3 // 4)  # 48 of 64: 32 divides them
    with caplog.at_level(logging.WARNING):
        plan = recipe.resolve(model, detect_model_map(model))
    spec = plan.linears["model.layers.0.self_attn.q_proj"].input_activations
    assert spec.granularity == "group" and hidden % spec.group_size == 0 and spec.group_size == hidden // 2
    assert "does not divide" in caplog.text


def test_a_w4a4kv4_recipe_with_input_groups_saves_and_loads_to_the_same_logits(calib_ids: torch.Tensor,
                                                                             eval_ids: torch.Tensor,
                                                                             tmp_path) -> None:
    recipe = {"scheme": W4A4_GROUPS, "group_size": 16, "kv_cache": "int4_per_token_asym", "algorithm": "gptq",
              "gptq": {"quantized_inputs": True}, "activation_clip_grid": [1.0, 0.9, 0.8],
              "pre_opts": [{"name": "quarot", "rotations": ["R2", "R3", "R4"]}]}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.input_spec is not None]
    assert layers and all(m.input_spec.granularity == "group" and m.input_spec.group_size == 16 for m in layers)
    assert not any(m.supports_int8 for m in layers)  # no integer kernel: the simulation on every runtime
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")  # the int8 runtime
    spec = loaded.get_submodule("model.layers.0.mlp.down_proj").input_spec
    assert (spec.granularity, spec.group_size, spec.clip_grid) == ("group", 16, (1.0, 0.9, 0.8))
    set_runtime(model, "fake")
    expected = logits(model, eval_ids)
    assert torch.isfinite(expected).all()
    assert torch.equal(expected, logits(loaded, eval_ids))
    tokens = llmquant.quantize(make_model("llama"), {**recipe, "scheme": W4A4_TOKENS}, calib=calib_ids,
                               progress=False)
    assert not torch.equal(logits(tokens, eval_ids), expected)  # (the groups are not the tokens)

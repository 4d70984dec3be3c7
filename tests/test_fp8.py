"""FP8 (E4M3) codes: `QuantSpec` ``type="float"``. Rounding to the nearest E4M3 value, its error bound, the
observers and GPTQ on that grid, float8 storage, checkpoints (compressed-tensors float-quantized) that load back
with identical logits, the FP8 KV cache, and the one-line refusals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

import llmquant
from conftest import logits, make_model, relative_error
from llmquant.algorithms.gptq import gptq_quantize
from llmquant.errors import LlmquantError
from llmquant.export.targets import check_recipe
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.quant import QuantSpec, fake_quantize, quantize
from llmquant.quant.observers import observe_once
from llmquant.quant.primitives import codes_to_float, grid_steps, round_to_codes, round_to_grid
from llmquant.quant.scheme import FP8_SCHEMES, scheme_from_name, scheme_names
from llmquant.recipe import Recipe

FP8 = QuantSpec(bits=8, type="float", granularity="channel")
E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
FINITE = E4M3_VALUES[E4M3_VALUES.isfinite()].unique()  # 253 values: +-0 once, NaNs left out


def test_the_grid_is_the_e4m3_values_and_rounding_is_to_the_nearest() -> None:
    assert float(FINITE.max()) == 448.0 and float(FINITE.min()) == -448.0 and len(FINITE) == 253
    assert torch.equal(round_to_grid(FINITE, FP8), FINITE)  # every code is its own rounding
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 100.0
    rounded = round_to_grid(x, FP8)
    nearest = (x[:, None] - FINITE[None, :]).abs().min(dim=1).values
    assert torch.equal((x - rounded).abs(), nearest)  # no value closer on the grid
    assert torch.equal(round_to_grid(torch.tensor([1e4, -1e4]), FP8), torch.tensor([448.0, -448.0]))  # saturates


def test_float8_codes_read_by_table_are_torchs_conversion() -> None:
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    assert torch.equal(codes_to_float(every).nan_to_num(7.0), every.float().nan_to_num(7.0))
    codes = (torch.randn(48, 40) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    strided = codes.t()[::3]  # not contiguous
    assert torch.equal(codes_to_float(strided), strided.float())
    assert codes_to_float(strided).shape == strided.shape and codes_to_float(strided).dtype == torch.float32
    ints = torch.randint(-128, 128, (5, 7), dtype=torch.int8)
    assert torch.equal(codes_to_float(ints), ints.float())


def test_a_grid_step_away_from_zero_is_the_next_e4m3_value() -> None:
    """`grid_steps`: q + d g rounds to q for |d| < 1/2 (towards zero from a binade's lowest value, for |d| < 1/4)
    and to the next E4M3 value away from zero for d in (1/2, 1] (signs mirrored); on an integer grid g is 1."""
    positive = FINITE[FINITE >= 0]
    steps = grid_steps(positive, FP8)
    assert torch.equal(grid_steps(-positive, FP8), steps)
    for codes, sign in ((positive, 1.0), (-positive, -1.0)):
        assert torch.equal(round_to_codes(codes + sign * 0.49 * steps, FP8), codes)
        assert torch.equal(round_to_codes(codes - sign * 0.24 * steps, FP8), codes)
        assert torch.equal(round_to_codes(codes + sign * 0.51 * steps, FP8)[:-1], sign * positive[1:])
        assert torch.equal(round_to_codes(codes + sign * steps, FP8)[:-1], sign * positive[1:])
    assert float(round_to_codes(torch.tensor([448.0 + 32.0]), FP8)) == 448.0  # clamped to the range
    assert float(grid_steps(torch.tensor([0.0]), FP8)) == 2.0**-9  # the subnormals' step
    int4 = QuantSpec(bits=4, granularity="channel")
    codes = torch.arange(-8.0, 8.0)
    assert torch.equal(grid_steps(codes, int4), torch.ones(16))
    assert torch.equal(round_to_codes(codes + 0.6, int4), (codes + 1).clamp(max=7))


def test_fake_quantize_error_is_within_half_a_step_of_three_mantissa_bits() -> None:
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 1, 64)[:, None]
    scale, _ = observe_once(weight, FP8)
    assert torch.allclose(scale, weight.abs().amax(dim=1, keepdim=True) / 448.0)
    x_hat = fake_quantize(weight, FP8, scale, torch.zeros_like(scale))
    normal = weight.abs() / scale >= 2.0**-6  # E4M3's normal range: relative error <= 2^-4
    assert ((x_hat - weight).abs() <= 2.0**-4 * weight.abs() + 1e-12)[normal].all()
    assert ((x_hat - weight).abs() <= 2.0**-10 * scale)[~normal].all()  # subnormals: half of the step 2^-9


def test_the_mse_observer_finds_no_worse_a_range_than_min_max() -> None:
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    weight[:, 0] *= 30.0
    errors = {}
    for observer in ("minmax", "mse"):
        spec = FP8.model_copy(update={"observer": observer})
        errors[observer] = float((fake_quantize(weight, spec, *observe_once(weight, spec)) - weight).norm())
    assert errors["mse"] <= errors["minmax"]


def test_gptq_on_the_fp8_grid_beats_round_to_nearest() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 128, generator=generator)
    x = torch.randn(2048, 128, generator=generator) @ (torch.randn(128, 128, generator=generator) / 128**0.5)
    result = gptq_quantize(weight, x.T @ x, FP8, block_size=32)
    assert torch.equal(result.codes.float(), round_to_grid(result.codes.float(), FP8))  # codes on the grid
    assert result.codes.dtype == torch.float8_e4m3fn
    rtn = fake_quantize(weight, FP8)
    gptq_error = float((x @ result.weight.T - x @ weight.T).norm())
    assert gptq_error < 0.8 * float((x @ rtn.T - x @ weight.T).norm())  # measured about 0.6


@pytest.mark.parametrize("scheme", list(FP8_SCHEMES))
def test_fp8_schemes_store_float8_codes_and_round_trip(scheme: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                                                     tmp_path: Path) -> None:
    model = make_model("llama")
    reference = logits(model, eval_ids)
    recipe = {"scheme": scheme, "kv_cache": "fp8_per_tensor"}
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    linear = model.model.layers[0].mlp.down_proj
    assert isinstance(linear, QuantLinear) and linear.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(linear.dequantized_weight(), linear.weight.float() * linear.weight_scale.reshape(-1, 1))
    assert 1e-3 < relative_error(reference, logits(model, eval_ids)) < 0.1
    llmquant.save(model, None, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["format"] == group["format"] == "float-quantized" and group["weights"]["type"] == "float"
    assert config["kv_cache_scheme"]["type"] == "float" and config["kv_cache_scheme"]["num_bits"] == 8
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as stored:
        assert stored.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
        assert "model.layers.0.self_attn.k_scale" in set(stored.keys())
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")
    set_runtime(model, "int8")
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))


def test_fp8_combines_with_smoothquant_quarot_and_gptq(calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    reference = logits(make_model("llama"), eval_ids)
    for extra in ({"pre_opts": [{"name": "smoothquant", "alpha": 0.5}]},
                  {"pre_opts": [{"name": "quarot"}], "algorithm": "gptq"}):
        model = llmquant.quantize(make_model("llama"), {"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static", **extra},
                                  calib=calib_ids, progress=False)
        assert relative_error(reference, logits(model, eval_ids)) < 0.1, extra


def test_the_fp8_kv_cache_stores_float8_on_the_int8_runtime(calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    model = llmquant.quantize(make_model("llama"), {"scheme": "w_fp8_per_channel", "kv_cache": "fp8_per_tensor"},
                              calib=calib_ids, progress=False)
    simulated = logits(model, eval_ids)
    set_runtime(model, "int8")
    with torch.no_grad():
        out = model(eval_ids, use_cache=True)
    assert out.past_key_values.layers[0].keys.dtype == torch.float8_e4m3fn
    assert torch.allclose(out.logits, simulated, atol=1e-5, rtol=1e-5)


def test_schemes_are_named_and_bad_specs_refused_in_one_line() -> None:
    assert set(FP8_SCHEMES) <= set(scheme_names())
    scheme = scheme_from_name("w_fp8_per_channel_a_fp8_per_token_dynamic")
    assert scheme.weights.describe() == "fp8-e4m3-per-channel-static"
    assert scheme.input_activations.describe() == "fp8-e4m3-per-token-dynamic"
    with pytest.raises(ValidationError, match="float codes are 8-bit E4M3 and symmetric, got 4 bits"):
        QuantSpec(bits=4, type="float")
    with pytest.raises(ValidationError, match="asymmetric"):
        QuantSpec(type="float", symmetric=False)
    with pytest.raises(LlmquantError, match=r"unknown kv cache 'fp8'; allowed: .*fp8_per_tensor"):
        scheme_from_name("w_fp8_per_channel", kv_cache="fp8")
    assert quantize(torch.ones(2, 2), torch.ones(2, 1), torch.zeros(2, 1), FP8).dtype == torch.float8_e4m3fn


def test_vllm_target_takes_the_fp8_kv_cache_and_says_which_fp8_linears_are_unverified() -> None:
    assert check_recipe("vllm", Recipe.build(scheme="w_fp8_per_channel_a_fp8_per_token_dynamic",
                                             kv_cache="fp8_per_tensor")) == []  # served (BENCHMARKS.md)
    findings = check_recipe("vllm", Recipe.build(scheme="w_fp8_per_tensor_a_fp8_per_tensor_static"))
    assert not any(f.refuse for f in findings)
    assert any("CPU build has no kernel for it (its GPU builds do)" in f.message
               for f in findings)
    refused = check_recipe("vllm", Recipe.build(scheme="w_int8_per_channel_a_int8_per_token_dynamic",
                                                kv_cache="int8_per_tensor"))
    assert refused and refused[0].refuse


def test_per_head_blocks_are_one_head_each_and_undo_exactly() -> None:
    from llmquant.quant.primitives import from_blocks, to_blocks

    spec = QuantSpec(bits=8, type="float", granularity="attn_head")
    states = torch.randn(2, 3, 5, 4)
    blocks = to_blocks(states, spec)
    assert blocks.shape == (3, 2 * 5 * 4)
    assert torch.equal(blocks[1], states[:, 1].reshape(-1))  # row h holds every value of head h
    assert torch.equal(from_blocks(blocks, states.shape, spec), states)
    with pytest.raises(LlmquantError, match=r"'attn_head' quantizes keys and values .* not a tensor of shape \[4, 6\]"):
        fake_quantize(torch.randn(4, 6), spec)


def test_the_fp8_per_head_kv_cache_has_a_scale_per_head(calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                                                        tmp_path: Path) -> None:
    """Static per-head scales are each head's absmax / 448 over the calibration (their maximum is the per-tensor
    scale), quantize each head on its own, load back with identical logits and are written as vLLM reads them."""
    from llmquant.nn.kv_cache import KVCacheQuantizer

    recipe = {"scheme": "w_fp8_per_channel", "kv_cache": "fp8_per_head"}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    per_tensor = llmquant.quantize(make_model("llama"), {**recipe, "kv_cache": "fp8_per_tensor"}, calib=calib_ids,
                                   progress=False)
    heads = model.config.num_key_value_heads
    by_head, whole = (next(m for m in net.modules() if isinstance(m, KVCacheQuantizer)) for net in (model, per_tensor))
    assert by_head.k_scale.shape == by_head.v_scale.shape == (heads,)
    assert torch.equal(by_head.k_scale.max().reshape(1), whole.k_scale)  # the first layer: the same keys calibrate
    assert by_head.k_scale.min() < by_head.k_scale.max()
    keys = torch.randn(1, heads, 6, 16) * torch.tensor([1.0, 0.01]).reshape(1, heads, 1, 1)
    quantized, _ = by_head(keys, keys)
    small_head_error = (quantized - keys)[:, 1].abs().max()
    assert small_head_error <= 2.0**-4 * keys[:, 1].abs().max()  # relative to its own head's range (3 mantissa bits)
    simulated = logits(model, eval_ids)
    llmquant.save(model, None, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"]["strategy"] == "attn_head" and config["kv_cache_scheme"]["type"] == "float"
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as stored:
        assert stored.get_tensor("model.layers.0.self_attn.k_scale").shape == (heads,)
    for runtime in ("fake", "int8"):  # (the int8 runtime keeps per-head caches simulated)
        assert torch.equal(logits(llmquant.load(tmp_path / "ckpt", runtime=runtime)[0], eval_ids), simulated)
    assert not any(f.refuse for f in check_recipe("vllm", Recipe.build(scheme="w_fp8_per_channel",
                                                                       kv_cache="fp8_per_head")))


BLOCK = QuantSpec(bits=8, type="float", granularity="block", block_shape=(128, 128))


def test_block_tiles_are_128_square_with_partial_edges_and_undo_exactly() -> None:
    from llmquant.quant.primitives import from_blocks, to_blocks

    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(4)) * torch.logspace(-2, 1, 300)[:, None]
    blocks = to_blocks(weight, BLOCK)
    assert blocks.shape == (3 * 2, 128 * 128)  # tiles down x across, row-major
    tile = blocks[3].reshape(128, 128)  # tile (1, 1): 72 real columns
    assert torch.equal(tile[:, :72], weight[128:256, 128:]) and not tile[:, 72:].any()  # zero padding
    assert torch.equal(from_blocks(blocks, weight.shape, BLOCK), weight)
    scale, zero = observe_once(weight, BLOCK)
    absmax = torch.tensor([[float(weight[r:r + 128, c:c + 128].abs().max()) for c in (0, 128)] for r in (0, 128, 256)])
    assert torch.allclose(scale.reshape(3, 2), absmax / 448.0)  # a partial tile's range is its real values'
    x_hat = fake_quantize(weight, BLOCK, scale, zero)
    own_scale = from_blocks(scale.expand(-1, 128 * 128), weight.shape, BLOCK)  # each value's tile's scale
    normal = weight.abs() / own_scale >= 2.0**-6
    assert ((x_hat - weight).abs() <= 2.0**-4 * weight.abs() + 1e-12)[normal].all()
    assert ((x_hat - weight).abs() <= 2.0**-10 * own_scale)[~normal].all()
    assert BLOCK.describe() == "fp8-e4m3-per-block128x128-static"


def test_bad_blocks_are_refused_in_one_line() -> None:
    with pytest.raises(LlmquantError, match=r"'block' tiles a 2-D weight \[out, in\], not a tensor of shape \[2, 3"):
        fake_quantize(torch.randn(2, 3, 4), BLOCK)
    with pytest.raises(ValidationError, match="granularity 'block' needs block_shape"):
        QuantSpec(type="float", granularity="block")
    with pytest.raises(ValidationError, match="block_shape is only allowed with granularity 'block', not 'channel'"):
        QuantSpec(type="float", granularity="channel", block_shape=(128, 128))
    with pytest.raises(ValidationError, match="dynamic must be False"):
        QuantSpec(type="float", granularity="block", block_shape=(128, 128), dynamic=True)
    with pytest.raises(LlmquantError, match="act_order with block granularity needs static_groups=True"):
        gptq_quantize(torch.randn(8, 8), torch.eye(8), BLOCK, act_order=True)


def test_gptq_in_fp8_blocks_beats_round_to_nearest_with_one_scale_per_tile() -> None:
    """Sweep blocks of 64 columns across tiles of 128 (a tile's scale is taken when the sweep reaches its first
    column, from the weights corrected so far), and with static tiles under activation order."""
    from llmquant.quant import dequantize

    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(200, 300, generator=generator)
    x = torch.randn(4096, 300, generator=generator) @ (torch.randn(300, 300, generator=generator) / 300**0.5)
    rtn_error = float((x @ fake_quantize(weight, BLOCK, *observe_once(weight, BLOCK)).T - x @ weight.T).norm())
    for options in ({}, {"act_order": True, "static_groups": True}):
        result = gptq_quantize(weight, x.T @ x, BLOCK, block_size=64, **options)
        assert result.scale.shape == (2 * 3, 1) and result.codes.dtype == torch.float8_e4m3fn
        assert torch.equal(result.weight, dequantize(result.codes, result.scale, result.zero, BLOCK))
        if options:  # static tiles: the round-to-nearest scales
            assert torch.equal(result.scale, observe_once(weight, BLOCK)[0])
        error = float((x @ result.weight.T - x @ weight.T).norm())
        assert error < 0.8 * rtn_error, options  # measured 0.71 and 0.69


def test_the_fp8_block_scheme_on_a_model_of_several_tiles(calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                                                          tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Hidden size 192 and 320 intermediates: 2 x 2 and 3 x 2 tiles (partial ones), inputs in groups of 64 where 128
    does not divide them (as for weight groups, with a warning); GPTQ; identical logits after a save and load;
    transformers' compressed-tensors integration computes the same function."""
    import logging

    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=192, intermediate_size=320, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    reference = logits(model, eval_ids)
    with caplog.at_level(logging.WARNING):
        llmquant.quantize(model, {"scheme": "w_fp8_block128_a_fp8_group128_dynamic", "algorithm": "gptq"},
                          calib=calib_ids, progress=False)
    assert "group size 128 does not divide the 192 inputs" in caplog.text
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight_scale.shape == (2, 2) and layer.mlp.down_proj.weight_scale.shape == (2, 3)
    assert layer.mlp.up_proj.weight_scale.shape == (3, 2)
    assert layer.mlp.down_proj.input_spec.group_size == 64 and layer.self_attn.q_proj.input_spec.group_size == 64
    assert 1e-4 < relative_error(reference, logits(model, eval_ids)) < 0.05
    llmquant.save(model, None, tmp_path / "ckpt")
    stored = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["config_groups"]
    weights = stored["group_0"]["weights"]
    assert weights["strategy"] == "block" and weights["block_structure"] == [128, 128] and weights["type"] == "float"
    assert stored["group_0"]["input_activations"]["strategy"] == "group"
    simulated = logits(model, eval_ids)
    assert torch.equal(logits(llmquant.load(tmp_path / "ckpt")[0], eval_ids), simulated)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert relative_error(simulated, logits(loaded, eval_ids)) < 1e-5


def test_a_static_kv_cache_takes_the_recipes_kv_cache_observer(calib_ids: torch.Tensor) -> None:
    """``kv_cache_observer: mse`` picks each scale by the least squared error: at most the min-max scale (whose
    range is one of its candidates, ratio 1)."""
    from llmquant.nn.kv_cache import KVCacheQuantizer

    scales = {}
    for observer in ("minmax", "mse"):
        recipe = Recipe.build(scheme="w_fp8_per_channel", kv_cache="fp8_per_head", kv_cache_observer=observer)
        assert recipe.scheme_named(recipe.scheme).kv_cache.observer == observer
        model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
        quantizer = next(m for m in model.modules() if isinstance(m, KVCacheQuantizer))
        scales[observer] = torch.cat([quantizer.k_scale, quantizer.v_scale])
    assert (scales["mse"] <= scales["minmax"]).all() and (scales["mse"] < scales["minmax"]).any()
    dynamic = Recipe.build(scheme="w_int8_per_channel", kv_cache="int8_per_token", kv_cache_observer="mse")
    assert dynamic.scheme_named(dynamic.scheme).kv_cache.observer == "minmax"  # a dynamic range has no observer


def test_vllm_refuses_tiles_the_models_sizes_do_not_fill() -> None:
    """vLLM 0.32 on the default model: "Weight output_partition_size = 576 is not divisible by weight quantization
    block_n = 128" (BENCHMARKS.md); the check names the first such Linear before calibration."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmquant.export.targets import check_target_model

    recipe = Recipe.build(scheme="w_fp8_block128_a_fp8_group128_dynamic")
    with pytest.raises(LlmquantError, match=r"--target vllm: vLLM runs 128 x 128 FP8 tiles only on Linears whose "
                                            r"outputs are a multiple of 128 and inputs of 128; "
                                            r"model.layers.0.self_attn.q_proj is 64 -> 64"):
        check_target_model("vllm", make_model("llama"), recipe)
    filled = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128))  # k/v: 128 rows each
    check_target_model("vllm", filled, recipe)
    check_target_model("fake", make_model("llama"), recipe)
    [warning] = check_recipe("vllm", recipe)
    assert "multiple of them (checked on the model before calibration)" in warning.message


def test_awq_refuses_tiled_weights_before_any_work() -> None:
    recipe = Recipe.build(scheme="w_fp8_block128_a_fp8_group128_dynamic", algorithm="awq")
    with pytest.raises(LlmquantError, match="AWQ searches clipping ranges per row and input group, not per tile: "
                                            "w_fp8_block128_a_fp8_group128_dynamic takes rtn or gptq"):
        recipe.layer_steps()


# --- the FP8 kernel runtime: torch._scaled_mm ---------------------------------------------------------------
def test_scaled_mm_computes_the_scaled_product_of_the_codes() -> None:
    """`fp8_linear` on the CPU operator against float64 products of the same codes and scales, every scale shape;
    its input codes are the simulation's (`round_to_grid` of x / s)."""
    from llmquant.nn.fp8_linear import fp8_input_codes, fp8_linear
    from llmquant.quant import dequantize

    generator = torch.Generator().manual_seed(6)
    rows = torch.randn(5, 64, generator=generator) * torch.logspace(-1, 1, 64)
    weight = torch.randn(48, 64, generator=generator)
    bias = torch.randn(48, generator=generator)
    for weight_grain in ("channel", "tensor"):
        spec = FP8.model_copy(update={"granularity": weight_grain})
        scale, zero = observe_once(weight, spec)
        codes = quantize(weight, scale, zero, spec)
        for dynamic, static in (("token", None), ("tensor", None), (None, torch.tensor([0.02]))):
            grain = QuantSpec(type="float", granularity=dynamic or "tensor", dynamic=dynamic is not None)
            x_codes, x_scale = fp8_input_codes(rows, grain, static)
            assert torch.equal(x_codes.float(), round_to_grid(rows / x_scale, grain))
            y = fp8_linear(rows, codes, scale.reshape(1, -1), bias, grain, static)
            reference = (x_codes.double() * x_scale.double()) @ dequantize(codes, scale, zero, spec).double().T
            assert torch.allclose(y.double(), reference + bias.double(), rtol=1e-5, atol=1e-5), (weight_grain, dynamic)


@pytest.mark.parametrize("scheme", ["w_fp8_per_channel_a_fp8_per_token_dynamic",
                                    "w_fp8_per_tensor_a_fp8_per_tensor_static"])
def test_the_fp8_kernel_runtime_computes_what_the_simulation_computes(scheme: str, calib_ids: torch.Tensor,
                                                                      eval_ids: torch.Tensor) -> None:
    """On the CPU the kernel is slower than the simulation, so `set_runtime` keeps the simulation there and says
    why; run on the operator anyway, every Linear gives the simulation's logits to float32 rounding."""
    model = llmquant.quantize(make_model("llama"), scheme, calib=calib_ids, progress=False)
    simulated = logits(model, eval_ids)
    set_runtime(model, "int8")
    linears = [m for m in model.modules() if isinstance(m, QuantLinear) and m.weight_spec is not None]
    assert all(m.runtime == "fake" and "run on CUDA" in m.int8_fallback for m in linears)
    for module in linears:  # the CPU operator, as CUDA would run it
        assert module.supports_fp8
        module.runtime = "int8"
    assert relative_error(simulated, logits(model, eval_ids)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 GEMMs need a CUDA GPU of compute capability 8.9+")
def test_the_fp8_kernel_on_the_gpu_agrees_with_the_simulation(calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    """Rowwise scales write bfloat16 on CUDA: agreement to bfloat16 rounding of each Linear's output."""
    for scheme in ("w_fp8_per_channel_a_fp8_per_token_dynamic", "w_fp8_per_tensor_a_fp8_per_tensor_static"):
        model = llmquant.quantize(make_model("llama"), scheme, calib=calib_ids, progress=False).to("cuda")
        simulated = logits(model, eval_ids)
        set_runtime(model, "int8")
        assert all(m.runtime == "int8" for m in model.modules() if isinstance(m, QuantLinear) and m.supports_fp8)
        assert relative_error(simulated, logits(model, eval_ids)) < 2e-2, scheme


def test_the_fp8_block_scheme_keeps_the_simulation_on_the_cpu_and_says_why(calib_ids: torch.Tensor) -> None:
    """Blockwise scaling runs on CUDA alone: `set_runtime` keeps the simulation and names the reason per Linear."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = llmquant.quantize(AutoModelForCausalLM.from_config(config).eval(),
                              "w_fp8_block128_a_fp8_group128_dynamic", calib=calib_ids, progress=False)
    set_runtime(model, "int8")
    linears = [m for m in model.modules() if isinstance(m, QuantLinear) and m.weight_spec is not None]
    assert linears and all(m.supports_fp8 and m.runtime == "fake" and "run on CUDA" in m.int8_fallback
                           for m in linears)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="blockwise FP8 GEMMs need a Hopper GPU (CUDA compute capability 9.0)")
@pytest.mark.parametrize("rows", [1, 3, 300])
def test_the_fp8_block_kernel_on_a_hopper_gpu_computes_the_simulation(rows: int) -> None:
    """``torch._scaled_mm`` with blockwise scales against fq(x) @ dequant(W)^T: agreement to the kernel's bfloat16
    output (about 2^-9); inputs whose columns span two decades, so that a scale read from the wrong group or tile
    would be far off; a tile's scale changed changes only its 128 outputs."""
    from llmquant.nn.fp8_linear import FP8_BLOCK

    torch.manual_seed(rows)
    scheme = scheme_from_name("w_fp8_block128_a_fp8_group128_dynamic")
    linear = torch.nn.Linear(512, 384, device="cuda")
    layer = QuantLinear.from_linear(linear, scheme.weights, scheme.input_activations)
    assert layer.supports_fp8 and layer.int8_refusal() is None
    x = torch.randn(rows, 512, device="cuda") * torch.logspace(-1, 1, 512, device="cuda")
    with torch.no_grad():
        layer.runtime = "fake"
        simulated = layer(x)
        layer.runtime = "int8"
        kernel = layer(x)
        assert relative_error(simulated, kernel) < 8e-3
        layer.weight_scale[1, 2] *= 2  # the tile of outputs 128..255, inputs 256..383
        changed = (layer(x) - kernel).abs().amax(dim=0) > 0
    tile = slice(FP8_BLOCK, 2 * FP8_BLOCK)
    assert changed[tile].any() and not changed[:FP8_BLOCK].any() and not changed[2 * FP8_BLOCK:].any()


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_fp8_input_codes_on_the_gpu_are_the_primitives_bits(dtype: torch.dtype,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One Triton kernel (`llmquant.nn.fp8_input_kernel`) against the primitives' fifteen operations: the same codes
    and scales bit for bit, per token and per token in groups of 128, rows of up to 14 reads of its 1024 columns, an
    all-zero row (the smallest scale), values spanning five decades."""
    from llmquant.nn.fp8_linear import fp8_input_codes, fused_codes_available

    generator = torch.Generator("cuda").manual_seed(3)
    for rows, columns, group in ((1, 512, None), (7, 4096, None), (300, 14336, None), (5, 512, 128),
                                 (300, 4096, 128)):
        x = torch.randn(rows, columns, generator=generator, device="cuda") * torch.logspace(-3, 2, columns,
                                                                                           device="cuda")
        x = x.to(dtype)
        x[0] = 0
        spec = QuantSpec(type="float", granularity="group" if group else "token", group_size=group, dynamic=True)
        assert fused_codes_available(x, spec)
        codes, scale = fp8_input_codes(x, spec, None)
        monkeypatch.setenv("LLMQUANT_FP8_CODES", "torch")
        assert not fused_codes_available(x, spec)
        reference_codes, reference_scale = fp8_input_codes(x, spec, None)
        monkeypatch.delenv("LLMQUANT_FP8_CODES")
        assert torch.equal(codes.view(torch.uint8), reference_codes.view(torch.uint8)), (rows, columns, group)
        assert torch.equal(scale, reference_scale.reshape(rows, -1)), (rows, columns, group)

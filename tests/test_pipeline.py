"""The engine on tiny random Llama, Qwen2 and OPT models: every W8A8 scheme, KV cache, manifest."""

from __future__ import annotations

import pytest
import torch

import llmquant
from conftest import logits, make_model, relative_error
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.quant_linear import QuantLinear
from llmquant.quant.scheme import W8A8_SCHEMES, WEIGHT_ONLY_SCHEMES


@pytest.mark.parametrize("scheme", W8A8_SCHEMES)
def test_every_w8a8_scheme_quantizes_every_decoder_linear_and_stays_close(
    family: str, scheme: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor
) -> None:
    model = make_model(family)
    reference = logits(model, eval_ids)
    llmquant.quantize(model, scheme, calib=calib_ids, progress=False)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    manifest = model.llmquant_manifest
    assert len(quantized) == len(manifest.model_map["linears"]) * 2  # two decoder layers
    assert "lm_head" not in quantized  # excluded by default, as in the seeds
    error = relative_error(reference, logits(model, eval_ids))
    assert 0 < error < 0.1
    assert len(manifest.layers) == 2 and all(0 < row["output_error"] < 0.2 for row in manifest.layers)
    has_kv = "kv_cache" in scheme
    assert any(isinstance(m, KVCacheQuantizer) for m in model.modules()) == has_kv


def test_static_scales_are_calibrated_and_dynamic_ones_follow_the_input(calib_ids: torch.Tensor) -> None:
    static = make_model("llama")
    llmquant.quantize(static, "w_int8_per_channel_a_int8_per_tensor_static", calib=calib_ids, progress=False)
    q = static.model.layers[0].self_attn.q_proj
    assert q.input_scale.item() != 1.0 and q.input_spec.dynamic is False
    x = torch.randn(1, 5, 64)
    assert torch.allclose(q.quantize_input(x), q.quantize_input(x * 1.0))
    # a static scale does not adapt: a 10x larger input is clipped at the calibrated range
    assert q.quantize_input(x * 1000).abs().max() <= q.input_scale.item() * 128 + 1e-4

    dynamic = make_model("llama")
    llmquant.quantize(dynamic, "w_int8_per_channel_a_int8_per_token_dynamic", calib=calib_ids, progress=False)
    q = dynamic.model.layers[0].self_attn.q_proj
    assert not hasattr(q, "input_scale")
    big = torch.randn(1, 5, 64) * 1000
    assert relative_error(big, q.quantize_input(big)) < 0.01


def test_per_tensor_weights_share_one_scale_and_per_channel_one_per_row(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    llmquant.quantize(model, "w_int8_per_tensor_a_int8_per_tensor_static", calib=calib_ids, progress=False)
    assert model.model.layers[0].mlp.up_proj.weight_scale.shape == (1,)
    model = make_model("llama")
    llmquant.quantize(model, "w_int8_per_channel_a_int8_per_tensor_static", calib=calib_ids, progress=False)
    up = model.model.layers[0].mlp.up_proj
    assert up.weight_scale.shape == (up.out_features, 1) and up.weight.dtype == torch.int8


@pytest.mark.parametrize(
    ("scheme", "per_token"),
    [
        ("w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_static", False),
        ("w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_dynamic", False),
        ("w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic", True),
    ],
)
def test_kv_cache_holds_at_most_256_values_per_scale_group(
    family: str, scheme: str, per_token: bool, calib_ids: torch.Tensor, eval_ids: torch.Tensor
) -> None:
    model = make_model(family)
    llmquant.quantize(model, scheme, calib=calib_ids, progress=False)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    quantizer = next(m for m in model.modules() if isinstance(m, KVCacheQuantizer))
    handle = quantizer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():  # generation path: keys and values go through the cache
        model(eval_ids[:1], use_cache=True)
    handle.remove()
    keys, values = seen[0]
    for states in (keys, values):
        groups = states.reshape(-1, states.shape[-1]) if per_token else states.reshape(1, -1)
        assert max(len(torch.unique(g)) for g in groups) <= 256
        assert len(torch.unique(states)) > 16  # really quantized, not collapsed


def test_kv_quantization_changes_the_output_and_only_the_kv_cache_is_touched(
    calib_ids: torch.Tensor, eval_ids: torch.Tensor
) -> None:
    base = make_model("llama")
    recipe = {"scheme": "none", "kv_cache": "int8_per_token"}
    reference = logits(base, eval_ids)
    llmquant.quantize(base, recipe, calib=calib_ids, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in base.modules())
    error = relative_error(reference, logits(base, eval_ids))
    assert 0 < error < 0.05


def test_scheme_none_keeps_the_model_exactly(family: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    model = make_model(family)
    reference = logits(model, eval_ids)
    llmquant.quantize(model, "none", calib=calib_ids, progress=False)
    assert torch.equal(reference, logits(model, eval_ids))


@pytest.mark.parametrize("scheme", WEIGHT_ONLY_SCHEMES)
def test_weight_only_schemes_leave_activations_float(scheme: str, calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    recipe = {"scheme": scheme, "group_size": 32}
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.input_spec is None
    bits = down.weight_spec.bits
    w = down.dequantized_weight()
    groups = w.reshape(-1, 32) if down.weight_spec.granularity == "group" else w.reshape(w.shape[0], -1)
    if down.weight_spec.granularity == "tensor":
        groups = w.reshape(1, -1)
    assert max(len(torch.unique(g)) for g in groups) <= 2**bits


def test_overrides_by_type_and_by_name(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    recipe = {
        "scheme": "w_int8_per_channel_a_int8_per_tensor_static",
        "overrides": [{"targets": ["re:.*down_proj"], "scheme": "w_int8_per_channel_a_int8_per_token_dynamic"}],
        "ignore": ["lm_head", "*.o_proj"],
    }
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.input_spec.granularity == "token"
    assert layer.mlp.up_proj.input_spec.granularity == "tensor"
    assert isinstance(layer.self_attn.o_proj, torch.nn.Linear)

    model = make_model("llama")  # Neural Compressor's set_local("Linear", fp32): every Linear float
    recipe = {
        "scheme": "w_int8_per_tensor_a_int8_per_tensor_static",
        "overrides": [{"targets": ["Linear"], "scheme": "none"}],
    }
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantizing_the_head_unties_it_from_the_embeddings(calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    model = make_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.detach().clone()
    llmquant.quantize(model, {"scheme": "w_int8_per_channel", "ignore": []}, calib=calib_ids, progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.model.embed_tokens.weight, embed)


def test_manifest_records_plan_errors_and_timings(calib_ids: torch.Tensor) -> None:
    model = make_model("qwen2")
    llmquant.quantize(model, "w_int8_per_channel_a_int8_per_tensor_static", calib=calib_ids, progress=False)
    manifest = model.llmquant_manifest.to_dict()
    assert manifest["recipe"]["scheme"] == "w_int8_per_channel_a_int8_per_tensor_static"
    assert {"prepare", "layers", "total"} <= set(manifest["seconds"])
    assert set(manifest["layers"][0]["weight_error"]) == set(manifest["model_map"]["linears"])
    assert all(0 < e < 0.05 for e in manifest["layers"][0]["weight_error"].values())
    assert {row["module"] for row in manifest["plan"]} >= {"lm_head", "model.layers.0.mlp.down_proj"}
    assert {"torch", "transformers", "llmquant"} <= set(manifest["versions"])


@pytest.mark.parametrize(
    "recipe",
    [
        {"scheme": "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_static",
         "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]},
        {"scheme": "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_dynamic"},
        {"scheme": "w_uint4_per_group_asym", "group_size": 32, "algorithm": "gptq"},
    ],
)
def test_batched_layer_passes_give_the_model_of_one_sample_at_a_time(
    family: str, recipe: dict, calib_ids: torch.Tensor, eval_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmquant.pipeline import engine, layer_io

    results = []
    for batch in (1, 3):
        monkeypatch.setattr(layer_io, "BATCH", batch)
        monkeypatch.setattr(engine, "BATCH", batch)
        model = make_model(family)
        reference = logits(model, eval_ids)
        llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
        results.append(logits(model, eval_ids))
    if recipe.get("algorithm") == "gptq":
        # GPTQ's column sweep amplifies the last-bit differences of a Hessian summed in another order:
        # a different but equally good solution
        one, batched = (relative_error(reference, r) for r in results)
        assert abs(one - batched) < 0.25 * one
    else:
        assert relative_error(results[0], results[1]) < 1e-4


@pytest.mark.parametrize("kv", ["int8_per_token", "int8_per_tensor_dynamic"])
def test_dynamic_kv_cache_does_not_break_the_equivalence_check_of_smoothing(kv: str, calib_ids: torch.Tensor) -> None:
    """The float passes (statistics, equivalence checks) run with the KV cache unquantized, dynamic or not:
    smoothing v_proj -> o_proj rescales the values, which a quantized cache would round differently."""
    scheme = {"int8_per_token": "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic",
              "int8_per_tensor_dynamic": "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_dynamic"}[kv]
    model = make_model("llama")
    llmquant.quantize(model, {"scheme": scheme, "pre_opts": [{"name": "smooth_fc_fc", "alpha": 0.5}]},
                      calib=calib_ids, progress=False)
    attention = model.model.layers[0].self_attn
    assert attention.kv_cache_quantizer.spec.dynamic and not attention.kv_cache_quantizer.observing


def test_float_propagation_calibrates_each_layer_on_the_float_models_activations(calib_ids: torch.Tensor) -> None:
    """``calib.propagate: float``: the second layer's static input scale is the absmax of the float model's own
    inputs to it over 448 (FP8 per tensor); ``quantized`` (the quantized first layer's outputs) gives another. Not
    given, round to nearest propagates the float outputs (`Recipe.propagation`): the same scale."""
    captured = []
    reference = make_model("llama")
    hook = reference.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
    with torch.no_grad():
        reference(calib_ids, use_cache=False)
    hook.remove()
    expected = torch.cat(captured).abs().max() / 448.0
    scales, first = {}, {}
    for propagate in ("float", "quantized", None):
        recipe = {"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static", "calib": {"propagate": propagate}}
        model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
        scales[propagate] = model.model.layers[1].self_attn.q_proj.input_scale
        first[propagate] = model.model.layers[0].self_attn.q_proj.input_scale
        assert model.llmquant_manifest.results["propagate"] == (propagate or "float")
    assert torch.equal(first["float"], first["quantized"])  # the first layer's inputs are the embeddings either way
    assert torch.allclose(scales["float"], expected.reshape(1), rtol=1e-5)
    assert torch.equal(scales[None], scales["float"])
    assert not torch.allclose(scales["quantized"], expected.reshape(1), rtol=1e-5)

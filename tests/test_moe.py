"""Mixture-of-experts models (tiny random Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, OLMoE): structure found,
fused experts as one Linear per expert matrix, every expert calibrated, gates float, every method, checkpoints.
The family x method matrix (tests/test_families.py) runs every method on these families too."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import llmquant
from conftest import MOE_FAMILIES, VOCAB, logits, make_model, relative_error
from llmquant.algorithms.gptq import parallel_rounds
from llmquant.cli import main
from llmquant.errors import LlmquantError
from llmquant.model.model_map import ModelMap, detect_model_map
from llmquant.model.moe import MoEBlock, find_moe_blocks, unfuse_experts
from llmquant.nn.experts import Experts, all_experts
from llmquant.nn.quant_linear import QuantLinear
from llmquant.recipe import Recipe

W4 = {"scheme": "w_uint4_per_group_asym", "group_size": 16}
SHARED = {"qwen2_moe": ("mlp.shared_expert",), "deepseek_v3": ("mlp.shared_experts",),
          "qwen3_next": ("mlp.shared_expert",), "hunyuan_v1_moe": ("mlp.shared_mlp",)}
GATES = {"qwen2_moe": ("mlp.shared_expert_gate",), "qwen3_next": ("mlp.shared_expert_gate",),
         "hunyuan_v1_moe": ("mlp.gate.wg",)}
ROUTER = {"gpt_oss": "mlp.router", "hunyuan_v1_moe": "mlp.gate.wg"}


def _ids(seed: int, samples: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_experts_become_one_linear_per_matrix_with_the_same_function(family: str) -> None:
    model = make_model(family)
    before = logits(model, _ids(2, 2))
    replaced = unfuse_experts(model)
    moe_layers = 1 if family == "deepseek_v3" else 2  # DeepSeek-V3's first layer is dense
    assert len(replaced) == moe_layers
    experts = model.get_submodule(replaced[0])
    assert isinstance(experts, Experts) and len(experts) == 4
    assert all(isinstance(getattr(e, n), torch.nn.Linear) for e in experts
               for n in ("gate_proj", "up_proj", "down_proj"))
    assert relative_error(before, logits(model, _ids(2, 2))) < 1e-6
    assert unfuse_experts(model) == []  # nothing left to unfuse


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_experts_with_placeholder_weights_unfuse_after_a_check_on_drawn_ones(family: str) -> None:
    """A model built without initialisation (as `load_quantized` builds one) holds whatever memory held: NaNs here.
    The layout check then computes with drawn weights; without saying so it sees NaNs and keeps the experts fused."""
    def nan_model() -> torch.nn.Module:
        model = make_model(family)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
        return model

    assert unfuse_experts(nan_model()) == []  # NaNs compute nothing comparable: the check fails, a warning
    model = nan_model()
    assert len(unfuse_experts(model, placeholder_weights=True)) == 2
    assert isinstance(model.get_submodule("model.layers.0.mlp.experts"), Experts)
    assert not all(p.isnan().any() for p in model.get_submodule("model.layers.0.mlp.experts").parameters())
    assert all(p.isnan().all() for p in model.get_submodule("model.layers.1.mlp.experts").parameters())  # only
    # the first module of a class is checked, so only its weights are drawn


def test_loading_an_moe_checkpoint_draws_no_weights_for_the_whole_model(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    quantized = llmquant.quantize(make_model("qwen3_moe"), W4, calib=_ids(1), progress=False)
    llmquant.save(quantized, None, tmp_path / "ckpt")
    import transformers

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("init_weights called while loading")

    monkeypatch.setattr(transformers.PreTrainedModel, "init_weights", refuse)
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake", device="cpu")
    ids = _ids(2, 2)
    assert torch.equal(logits(quantized, ids), logits(loaded, ids))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_detects_router_experts_shared_experts_and_gates(family: str) -> None:
    model = make_model(family)
    unfuse_experts(model)
    model_map = detect_model_map(model)
    assert model_map.decoder_layers == "model.layers"  # not a layer's (longer) list of experts
    assert model_map.moe == (MoEBlock(name="mlp", router=ROUTER.get(family, "mlp.gate"), experts="mlp.experts",
                                      num_experts=4,
                                      shared=SHARED.get(family, ()), gates=GATES.get(family, ())),)
    layers = model_map.layers(model)
    assert [bool(find_moe_blocks(layer)) for layer in layers] == [family != "deepseek_v3", True]
    assert "mlp.experts.3.down_proj" in model_map.linears
    if family == "deepseek_v3":  # the dense first layer's MLP is in the map too
        assert "mlp.down_proj" in model_map.linears and not model_map.moe_blocks(layers[0])
    again = ModelMap.from_dict(json.loads(json.dumps(model_map.to_dict())))  # a layer map names them as well
    assert again == model_map


def test_a_layer_map_with_a_bad_moe_entry_is_one_clear_error() -> None:
    with pytest.raises(LlmquantError, match="moe entry needs name, router, experts, num_experts"):
        ModelMap.from_dict({**detect_model_map(make_model("llama")).to_dict(), "moe": [{"name": "mlp"}]})


def test_gates_stay_float_and_every_expert_is_quantized_by_default() -> None:
    model = make_model("qwen2_moe")
    unfuse_experts(model)
    plan = Recipe().resolve(model, detect_model_map(model))
    assert plan.linears["model.layers.0.mlp.shared_expert_gate"].is_float
    assert not plan.linears["model.layers.0.mlp.experts.3.down_proj"].is_float
    assert "model.layers.*.mlp.shared_expert_gate" in plan.left_float("model.layers")
    override = Recipe(overrides=[{"targets": ["re:.*shared_expert_gate"],
                                  "scheme": "w_int8_per_channel_a_int8_per_token_dynamic"}])
    overridden = override.resolve(model, detect_model_map(model))
    assert not overridden.linears["model.layers.0.mlp.shared_expert_gate"].is_float
    quantized = llmquant.quantize(make_model("mixtral"), calib=_ids(1), progress=False)
    router = quantized.get_submodule("model.layers.0.mlp.gate")
    assert not isinstance(router, QuantLinear) and router.weight.dtype == torch.float32  # the router: float
    assert isinstance(quantized.get_submodule("model.layers.1.mlp.experts.2.up_proj"), QuantLinear)


def _tokens_seen(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, int]:
    experts = model.get_submodule("model.layers.0.mlp.experts")
    seen = dict.fromkeys(range(len(experts)), 0)
    handles = [e.gate_proj.register_forward_pre_hook(
        lambda _m, args, i=i: seen.__setitem__(i, seen[i] + args[0].shape[0])) for i, e in enumerate(experts)]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return seen


def test_every_expert_sees_every_token_while_calibrating_and_the_output_is_the_routed_one() -> None:
    model = make_model("olmoe")
    unfuse_experts(model)
    ids = _ids(3, 2)
    routed, routed_seen = logits(model, ids), _tokens_seen(model, ids)
    with all_experts(model):
        every, every_seen = logits(model, ids), _tokens_seen(model, ids)
    assert torch.equal(routed, every)  # the layer computes the same
    assert all(count == ids.numel() for count in every_seen.values())
    assert sum(routed_seen.values()) == 2 * ids.numel()  # top 2 of 4
    assert logits(model, ids).equal(routed) and _tokens_seen(model, ids) == routed_seen  # switched off again


def test_gptq_shares_one_hessian_over_all_experts_inputs_and_feeds_the_down_projections_in_one_pass() -> None:
    model = llmquant.quantize(make_model("qwen2_moe"), {**W4, "algorithm": "gptq"}, calib=_ids(1), progress=False)
    stages = model.llmquant_manifest.layers[0]["gptq_stages"]
    shared_input = next(stage for stage in stages if "mlp.experts.0.gate_proj" in stage)
    assert {f"mlp.experts.{i}.{p}" for i in range(4) for p in ("gate_proj", "up_proj")} | {
        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"} == set(shared_input)
    downs = [stage for stage in stages if stage[0].startswith("mlp.experts.") and stage[0].endswith("down_proj")]
    layer = model.get_submodule("model.layers.0")
    assert downs in parallel_rounds(layer, stages)  # the four experts' down projections: one round, one pass


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_the_down_projections_hessians_from_the_experts_input_are_those_of_a_whole_layer_pass(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every expert calibrated on every token, GPTQ takes the experts' down-projection inputs from the experts'
    input (`down_input_feed`: no down projection or router sum runs); the Hessians, hence the codes, are those of a
    pass of the whole layer with a hook on every down projection."""
    import llmquant.algorithms.gptq as gptq

    recipe, calib = {**W4, "algorithm": "gptq"}, _ids(2)
    fed: list[int] = []
    real = gptq.down_input_feed
    monkeypatch.setattr(gptq, "down_input_feed", lambda experts, consumers: fed.append(len(consumers)) or real(
        experts, consumers))
    direct = llmquant.quantize(make_model(family), recipe, calib=calib, progress=False)
    assert fed == [4, 4]  # each layer's four down projections, one pass from the experts' input
    monkeypatch.setattr(gptq, "_down_projections", lambda *args: None)  # the pass of the whole layer, hooked
    hooked = llmquant.quantize(make_model(family), recipe, calib=calib, progress=False)
    for name, module in direct.named_modules():
        if isinstance(module, QuantLinear) and ".experts." in name:
            assert torch.equal(module.weight_packed, hooked.get_submodule(name).weight_packed), name


def _assert_same_expert_weights(one: torch.nn.Module, other: torch.nn.Module) -> None:
    for name, module in one.named_modules():
        if isinstance(module, QuantLinear) and ".experts." in name:
            a, b = module.dequantized_weight(), other.get_submodule(name).dequantized_weight()
            assert (a == b).float().mean() > 0.999, name  # each row's sweep does not depend on the others


def test_gptq_takes_a_few_experts_at_a_time_under_its_memory_bounds_with_the_same_result(
        monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, calib = {**W4, "algorithm": "gptq"}, _ids(1)
    whole = llmquant.quantize(make_model("qwen3_moe"), recipe, calib=calib, progress=False)
    import llmquant.algorithms.gptq as gptq

    layer = whole.get_submodule("model.layers.0")
    stages = whole.llmquant_manifest.layers[0]["gptq_stages"]
    downs = [s for s in stages if s[0].endswith("down_proj") and ".experts." in s[0]]
    hessian = 32 * 32 * 8  # one expert's down projection reads 32 inputs
    assert [len(r) for r in gptq.parallel_rounds(layer, downs, budget=2 * hessian)] == [2, 2]
    specs = dict.fromkeys(stages[2], whole.get_submodule("model.layers.0.mlp.experts.0.up_proj").weight_spec)
    rows = dict.fromkeys(stages[2], 32)
    assert [len(s) for s in gptq.stacked_sweeps(stages[2], specs, rows, limit=96)] == [3, 3, 2]
    monkeypatch.setattr(gptq, "MAX_SWEEP_ROWS", 64)  # two expert matrices a sweep
    monkeypatch.setattr(gptq, "ROUND_HESSIAN_BYTES", hessian)  # one expert a pass
    chunked = llmquant.quantize(make_model("qwen3_moe"), recipe, calib=calib, progress=False)
    _assert_same_expert_weights(whole, chunked)


def test_the_memory_cap_sizes_the_rounds_of_experts_and_the_sweeps_with_the_same_result() -> None:
    """--max-memory / max_memory: a layer's Hessians and sweeps take what is left under the cap, so with nothing left
    the experts go one a pass and every Linear is swept alone; the weights are those of the uncapped run."""
    from llmquant.device import resident_bytes

    recipe, calib = {**W4, "algorithm": "gptq"}, _ids(1)
    whole = llmquant.quantize(make_model("qwen3_moe"), recipe, calib=calib, progress=False)
    # q/k/v, o, every gate/up (one Hessian), then the four down projections in one pass
    assert whole.llmquant_manifest.layers[0]["gptq_expert_rounds"] == [1, 1, 1, 4]
    capped = llmquant.quantize(make_model("qwen3_moe"), recipe, calib=calib, progress=False,
                               max_memory=resident_bytes())  # (the cap is a target: nothing is left under it)
    for row in capped.llmquant_manifest.layers:
        assert row["gptq_expert_rounds"] == [1] * 7 and row["gptq_working_memory_mb"] == 0.0
    assert capped.llmquant_manifest.results["placement"]["max_memory_mb"] > 0
    _assert_same_expert_weights(whole, capped)


def test_lean_experts_keep_one_expert_runtime_caches_at_a_time_and_the_same_function() -> None:
    """The quantized pass under a cap (`lean_experts`): every expert drops its int4 kernel's copy of the codes once
    it has run, so a pass holds one expert's; the layer computes what it computed with them kept."""
    from llmquant.nn.experts import lean_experts
    from llmquant.nn.quant_linear import set_runtime

    model = llmquant.quantize(make_model("qwen3_moe"), {"scheme": "w_int4_per_group_sym", "group_size": 32},
                              calib=_ids(1), progress=False)
    set_runtime(model, "int8")
    ids = _ids(2, 2)
    kept = logits(model, ids)
    experts = [m for n, m in model.named_modules() if isinstance(m, QuantLinear) and ".experts." in n]
    assert all(m.runtime_caches() for m in experts)  # built once and kept
    for module in experts:
        module.drop_caches()
    with lean_experts(model):
        lean = logits(model, ids)
    assert torch.equal(kept, lean)
    assert not any(m.runtime_caches() for m in experts)
    assert not any(m.transient_caches for m in model.modules() if isinstance(m, Experts))  # off again


def test_gptq_beats_round_to_nearest_on_every_expert() -> None:
    calib = _ids(1)
    runs = {algo: llmquant.quantize(make_model("mixtral"), {**W4, "algorithm": algo}, calib=calib, progress=False)
            for algo in ("rtn", "gptq")}
    reference = make_model("mixtral")
    unfuse_experts(reference)
    seen: list[torch.Tensor] = []  # the experts' input on the calibration tokens (every token, every expert)
    handle = reference.get_submodule("model.layers.0.mlp.experts.0.gate_proj").register_forward_pre_hook(
        lambda _m, args: seen.append(args[0]))
    with all_experts(reference), torch.no_grad():
        reference(calib)
    handle.remove()
    x = torch.cat(seen)
    for index in range(4):
        name = f"model.layers.0.mlp.experts.{index}.gate_proj"
        with torch.no_grad():
            float_out = reference.get_submodule(name)(x)
            errors = {algo: relative_error(float_out, model.get_submodule(name)(x)) for algo, model in runs.items()}
        assert errors["gptq"] < errors["rtn"], (name, errors)


def test_routed_calibration_falls_back_to_round_to_nearest_for_experts_with_too_few_tokens(
        caplog: pytest.LogCaptureFixture) -> None:
    recipe = {**W4, "algorithm": "gptq", "moe_calibrate": "routed", "gptq": {"min_tokens": 70}}
    with caplog.at_level(logging.WARNING):
        model = llmquant.quantize(make_model("qwen3_moe"), recipe, calib=_ids(1), progress=False)
    fallback = model.llmquant_manifest.layers[0]["gptq_rtn_fallback"]
    assert fallback and all(".experts." in name and tokens < 70 for name, tokens in fallback.items())
    assert "keep round to nearest" in caplog.text
    rtn = llmquant.quantize(make_model("qwen3_moe"), {**W4, "moe_calibrate": "routed"}, calib=_ids(1), progress=False)
    for name in fallback:  # exactly the round-to-nearest weights
        full = f"model.layers.0.{name}"
        assert torch.equal(model.get_submodule(full).dequantized_weight(), rtn.get_submodule(full).dequantized_weight())
    assert model.llmquant_manifest.results["moe"]["calibrate"] == "routed"


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_smoothing_and_rotations_keep_the_float_function_through_the_moe_block(family: str) -> None:
    ids, router = _ids(2, 2), ROUTER.get(family, "mlp.gate")
    reference = logits(make_model(family), ids)
    r6_smoothed = [{"name": "quarot", "rotations": ["R2", "R4", "R6"]}, {"name": "smoothquant", "alpha": 0.5}]
    for pre_opts in ([{"name": "smoothquant", "alpha": 0.5}], r6_smoothed, [{"name": "quarot"}]):
        model = llmquant.quantize(make_model(family), {"scheme": "none", "pre_opts": pre_opts}, calib=_ids(1),
                                  progress=False)
        assert relative_error(reference, logits(model, ids)) < 1e-5, pre_opts
        if pre_opts is r6_smoothed:  # the router and every expert's gate/up rotate their input online
            results = model.llmquant_manifest.results["rotation"]
            last_plan = [results["plan"], *results.get("other_layer_plans", [])][-1]  # (DeepSeek: dense layer 0)
            r6 = next(step for step in last_plan if step["rotation"] == "R6")
            assert {router, "mlp.experts.0.gate_proj", "mlp.experts.3.up_proj"} <= set(r6["targets"])
    results = model.llmquant_manifest.results["rotation"]
    plans = [results["plan"], *results.get("other_layer_plans", [])]
    moe_plan = {step["rotation"]: step for step in plans[-1]}
    assert moe_plan["R1"]["applies"] and router in moe_plan["R1"]["targets"]  # the router is rotated too
    r4 = [target for name, step in moe_plan.items() if name.startswith("R4") for target in step["targets"]]
    assert {f"mlp.experts.{i}.down_proj" for i in range(4)} <= set(r4)  # online before every expert's down
    assert {f"mlp.experts.{i}.down_proj" for i in range(4)} <= set(moe_plan["R1"]["targets"])  # writers


def test_one_smoothing_scale_covers_the_router_every_expert_and_the_shared_expert() -> None:
    model = llmquant.quantize(make_model("qwen2_moe"), {"scheme": "w_int8_per_channel_a_int8_per_tensor_static",
                                                        "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]},
                              calib=_ids(1), progress=False)
    group = next(g for g in model.llmquant_manifest.results["smooth_groups"]
                 if g["producer"] == "post_attention_layernorm")
    assert {"mlp.gate", "mlp.shared_expert_gate", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
            *(f"mlp.experts.{i}.{p}" for i in range(4) for p in ("gate_proj", "up_proj"))} == set(group["linears"])
    linear_groups = {g["producer"]: g["linears"] for g in model.llmquant_manifest.results["smooth_groups"]
                     if g["producer_kind"] == "linear"}
    assert all(list(linear_groups[f"mlp.experts.{i}.up_proj"]) == [f"mlp.experts.{i}.down_proj"] for i in range(4))
    assert all(row["equivalence_error"] < 1e-5 for row in model.llmquant_manifest.layers)


@pytest.mark.parametrize("recipe", [
    {"scheme": "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic"},
    {**W4, "algorithm": "gptq"},
    {**W4, "algorithm": "awq"},
    {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "pre_opts": [{"name": "quarot"}]},
    {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "ignore": ["lm_head", "re:.*\\.experts\\..*"]},
], ids=["w8a8-kv8", "w4-gptq", "w4-awq", "quarot-w8a8", "experts-float"])
def test_checkpoint_round_trip_gives_identical_logits(recipe: dict, tmp_path: Path) -> None:
    ids = _ids(2, 2)
    model = llmquant.quantize(make_model("deepseek_v3"), recipe, calib=_ids(1), progress=False)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake", device="cpu")
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    stored = "weight_packed" if "uint4" in recipe["scheme"] else "weight"
    assert f"model.layers.1.mlp.experts.3.down_proj.{stored}" in names  # one tensor set per expert (vLLM's names)
    assert "model.layers.1.mlp.gate.weight" in names and not any("gate_up_proj" in n for n in names)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]  # (built from a config: serving engines need it)


def test_detect_prints_the_moe_blocks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = make_model("qwen2_moe")
    model.save_pretrained(tmp_path / "float")
    assert main(["detect", "--model", str(tmp_path / "float")]) == 0
    found = json.loads(capsys.readouterr().out)
    [block] = found["model_map"]["moe"]
    assert block["experts"] == "mlp.experts" and block["shared"] == ["mlp.shared_expert"]
    assert block["gates"] == ["mlp.shared_expert_gate"] and found["moe_layers"] == [0, 1]
    assert "model.layers.*.mlp.shared_expert_gate" in found["left_float_by_default"]
    assert "not_quantizable" not in found


def test_detect_names_what_stays_float_whatever_the_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_model("llama4").save_pretrained(tmp_path / "float")
    assert main(["detect", "--model", str(tmp_path / "float")]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["not_quantizable"] == {
        "model.layers.*.feed_forward.experts":
            "Llama4TextExperts: 3-D expert weights in a layout llmquant does not read",
        "model.layers.*.feed_forward.router": "Llama4Router: a Linear with a forward of its own"}
    make_model("jamba").save_pretrained(tmp_path / "jamba")
    assert main(["detect", "--model", str(tmp_path / "jamba")]) == 0
    assert json.loads(capsys.readouterr().out)["not_quantizable"] == {
        "model.layers.*.mamba.dt_proj": "Linear: never called, its weight read by its parent's own code"}


@pytest.mark.parametrize(("family", "target", "said"), [
    ("mixtral", "transformers", "transformers loads no quantized mixture-of-experts checkpoint"),
    ("gpt_oss", "vllm", "gpt_oss checkpoints store each layer's experts fused (one gate_up_proj of every expert), "
                        "which is all vLLM's loader for it reads"),
])
def test_targets_that_cannot_load_an_moe_checkpoint_refuse_before_calibration(
        family: str, target: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmquant.testing.tiny_checkpoint import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    make_model(family).save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    code = main(["quantize", "--model", str(tmp_path / "float"), "--target", target, "--no-eval",
                 "--output", str(tmp_path / "out")])
    assert code == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_declared_expert_layouts_are_read_transposed_alternating_with_biases_and_their_own_gate() -> None:
    """gpt-oss's experts (transformers' experts interface: is_transposed, gate and up columns alternating, biases,
    a clamped SwiGLU of its own) become Linears holding exactly the fused numbers, and compute the same."""
    model = make_model("gpt_oss")
    fused = model.model.layers[1].mlp.experts
    gate_up, gate_up_bias = fused.gate_up_proj.detach().clone(), fused.gate_up_proj_bias.detach().clone()
    down, down_bias = fused.down_proj.detach().clone(), fused.down_proj_bias.detach().clone()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    index, weights = torch.tensor([[0, 3], [1, 2], [2, 0], [3, 1], [0, 1], [2, 3]]), torch.rand(6, 2)
    with torch.no_grad():
        expected = fused(x, index, weights)
    unfuse_experts(model)
    experts = model.model.layers[1].mlp.experts
    expert = experts[2]
    assert torch.equal(expert.gate_proj.weight, gate_up[2, :, 0::2].t())
    assert torch.equal(expert.up_proj.weight, gate_up[2, :, 1::2].t())
    assert torch.equal(expert.up_proj.bias, gate_up_bias[2, 1::2])
    assert torch.equal(expert.down_proj.weight, down[2].t()) and torch.equal(expert.down_proj.bias, down_bias[2])
    assert list(expert.gate.shell.parameters()) == []  # the gate does not hold the fused weights
    with torch.no_grad():
        assert torch.allclose(experts(x, index, weights), expected, rtol=1e-5, atol=1e-6)


def test_mixtral_checkpoints_use_its_hub_names_and_load_back(tmp_path: Path) -> None:
    from safetensors import safe_open

    from llmquant.model.checkpoint_names import checkpoint_names

    model = make_model("mixtral")
    names = checkpoint_names(model)  # from transformers' conversion mapping for "mixtral"
    memory = "model.layers.1.mlp.experts.3.gate_proj.weight_scale"
    assert names.to_disk(memory) == "model.layers.1.block_sparse_moe.experts.3.w1.weight_scale"
    assert names.from_disk(names.to_disk(memory)) == memory
    assert names.to_disk("model.layers.1.mlp.experts.3.down_proj") == "model.layers.1.block_sparse_moe.experts.3.w2"
    assert checkpoint_names(make_model("llama")).to_disk("model.layers.0.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    ids = _ids(2, 2)
    quantized = llmquant.quantize(model, {"scheme": "w_int8_per_channel_a_int8_per_tensor_static",
                                          "pre_opts": [{"name": "quarot", "rotations": ["R1", "R4"]}]},
                                  calib=_ids(1), progress=False)
    llmquant.save(quantized, None, tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys and not any(".mlp." in k for k in keys)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "model.layers.0.block_sparse_moe.gate" in config["quantization_config"]["ignore"]  # the router: float
    assert "model.layers.0.block_sparse_moe.experts.0.w2" in config["llmquant_structure"]["input_rotations"]  # R4
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake", device="cpu")
    assert torch.equal(logits(quantized, ids), logits(loaded, ids))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "qwen3_next", "jamba"])  # gpt-oss: experts
# fused on disk; Qwen3-Next and Jamba: hybrids, their first layer without attention (Jamba: a Linear never called)
def test_an_moe_model_streamed_from_disk_gives_the_in_memory_checkpoint(family: str, corpus: Path,
                                                                         tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from conftest import FAMILIES
    from llmquant.testing.tiny_checkpoint import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = FAMILIES[family]()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "float")  # per-expert tensors (hub names)
    tokenizer.save_pretrained(tmp_path / "float")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**W4, "algorithm": "awq", "calib": {"dataset": str(corpus), "samples": 4,
                                                                      "seqlen": 32}}))
    common = ["quantize", "--model", str(tmp_path / "float"), "--config", str(recipe), "--no-eval", "--quiet"]
    assert main([*common, "--output", str(tmp_path / "memory")]) == 0
    assert main([*common, "--max-memory", "1GB", "--output", str(tmp_path / "streamed")]) == 0
    assert (tmp_path / "streamed" / "model.safetensors.index.json").exists()  # written layer by layer
    streamed, _ = llmquant.load(tmp_path / "streamed", runtime="fake", device="cpu")
    in_memory, _ = llmquant.load(tmp_path / "memory", runtime="fake", device="cpu")
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(6))
    assert torch.equal(logits(streamed, ids), logits(in_memory, ids))
    manifest = json.loads((tmp_path / "streamed" / "llmquant.json").read_text())
    assert manifest["results"]["moe"]["blocks"][0]["experts"] == ("feed_forward.experts" if family == "jamba"
                                                                   else "mlp.experts")


def test_a_streamed_layer_missing_a_tensor_on_disk_is_one_clear_error(corpus: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from conftest import FAMILIES
    from llmquant.testing.tiny_checkpoint import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = FAMILIES["gpt_oss"]()
    config.vocab_size = len(tokenizer)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    weights = tmp_path / "float" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.experts.down_proj_bias"]
    save_file(tensors, weights, metadata={"format": "pt"})
    code = main(["quantize", "--model", str(tmp_path / "float"), "--calib", str(corpus), "--calib-samples", "2",
                 "--seqlen", "32", "--max-memory", "1GB", "--no-eval", "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "has no tensor for model.layers.1.mlp.experts.0.gate_proj.bias (nor 11 more of this layer)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_weights_no_quantizer_can_replace_stay_float_and_are_said() -> None:
    """Llama 4: its experts take no routing arguments (3-D weights llmquant does not unfuse) and its router is a
    Linear whose forward returns a tuple; both stay float, named in the manifest, and the norm their inputs come
    from is not smoothed (a scale would reach the float experts), so the smoothed model keeps its function."""
    ids = _ids(2, 2)
    reference = logits(make_model("llama4"), ids)
    model = llmquant.quantize(make_model("llama4"), {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic",
                                                     "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]},
                              calib=_ids(1), progress=False)
    moe = model.model.layers[0].feed_forward
    assert type(moe.router).__name__ == "Llama4Router" and isinstance(moe.shared_expert.down_proj, QuantLinear)
    results = model.llmquant_manifest.results
    assert results["not_quantizable"] == {
        "model.layers.*.feed_forward.experts":
            "Llama4TextExperts: 3-D expert weights in a layout llmquant does not read",
        "model.layers.*.feed_forward.router": "Llama4Router: a Linear with a forward of its own"}
    assert "feed_forward.shared_expert.up_proj" in results["not_smoothed"]
    assert relative_error(reference, logits(model, ids)) < 0.1
    float_smoothed = llmquant.quantize(make_model("llama4"), {"scheme": "none", "pre_opts": [
        {"name": "smoothquant", "alpha": 0.5}]}, calib=_ids(1), progress=False)
    assert relative_error(reference, logits(float_smoothed, ids)) < 1e-5

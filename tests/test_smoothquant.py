"""SmoothQuant: groups found from the data flow, float equivalence, alpha search, folding, checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, Phi3Config

import llmquant
from conftest import VOCAB, logits, make_model, relative_error
from llmquant.algorithms.awq import scale_group
from llmquant.algorithms.smoothquant import (
    AUTO_GRID,
    GroupStats,
    GroupStatsCollector,
    apply_smoothing,
    choose_alpha,
    group_rotation,
    quantized_group_error,
    smoothing_scales,
    weight_absmax,
)
from llmquant.errors import LlmquantError
from llmquant.model.model_map import ModelMap, detect_model_map
from llmquant.model.patterns import SmoothGroup, reduce_channels
from llmquant.nn.online_rotation import attach_input_rotation
from llmquant.pipeline import capture_layer_inputs, find_smooth_groups
from llmquant.quant import QuantSpec, fake_quantize
from llmquant.quant.rotation import Rotation

LLAMA_LIKE = {
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("mlp.up_proj", ("mlp.down_proj",)),
}
EXPECTED = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "opt": {
        ("self_attn_layer_norm", ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj")),
        ("final_layer_norm", ("fc1",)),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("fc1", ("fc2",)),  # through ReLU: relu(x / s) = relu(x) / s for s > 0
    },
    # fused projections: only the norm groups; gate_up -> down and qkv -> o are not channel-for-channel
    "phi3": {("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))},
    # GELU is not homogeneous, so dense_h_to_4h -> dense_4h_to_h must not be found
    "gpt_neox": {
        ("input_layernorm", ("attention.query_key_value",)),
        ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    },
}


def _model(family: str) -> torch.nn.Module:
    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    if family == "phi3":
        return AutoModelForCausalLM.from_config(
            Phi3Config(**common, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                       bos_token_id=1)
        ).eval()
    if family == "gpt_neox":
        return AutoModelForCausalLM.from_config(
            GPTNeoXConfig(**common, num_attention_heads=4, eos_token_id=1, bos_token_id=1)
        ).eval()
    return make_model(family)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_groups_found_from_the_data_flow_equal_the_expected_ones(family: str) -> None:
    model = _model(family)
    model_map = detect_model_map(model)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    groups = find_smooth_groups(model, model_map, capture_layer_inputs(model, model_map, ids))
    assert {(g.producer, g.linears) for g in groups} == EXPECTED[family]
    if family in ("llama", "qwen2", "mistral"):  # grouped-query attention: o_proj reads each v head n_rep times
        vo = next(g for g in groups if g.producer == "self_attn.v_proj")
        config = model.config
        assert vo.head_repeat == config.num_attention_heads // config.num_key_value_heads and vo.head_dim == 16


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "opt"])
@pytest.mark.parametrize("alpha", [0.5, 0.85, "auto"])
def test_smoothing_keeps_the_float_function(family: str, alpha: float | str, calib_ids: torch.Tensor,
                                            eval_ids: torch.Tensor) -> None:
    model = make_model(family)
    reference = logits(model, eval_ids)
    recipe = {"scheme": "none", "pre_opts": [{"name": "smoothquant", "alpha": alpha}]}
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    assert relative_error(reference, logits(model, eval_ids)) < 1e-4
    rows = [r for layer in model.llmquant_manifest.layers for r in layer["smoothing"]]
    assert len(rows) == 2 * 4
    assert all(layer["equivalence_error"] < 1e-5 for layer in model.llmquant_manifest.layers)


def test_smoothing_flattens_outliers_and_helps_per_tensor_static(calib_ids: torch.Tensor,
                                                                 eval_ids: torch.Tensor) -> None:
    scheme = "w_int8_per_tensor_a_int8_per_tensor_static"
    errors = {}
    for pre_opts in ([], [{"name": "smoothquant", "alpha": 0.5}]):
        model = make_model("llama")
        reference = logits(model, eval_ids)
        llmquant.quantize(model, {"scheme": scheme, "pre_opts": pre_opts}, calib=calib_ids, progress=False)
        errors[bool(pre_opts)] = relative_error(reference, logits(model, eval_ids))
        if pre_opts:
            for row in model.llmquant_manifest.layers[0]["smoothing"]:
                assert row["outlier_ratio_after"] < row["outlier_ratio_before"]
    assert errors[True] < errors[False]


def test_smooth_fc_fc_only_touches_linear_to_linear_groups(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    recipe = {"scheme": "none", "pre_opts": [{"name": "smooth_fc_fc", "alpha": 0.5}]}
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    producers = {r["producer"] for r in model.llmquant_manifest.layers[0]["smoothing"]}
    assert producers == {"self_attn.v_proj", "mlp.up_proj"}
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)


def test_grouped_query_heads_share_their_value_channel_scale(calib_ids: torch.Tensor) -> None:
    model = make_model("mistral")  # 4 query heads read 1 value head
    o_before = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    recipe = {"scheme": "none", "pre_opts": [{"name": "smooth_fc_fc", "alpha": 0.5}]}
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    ratio = (model.model.layers[0].self_attn.o_proj.weight / o_before)[0].reshape(4, 16)
    assert torch.allclose(ratio, ratio[0].expand(4, 16), rtol=1e-5)


def test_auto_alpha_is_never_worse_than_the_fixed_grid_points() -> None:
    torch.manual_seed(0)
    layer = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(32), "fc": torch.nn.Linear(32, 48, bias=False)})
    x = torch.randn(512, 32) * (1 + 20 * (torch.rand(32) > 0.9))
    group = SmoothGroup("norm", "norm", ("fc",))
    stats = GroupStats(act_absmax=x.abs().amax(dim=0), tokens=x)
    specs = {"fc": (QuantSpec(granularity="channel"), QuantSpec(granularity="tensor"))}
    alpha, scales = choose_alpha(layer, group, stats, specs)
    best = quantized_group_error(layer, group, stats, scales, specs)
    act, w = reduce_channels(stats.act_absmax, group), weight_absmax(layer, group)
    for fixed in (0.5, 0.85):
        assert best <= quantized_group_error(layer, group, stats, smoothing_scales(act, w, fixed), specs)
    assert 0.3 <= alpha <= 0.95


def test_dead_channels_get_unit_scales_instead_of_nan() -> None:
    scales = smoothing_scales(torch.tensor([0.0, 4.0, 1.0]), torch.tensor([1.0, 0.0, 4.0]), 0.5)
    assert scales.tolist() == [1.0, 1.0, 0.5]


def test_a_wrong_hand_written_group_is_caught_by_the_pipeline(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    wrong = [{"producer": "self_attn.q_proj", "producer_kind": "linear", "linears": ["self_attn.o_proj"],
              "head_repeat": 1, "head_dim": 0}]
    recipe = {"scheme": "none", "pre_opts": [{"name": "smoothquant"}], "smooth_groups": wrong}
    with pytest.raises(LlmquantError, match=r"smoothing changed the function of model\.layers\.0"):
        llmquant.quantize(model, recipe, calib=calib_ids, progress=False)


def test_neural_compressor_api_gives_the_same_model_as_the_recipe(calib_ids: torch.Tensor,
                                                                  eval_ids: torch.Tensor) -> None:
    by_recipe = make_model("llama")
    recipe = {"scheme": "w_int8_per_channel_a_int8_per_tensor_static",
              "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]}
    llmquant.quantize(by_recipe, recipe, calib=calib_ids, progress=False)

    model = make_model("llama")
    prepared = llmquant.prepare(model, quant_config=llmquant.SmoothQuantConfig(alpha=0.5), example_inputs=calib_ids[:1])

    def run_fn(m: torch.nn.Module) -> None:
        for row in calib_ids[1:]:
            m(row.unsqueeze(0))

    run_fn(prepared)
    q_model = llmquant.convert(prepared)
    assert torch.equal(logits(q_model, eval_ids), logits(by_recipe, eval_ids))


def test_set_local_linear_fp32_keeps_every_linear_float(calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    model = make_model("llama")
    reference = logits(model, eval_ids)
    config = llmquant.SmoothQuantConfig(alpha=0.5)
    config.set_local("Linear", llmquant.SmoothQuantConfig(w_dtype="fp32", act_dtype="fp32"))
    q_model = llmquant.convert(llmquant.prepare(model, quant_config=config, example_inputs=calib_ids))
    assert not any(type(m).__name__ == "QuantLinear" for m in q_model.modules())
    assert relative_error(reference, logits(q_model, eval_ids)) < 1e-4  # smoothed, still the same function


def test_convert_without_calibration_is_a_clear_error() -> None:
    model = make_model("llama")
    with pytest.raises(LlmquantError, match="the calibration set is empty"):
        llmquant.convert(llmquant.prepare(model, quant_config=llmquant.SmoothQuantConfig()))


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "opt"])
def test_shipped_family_maps_give_the_same_model_as_detection(
    family: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor
) -> None:
    shipped = json.loads((CONFIGS / f"{family}.json").read_text())
    recipe = {"scheme": "w_int8_per_channel_a_int8_per_tensor_static",
              "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]}
    detected = make_model(family)
    llmquant.quantize(detected, recipe, calib=calib_ids, progress=False)
    mapped = make_model(family)
    llmquant.quantize(mapped, {**recipe, "smooth_groups": shipped["smooth_groups"]}, calib=calib_ids,
                      model_map=ModelMap.from_dict(shipped["model_map"]), progress=False)
    assert torch.equal(logits(detected, eval_ids), logits(mapped, eval_ids))
    assert mapped.llmquant_manifest.results["smooth_groups"] == detected.llmquant_manifest.results["smooth_groups"]


def test_auto_alpha_scored_on_held_out_samples_migrates_less_when_outliers_do_not_repeat() -> None:
    """Channels that spike in one half of the calibration samples and not the other: scoring alphas on the
    tokens the scales came from favours a strong migration; scoring on the other half does not."""
    torch.manual_seed(0)
    layer = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(32), "fc": torch.nn.Linear(32, 48, bias=False)})
    halves = [torch.randn(256, 32), torch.randn(256, 32)]
    halves[0][::16, 0:4] *= 40.0  # spikes of half A live in channels 0-3, those of half B in 4-7
    halves[1][::16, 4:8] *= 40.0
    folds = tuple(GroupStats(act_absmax=x.abs().amax(dim=0), tokens=x) for x in halves)
    x = torch.cat(halves)
    group = SmoothGroup("norm", "norm", ("fc",))
    specs = {"fc": (QuantSpec(granularity="channel"), QuantSpec(granularity="tensor"))}
    in_sample, _ = choose_alpha(layer, group, GroupStats(act_absmax=x.abs().amax(dim=0), tokens=x), specs)
    held_out, scales = choose_alpha(layer, group, GroupStats(act_absmax=x.abs().amax(dim=0), tokens=x,
                                                             folds=folds), specs)
    assert held_out < in_sample
    act, w = reduce_channels(x.abs().amax(dim=0), group), weight_absmax(layer, group)
    assert torch.equal(scales, smoothing_scales(act, w, held_out))  # applied with every sample's maxima


def test_the_collector_keeps_two_folds_of_alternate_calls() -> None:
    layer = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(4), "fc": torch.nn.Linear(4, 4, bias=False)})
    collector = GroupStatsCollector(layer, [SmoothGroup("norm", "norm", ("fc",))])
    calls = [torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 2.0, 0, 0]]), torch.tensor([[0, 0, 3.0, 0]])]
    for x in calls:
        layer["fc"](x)
    (stats,) = collector.close()
    first, second = stats.folds
    assert first.act_absmax.tolist() == [1, 0, 3, 0] and second.act_absmax.tolist() == [0, 2, 0, 0]
    assert stats.act_absmax.tolist() == [1, 2, 3, 0] and stats.tokens.shape == (3, 4)


# --- norms that fold, and norms that do not --------------------------------------------------------------------
class _MaxNorm(torch.nn.Module):
    """A norm-like module whose gain is not a per-channel weight over x / rms(x): no fold fits it."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x / x.abs().amax(-1, keepdim=True)


def test_the_form_of_a_norm_is_found_from_its_behaviour() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from llmquant.model.patterns import NormForm, norm_form

    hidden = 32
    assert norm_form(LlamaRMSNorm(hidden), hidden) == NormForm("rms", 0.0)
    assert norm_form(GemmaRMSNorm(hidden), hidden) == NormForm("rms", 1.0)  # (1 + w) * x / rms(x)
    layer_norm = torch.nn.LayerNorm(hidden)
    with torch.no_grad():
        layer_norm.bias.uniform_(-1, 1)
    assert norm_form(layer_norm, hidden) == NormForm("layer", 0.0)
    assert norm_form(_MaxNorm(hidden), hidden) is None


def test_smoothing_folds_into_norms_with_a_gain_offset(calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    """Gemma 2: w' = (1 + w) / s - 1 keeps the function (a fold of w / s changed it by 0.37-0.56)."""
    from transformers import Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    reference = logits(model, eval_ids)
    llmquant.quantize(model, {"scheme": "none", "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]},
                      calib=calib_ids, progress=False)
    assert relative_error(reference, logits(model, eval_ids)) < 1e-4
    offsets = {g["producer"]: g["producer_offset"] for g in model.llmquant_manifest.results["smooth_groups"]}
    assert offsets == {"input_layernorm": 1.0, "pre_feedforward_layernorm": 1.0, "self_attn.v_proj": 0.0,
                       "mlp.up_proj": 0.0}


def test_a_norm_no_fold_fits_is_left_out_and_said(calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    model = make_model("llama")
    for layer in model.model.layers:
        layer.post_attention_layernorm = _MaxNorm(64)
    reference = logits(model, eval_ids)
    llmquant.quantize(model, {"scheme": "none", "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]},
                      calib=calib_ids, progress=False)
    assert relative_error(reference, logits(model, eval_ids)) < 1e-4
    results = model.llmquant_manifest.results
    assert "post_attention_layernorm" not in {g["producer"] for g in results["smooth_groups"]}
    assert "no scale folds into it" in results["not_smoothed"]["mlp.gate_proj"]


# --- smoothing through an online rotation (SmoothRot) ---------------------------------------------------------
A4_PER_TOKEN = QuantSpec(bits=4, granularity="token", dynamic=True)


def _rotated_pair(n_in: int = 64, n_out: int = 32) -> tuple[torch.nn.ModuleDict, Rotation]:
    """up (Linear) -> down (Linear rotating its input online by a Hadamard), as QuaRot's R4 leaves them."""
    torch.manual_seed(0)
    layer = torch.nn.ModuleDict({"up": torch.nn.Linear(16, n_in, bias=False),
                                 "down": torch.nn.Linear(n_in, n_out, bias=False)})
    rotation = Rotation(n_in, randomize=True, seed=3)
    with torch.no_grad():
        layer["down"].weight.copy_(rotation.apply(layer["down"].weight))  # W Q, as rotate_layer stores it
    attach_input_rotation(layer["down"], rotation)
    return layer, rotation


@pytest.mark.parametrize("rotations", [["R1", "R2", "R3", "R4"], ["R1", "R2", "R3", "R4", "R5"]], ids="+".join)
@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smoothing_through_an_online_rotation_keeps_the_float_function(rotations: list[str], alpha: float | str,
                                                                      calib_ids: torch.Tensor,
                                                                      eval_ids: torch.Tensor) -> None:
    """QuaRot, then up -> down smoothed before down_proj's online Hadamard (R4), and v -> o before o_proj's (R5,
    grouped-query heads): the same function, and the rotations are still there."""
    model = make_model("llama")
    reference = logits(model, eval_ids)
    recipe = {"scheme": "none", "pre_opts": [{"name": "quarot", "rotations": rotations},
                                             {"name": "smooth_fc_fc", "alpha": alpha}]}
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    assert relative_error(reference, logits(model, eval_ids)) < 1e-4
    rotated = {"mlp.up_proj": "hadamard(128", **({"self_attn.v_proj": "hadamard(64"} if "R5" in rotations else {})}
    for layer in model.llmquant_manifest.layers:
        rows = {row["producer"]: row for row in layer["smoothing"]}
        assert set(rows) == {"self_attn.v_proj", "mlp.up_proj"} and layer["equivalence_error"] < 1e-5
        assert {p: r["before_online_rotation"][:len(rotated[p])] for p, r in rows.items()
                if "before_online_rotation" in r} == rotated
    assert model.model.layers[0].mlp.down_proj.input_rotation is not None


def test_statistics_and_weights_of_a_rotated_reader_are_taken_before_its_rotation() -> None:
    layer, rotation = _rotated_pair()
    group = SmoothGroup("up", "linear", ("down",))
    collector = GroupStatsCollector(layer, [group])
    x = torch.randn(8, 16)
    layer["down"](layer["up"](x))
    (stats,) = collector.close()
    torch.testing.assert_close(stats.act_absmax, layer["up"](x).detach().abs().amax(dim=0))
    unrotated = rotation.apply(layer["down"].weight.detach().double(), inverse=True)
    torch.testing.assert_close(weight_absmax(layer, group).double(), unrotated.abs().amax(dim=0))


def test_smoothing_before_the_rotation_spreads_less_of_a_massive_channel() -> None:
    """A massive channel that the Hadamard spreads over every rotated channel sets each token's 4-bit step;
    scaling it down before the rotation (SmoothRot) lowers the quantized output error; the error the search
    scores is the one the rotated reader computes."""
    layer, rotation = _rotated_pair()
    group = SmoothGroup("up", "linear", ("down",))
    x = torch.randn(256, 64)
    x[:, 5] += 100.0
    stats = GroupStats(act_absmax=x.abs().amax(dim=0), tokens=x)
    specs = {"down": (None, A4_PER_TOKEN)}
    flat = torch.ones(64, dtype=torch.float64)
    scales = smoothing_scales(stats.act_absmax, weight_absmax(layer, group), 0.5)
    before = quantized_group_error(layer, group, stats, flat, specs)
    after = quantized_group_error(layer, group, stats, scales, specs)
    assert after < 0.5 * before
    unrotated = rotation.apply(layer["down"].weight.detach().double(), inverse=True).float()
    smoothed_in = rotation.apply(x / scales.float())
    direct = fake_quantize(smoothed_in, A4_PER_TOKEN) @ rotation.apply(unrotated * scales.float()).T - x @ unrotated.T
    assert after == pytest.approx(float(direct.double().pow(2).sum()), rel=1e-3)
    apply_smoothing(layer, group, scales)  # the stored weight becomes (W diag(s)) Q
    torch.testing.assert_close(layer["down"].weight.detach(), rotation.apply(unrotated * scales.float()),
                               rtol=1e-5, atol=1e-6)


def test_the_search_scores_float32_rotations_as_the_float64_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The alpha search rotates its candidates in float32 (`Rotation.apply_float32`): every alpha's error within 1e-5
    of the float64 rotation's, and the same alpha chosen, through a randomized Hadamard with a massive channel."""
    layer, _ = _rotated_pair()
    group = SmoothGroup("up", "linear", ("down",))
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(7))
    x[:, 5] += 100.0
    stats = GroupStats(act_absmax=x.abs().amax(dim=0), tokens=x)
    specs = {"down": (None, A4_PER_TOKEN)}
    w_max = weight_absmax(layer, group)

    def errors() -> list[float]:
        return [quantized_group_error(layer, group, stats, smoothing_scales(stats.act_absmax, w_max, alpha), specs)
                for alpha in AUTO_GRID]

    fast, fast_choice = errors(), choose_alpha(layer, group, stats, specs)[0]
    monkeypatch.setattr(Rotation, "apply_float32", lambda self, x: self.apply(x.double()).float())
    exact, exact_choice = errors(), choose_alpha(layer, group, stats, specs)[0]
    assert fast == pytest.approx(exact, rel=1e-5) and fast_choice == exact_choice


def test_readers_rotating_their_input_differently_share_no_scale() -> None:
    layer, _ = _rotated_pair()
    layer["plain"] = torch.nn.Linear(64, 8, bias=False)
    with pytest.raises(LlmquantError, match="rotate their input differently"):
        group_rotation(layer, SmoothGroup("up", "linear", ("down", "plain")))


def test_awq_through_an_online_rotation_clips_on_the_tokens_the_weight_multiplies(calib_ids: torch.Tensor) -> None:
    """AWQ scales up -> down before down_proj's online rotation too (the layer's function kept), and its clipping
    search gets the tokens the stored weight multiplies: (x / s) Q, with (x / s) Q (W s Q)^T = x W^T."""
    layer, rotation = _rotated_pair()
    group = SmoothGroup("up", "linear", ("down",))
    x = torch.randn(128, 64)
    x[:, 5] += 50.0
    unrotated = rotation.apply(layer["down"].weight.detach().double(), inverse=True).float()
    stats = GroupStats(act_absmax=x.abs().amax(dim=0), tokens=x, act_absmean=x.abs().mean(dim=0))
    w4_g16 = QuantSpec(bits=4, granularity="group", group_size=16)
    _, tokens = scale_group(layer, group, stats, {"down": (w4_g16, None)})
    torch.testing.assert_close(tokens @ layer["down"].weight.detach().T, x @ unrotated.T, rtol=1e-4, atol=1e-3)
    model = make_model("llama")
    recipe = {"scheme": "w_int4_per_group_sym", "group_size": 16, "algorithm": "awq", "pre_opts": [{"name": "quarot"}]}
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    layer0 = model.llmquant_manifest.layers[0]
    assert "mlp.up_proj" in {row["producer"] for row in layer0["smoothing"]} and layer0["equivalence_error"] < 1e-5


def test_norm_groups_are_smoothed_before_r6_in_the_residual_streams_own_basis(calib_ids: torch.Tensor,
                                                                              eval_ids: torch.Tensor) -> None:
    """Without R1 the norms' readers rotate their input online (R6): the scales fold into the norm's gain and act
    before the rotation, on the channels the norm wrote."""
    model = make_model("llama")
    reference = logits(model, eval_ids)
    recipe = {"scheme": "none", "pre_opts": [{"name": "quarot", "rotations": ["R2", "R3", "R4", "R6"]},
                                             {"name": "smoothquant", "alpha": "auto"}]}
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    assert relative_error(reference, logits(model, eval_ids)) < 1e-4
    rows = {row["producer"]: row for row in model.llmquant_manifest.layers[0]["smoothing"]}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        assert rows[norm]["before_online_rotation"].startswith("hadamard(64")
        assert rows[norm]["outlier_ratio_after"] < rows[norm]["outlier_ratio_before"]


def test_readers_of_one_input_spec_share_its_quantized_input() -> None:
    """The group's error with q/k/v-like readers that quantize one input alike (4-bit per token, a clip ratio
    searched per token) is the sum of each reader's error scored alone, to the bit: one quantized input serves
    them all."""
    torch.manual_seed(0)
    layer = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(64), "q": torch.nn.Linear(64, 64, bias=False),
                                 "k": torch.nn.Linear(64, 16, bias=False), "v": torch.nn.Linear(64, 16, bias=False)})
    x = torch.randn(300, 64) * (1 + 10 * (torch.rand(64) > 0.9))
    stats = GroupStats(act_absmax=x.abs().amax(dim=0), tokens=x)
    clipped = A4_PER_TOKEN.model_copy(update={"clip_grid": (1.0, 0.9, 0.8)})
    specs = {name: (QuantSpec(bits=4, granularity="channel"), clipped) for name in ("q", "k", "v")}
    scales = smoothing_scales(stats.act_absmax, weight_absmax(layer, SmoothGroup("norm", "norm", ("q", "k", "v"))),
                              0.5)
    together = quantized_group_error(layer, SmoothGroup("norm", "norm", ("q", "k", "v")), stats, scales, specs)
    alone = [quantized_group_error(layer, SmoothGroup("norm", "norm", (name,)), stats, scales, specs)
             for name in ("q", "k", "v")]
    assert together == (alone[0] + alone[1]) + alone[2]
    assert together > 0

"""Clip ratios of dynamic activations and the KV cache: the clipped quantizer's arithmetic, the integer path giving the
simulation's bits, the search on held-out samples choosing the ratio with the least held-out NLL and setting it, the
ratio surviving save/load, and bad inputs as one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import llmquant
from conftest import VOCAB, logits, make_model
from llmquant.errors import LlmquantError
from llmquant.nn.int8_linear import input_codes
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.pipeline.clip_search import mean_nll
from llmquant.quant import QuantSpec, fake_quantize

W4A4 = "w_int4_per_channel_sym_a_int4_per_token_dynamic"


def test_a_clip_ratio_shrinks_the_range_and_clamps_beyond_it() -> None:
    x = torch.tensor([[-8.0, -1.0, 0.3, 2.0, 4.0]])
    spec = QuantSpec(bits=4, granularity="token", dynamic=True, clip_ratio=0.5)
    scale = 0.5 * 8.0 / 7  # r * absmax / qmax
    expected = torch.clamp(torch.round(x / scale), -8, 7) * scale
    assert torch.allclose(fake_quantize(x, spec), expected)
    assert fake_quantize(x, spec)[0, 0] == -8 * scale  # -8.0 clamps to the lowest code
    assert spec.describe() == "int4-sym-per-token-dynamic-clip0.5"


def test_the_integer_path_gives_the_simulations_codes_with_a_clip_ratio() -> None:
    torch.manual_seed(0)
    rows = torch.randn(16, 64) * torch.linspace(0.1, 5, 64)
    spec = QuantSpec(bits=4, granularity="token", dynamic=True, clip_ratio=0.8)
    codes, scale = input_codes(rows, "token", None, int(spec.qmin), int(spec.qmax), 0.8)
    assert torch.equal(codes * scale, fake_quantize(rows, spec))
    assert codes.min() >= -8 and codes.max() <= 7


def _quantized(calib_ids: torch.Tensor, **recipe: object) -> torch.nn.Module:
    model = make_model("llama")
    fields = {"scheme": W4A4, "kv_cache": "int4_per_token_asym", "pre_opts": [{"name": "quarot"}],
              "clip_search": {"samples": 2}, **recipe}
    llmquant.quantize(model, fields, calib=calib_ids, progress=False)
    return model


@pytest.fixture
def calib6() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(5))


def test_the_search_keeps_the_ratio_with_the_least_held_out_nll_and_sets_it(calib6: torch.Tensor) -> None:
    model = _quantized(calib6)
    found = model.llmquant_manifest.results["clip_search"]
    assert found["samples"] == 2 and found["grid"] == [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7]
    for kind in ("activations", "kv_cache"):
        ppl = found[kind]["ppl_by_ratio"]
        assert len(ppl) == 7 and ppl[f"{found[kind]['ratio']:g}"] == min(ppl.values())
    ratios = {m.input_spec.clip_ratio for m in model.modules() if isinstance(m, QuantLinear) and m.input_spec}
    kv = {m.spec.clip_ratio for m in model.modules() if isinstance(m, KVCacheQuantizer)}
    assert ratios == {found["activations"]["ratio"]} and kv == {found["kv_cache"]["ratio"]}
    held_out_ppl = math.exp(mean_nll(model, calib6[-2:]))  # the model as left: the chosen ratios
    assert held_out_ppl == pytest.approx(found["kv_cache"]["ppl_by_ratio"][f"{found['kv_cache']['ratio']:g}"],
                                         rel=1e-4)


def test_clipped_quantizers_run_the_same_on_the_int8_runtime(calib6: torch.Tensor, eval_ids: torch.Tensor) -> None:
    model = _quantized(calib6, kv_cache=None, clip_search={"samples": 2, "grid": [0.8]})
    simulated = logits(model, eval_ids)
    set_runtime(model, "int8")
    assert torch.allclose(logits(model, eval_ids), simulated, rtol=1e-4, atol=1e-4)


def test_the_clip_ratio_survives_save_and_load(calib6: torch.Tensor, eval_ids: torch.Tensor, tmp_path: Path) -> None:
    model = _quantized(calib6, clip_search={"samples": 2, "grid": [0.85]})
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake")
    assert torch.equal(logits(loaded, eval_ids), logits(model, eval_ids))
    specs = {m.input_spec.clip_ratio for m in loaded.modules() if isinstance(m, QuantLinear) and m.input_spec}
    assert specs == {0.85}


@pytest.mark.parametrize(("fields", "message"), [
    ({"clip_search": {"grid": [1.5]}}, "recipe field 'clip_search.grid' = [1.5]: clip ratios must be in (0, 1], "
                                       "got [1.5]"),
    ({"clip_search": {"samples": 0}}, "recipe field 'clip_search.samples' = 0: Input should be greater than or "
                                      "equal to 1"),
    ({"clip_search": {"by": "layer"}}, "recipe field 'clip_search.by' = 'layer': Input should be 'model' or 'input'"),
])
def test_bad_clip_search_fields_are_one_line_errors(fields: dict, message: str) -> None:
    with pytest.raises(LlmquantError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        llmquant.Recipe.build(**fields)


def test_holding_out_all_samples_is_refused(calib_ids: torch.Tensor) -> None:
    with pytest.raises(LlmquantError, match="clip_search holds out 4 calibration samples, but only 4 were given"):
        _quantized(calib_ids, clip_search={"samples": 4})


def test_a_clip_ratio_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"clip_ratio must be in \(0, 1\], got 0.0"):
        QuantSpec(clip_ratio=0.0)


@pytest.mark.parametrize("target", ["vllm", "transformers"])
def test_a_serving_target_refuses_clipped_dynamic_quantizers(target: str) -> None:
    from llmquant.export.targets import check_target

    recipe = llmquant.Recipe.build(scheme=W4A4, clip_search={})
    fixed = llmquant.Recipe.build(scheme=W4A4, activation_clip=0.9)
    for refused in (recipe, fixed):
        with pytest.raises(LlmquantError, match=f"--target {target}: {target} computes dynamic scales from the whole "
                                                "range of each tensor: the clip ratios of the dynamic quantizers "
                                                r"\(clip_search, activation_clip, activation_clip_grid, "
                                                r"kv_cache_clip, kv_cache_clip_grid\) would be dropped"):
            check_target(target, refused)
        check_target("fake", refused)  # llmquant's own loader runs them
    static_kv = llmquant.Recipe.build(scheme="w_fp8_per_channel_a_fp8_per_token_dynamic", kv_cache="fp8_per_tensor",
                                      clip_search={"activations": False}, kv_cache_clip=0.9)
    check_target(target, static_kv)  # a static cache's clipped scales are plain k_scale / v_scale
    static_inputs = llmquant.Recipe.build(scheme="w_int8_per_channel_a_int8_per_tensor_static", activation_clip=0.9)
    check_target(target, static_inputs)  # so is a static input scale


def test_a_static_kv_cache_clip_scales_its_calibrated_scales_and_they_are_what_the_checkpoint_stores(
        calib6: torch.Tensor, eval_ids: torch.Tensor, tmp_path: Path) -> None:
    from llmquant.nn.kv_cache import set_kv_clip

    fields = {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "kv_cache": "int8_per_tensor",
              "pre_opts": []}
    unclipped = _quantized(calib6[:4], **fields, clip_search=None)
    calibrated = {n: (m.k_scale.clone(), m.v_scale.clone()) for n, m in unclipped.named_modules()
                  if isinstance(m, KVCacheQuantizer)}
    assert set_kv_clip(unclipped, 0.8) == len(calibrated) and set_kv_clip(unclipped, 0.5) == len(calibrated)
    for name, (k, v) in calibrated.items():
        module = unclipped.get_submodule(name)
        assert torch.allclose(module.k_scale, 0.5 * k) and torch.allclose(module.v_scale, 0.5 * v)
        assert module.spec.clip_ratio == 0.5
    searched = _quantized(calib6, **fields, clip_search={"samples": 2, "activations": False})
    found = searched.llmquant_manifest.results["clip_search"]
    assert "activations" not in found and len(found["kv_cache"]["ppl_by_ratio"]) == 7
    ratio = found["kv_cache"]["ratio"]
    llmquant.save(searched, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake")
    assert torch.equal(logits(loaded, eval_ids), logits(searched, eval_ids))  # the clipped scales were stored
    scales = [m.k_scale for m in loaded.modules() if isinstance(m, KVCacheQuantizer)]
    assert scales and all(torch.equal(a, m.k_scale) for a, m in zip(scales, (
        m for m in searched.modules() if isinstance(m, KVCacheQuantizer)), strict=True))
    assert ratio in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def test_the_clip_search_flag_and_the_learn_rotations_flag_reach_the_recipe() -> None:
    from llmquant.cli import _recipe_from_args, build_parser

    args = build_parser().parse_args(["quantize", "--scheme", W4A4, "--pre-opt", "quarot", "--learn-rotations", "7",
                                      "--clip-search", "--output", "unused"])
    recipe = _recipe_from_args(args)
    assert recipe.clip_search is not None and recipe.clip_search.samples == 4
    assert recipe.quarot().learn.iterations == 7


def test_fixed_clip_ratios_are_on_every_input_and_kv_cache_quantizer_from_the_start(
        calib6: torch.Tensor, eval_ids: torch.Tensor) -> None:
    fixed = _quantized(calib6, clip_search=None, activation_clip=0.8, kv_cache_clip=0.9)
    inputs = {m.input_spec.clip_ratio for m in fixed.modules() if isinstance(m, QuantLinear) and m.input_spec}
    assert inputs == {0.8} and {m.spec.clip_ratio for m in fixed.modules() if isinstance(m, KVCacheQuantizer)} == {0.9}
    # round to nearest with dynamic ranges: the same model as the ratios set after quantization
    from llmquant.nn.kv_cache import set_kv_clip
    from llmquant.nn.quant_linear import set_input_clip

    after = _quantized(calib6, clip_search=None)
    assert set_input_clip(after, 0.8) > 0 and set_kv_clip(after, 0.9) > 0
    assert torch.equal(logits(fixed, eval_ids), logits(after, eval_ids))
    assert not torch.equal(logits(fixed, eval_ids), logits(_quantized(calib6, clip_search=None), eval_ids))
    assert "activation_clip" not in llmquant.Recipe.build(scheme=W4A4).model_dump()  # (unset: not written)


def test_an_override_clips_its_targets_inputs_with_its_own_ratio(calib6: torch.Tensor, eval_ids: torch.Tensor) -> None:
    """``overrides: [{targets, scheme, activation_clip}]``: those Linears' inputs with their ratio, the others with
    the recipe's; the same model as the ratios set after round to nearest; a serving target refuses it; out of (0, 1]
    is one line; unset it is not written."""
    override = {"targets": ["re:.*down_proj"], "scheme": W4A4, "activation_clip": 0.6}
    model = _quantized(calib6, clip_search=None, activation_clip=0.8, overrides=[override])
    ratios = {name.rsplit(".", 1)[-1]: m.input_spec.clip_ratio for name, m in model.named_modules()
              if isinstance(m, QuantLinear) and m.input_spec}
    assert ratios["down_proj"] == 0.6 and {r for n, r in ratios.items() if n != "down_proj"} == {0.8}
    after = _quantized(calib6, clip_search=None, activation_clip=0.8)
    for name, module in after.named_modules():
        if name.endswith("down_proj"):
            module.set_input_spec(module.input_spec.model_copy(update={"clip_ratio": 0.6}))
    assert torch.equal(logits(model, eval_ids), logits(after, eval_ids))
    from llmquant.export.targets import check_target

    with pytest.raises(LlmquantError, match="the clip ratios of the dynamic quantizers"):
        check_target("vllm", llmquant.Recipe.build(scheme=W4A4, overrides=[override]))
    with pytest.raises(LlmquantError, match=r"recipe field 'overrides.0.activation_clip' = 0: Input should be greater "
                                            "than 0"):
        llmquant.Recipe.build(overrides=[{**override, "activation_clip": 0}])
    assert "activation_clip" not in llmquant.Recipe.build(overrides=[{"targets": ["Linear"], "scheme": W4A4}]
                                                          ).model_dump()["overrides"][0]


def test_a_fixed_clip_ratio_shrinks_calibrated_scales_and_gptq_sees_the_clipped_inputs(calib6: torch.Tensor) -> None:
    static = {"scheme": "w_int8_per_channel_a_int8_per_tensor_static", "kv_cache": "int8_per_tensor",
              "pre_opts": [], "clip_search": None, "calib": {"propagate": "float"}}  # (the same inputs for both)
    plain, clipped = _quantized(calib6, **static), _quantized(calib6, **static, activation_clip=0.5, kv_cache_clip=0.5)
    for kind, names in ((QuantLinear, ("input_scale",)), (KVCacheQuantizer, ("k_scale", "v_scale"))):
        pairs = [(a, b) for a, b in zip(plain.modules(), clipped.modules(), strict=True) if isinstance(a, kind)]
        assert pairs and all(torch.allclose(getattr(b, n), 0.5 * getattr(a, n)) for a, b in pairs for n in names)
    def first_codes(quantized_inputs: bool, **clip: float) -> torch.Tensor:  # (the first Linear: the same inputs)
        model = _quantized(calib6, algorithm="gptq", gptq={"quantized_inputs": quantized_inputs}, clip_search=None,
                           kv_cache=None, **clip)
        return model.model.layers[0].self_attn.q_proj.codes()

    assert not torch.equal(first_codes(True), first_codes(True, activation_clip=0.6))  # Hessians of clipped inputs
    assert torch.equal(first_codes(False), first_codes(False, activation_clip=0.6))  # of the unquantized ones


def test_a_fixed_clip_ratio_outside_zero_one_is_a_one_line_error_and_the_flags_reach_the_recipe() -> None:
    from llmquant.cli import _recipe_from_args, build_parser

    with pytest.raises(LlmquantError, match=r"recipe field 'activation_clip' = 1\.5: Input should be less than or "
                                            "equal to 1"):
        llmquant.Recipe.build(activation_clip=1.5)
    args = build_parser().parse_args(["quantize", "--scheme", W4A4, "--activation-clip", "0.9", "--kv-cache-clip",
                                      "0.95", "--output", "unused"])
    recipe = _recipe_from_args(args)
    assert (recipe.activation_clip, recipe.kv_cache_clip) == (0.9, 0.95)


def test_dynamic_inputs_are_the_linears_that_read_one_tensor_grouped_by_name(calib6: torch.Tensor) -> None:
    from llmquant.pipeline.clip_search import dynamic_inputs

    model = _quantized(calib6, clip_search=None)
    groups = dynamic_inputs(model, calib6[:1])
    layers = len(model.model.layers)
    assert {name: len(linears) for name, linears in groups.items()} == {
        "q_proj,k_proj,v_proj": 3 * layers, "o_proj": layers, "gate_proj,up_proj": 2 * layers, "down_proj": layers}
    assert groups["o_proj"] == [layer.self_attn.o_proj for layer in model.model.layers]


def test_an_input_is_one_tensor_unchanged_between_its_readers() -> None:
    from types import SimpleNamespace

    from llmquant.pipeline.clip_search import dynamic_inputs
    from llmquant.quant.scheme import scheme_from_name

    class Toy(torch.nn.Module):  # one buffer rewritten in place between two readers, then read twice as it is
        def __init__(self) -> None:
            super().__init__()
            scheme = scheme_from_name("w_int8_per_channel_a_int8_per_token_dynamic")
            self.embed = torch.nn.Embedding(VOCAB, 8)
            self.first, self.second, self.third = (QuantLinear.from_linear(
                torch.nn.Linear(8, size), scheme.weights, scheme.input_activations) for size in (8, 8, VOCAB))

        def forward(self, ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
            buffer = self.embed(ids).clone()
            out = self.first(buffer)
            buffer.copy_(out)
            return SimpleNamespace(logits=self.second(buffer) + self.third(buffer)[..., :8].sum(-1, keepdim=True))

    groups = dynamic_inputs(Toy(), torch.arange(8)[None])
    assert {name: len(linears) for name, linears in groups.items()} == {"first": 1, "second,third": 2}


def test_the_search_by_input_refines_each_inputs_ratio_and_never_ends_worse(calib6: torch.Tensor) -> None:
    model = _quantized(calib6, clip_search={"samples": 2, "by": "input"})
    found = model.llmquant_manifest.results["clip_search"]
    by_input = found["activations_by_input"]
    assert list(by_input) == ["q_proj,k_proj,v_proj", "o_proj", "gate_proj,up_proj", "down_proj"]
    best = found["activations"]["ppl_by_ratio"][f"{found['activations']['ratio']:g}"]
    for name, search in by_input.items():  # a coordinate pass: each name's best is at most the one before it
        assert len(search["ppl_by_ratio"]) == 7 and search["ppl_by_ratio"][f"{search['ratio']:g}"] <= best
        best = search["ppl_by_ratio"][f"{search['ratio']:g}"]
        suffixes = tuple(f".{leaf}" for leaf in name.split(","))
        ratios = {m.input_spec.clip_ratio for n, m in model.named_modules()
                  if isinstance(m, QuantLinear) and n.endswith(suffixes)}
        assert ratios == {search["ratio"]}
    assert found["kv_cache"]["ppl_by_ratio"]["1"] == pytest.approx(best)  # (the KV search started from there)
    assert math.exp(mean_nll(model, calib6[-2:])) == pytest.approx(
        found["kv_cache"]["ppl_by_ratio"][f"{found['kv_cache']['ratio']:g}"], rel=1e-4)

"""A dynamic input's clip ratio chosen per token at run time (`QuantSpec.clip_grid`, a recipe's
``activation_clip_grid``; a dynamic KV cache's per token and head, ``kv_cache_clip_grid``): each token takes the
grid's ratio of least squared error, so its error is at most that of any fixed ratio of the grid; the simulation and
the int8 runtime choose the same ratios and give the same bits; the grid goes through a checkpoint and back; what
cannot take a grid says so in one line."""

from __future__ import annotations

import pytest
import torch

import llmquant
from conftest import logits, make_model
from llmquant.errors import LlmquantError
from llmquant.export.targets import check_recipe
from llmquant.nn import int8_linear as kernel
from llmquant.nn.kv_cache import KVCacheQuantizer, set_kv_clip
from llmquant.nn.quant_linear import QuantLinear, set_input_clip, set_runtime
from llmquant.quant.primitives import fake_quantize, searched_clip_ratios
from llmquant.quant.scheme import KV_CACHE, scheme_from_name
from llmquant.quant.spec import QuantSpec
from llmquant.recipe import Recipe

GRID = (0.9, 0.85, 0.8, 0.75, 0.7)
KV_GRID = (1.0, 0.95, 0.9, 0.85, 0.8)
W4A4_ASYM = "w_int4_per_channel_sym_a_uint4_per_token_asym_dynamic"
SCHEMES = [W4A4_ASYM, "w_int4_per_channel_sym_a_int4_per_token_dynamic",
           "w_int8_per_channel_a_int8_per_token_dynamic", "w_int8_per_channel_a_int8_per_tensor_dynamic",
           "w_int4_per_group_sym_a_int8_per_token_dynamic", "w_int4_per_group_sym_a_uint4_per_token_asym_dynamic"]


def _heavy_tailed(rows: int, seed: int) -> torch.Tensor:
    """Skewed Gaussian rows, every other one with an outlier 8 times the rest: a Gaussian row errs least with a tight
    clip, a row with an outlier with a loose one."""
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(seed)) + 0.5
    x[1::2, 0] = 8 * x[1::2].abs().amax(-1)
    return x


def _layer(scheme: str, grid: tuple[float, ...] = GRID) -> QuantLinear:
    linear = torch.nn.Linear(96, 80, bias=True)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(0))
    spec = scheme_from_name(scheme, 32, None)
    return QuantLinear.from_linear(linear, spec.weights, spec.input_activations.model_copy(update={"clip_grid": grid}))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize("gemv", ["1", "0"])
def test_the_int8_runtime_chooses_the_simulations_ratios_and_gives_its_bits(scheme: str, rows: int, gemv: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQUANT_GEMV", gemv)
    layer = _layer(scheme)
    assert layer.supports_int8
    x = _heavy_tailed(rows, rows)
    set_runtime(layer, "fake")
    simulated = layer(x)
    set_runtime(layer, "int8")
    assert torch.equal(simulated, layer(x))
    spec = layer.input_spec
    quantize = kernel.input_codes if spec.symmetric else kernel.asymmetric_input_codes
    codes, scale = quantize(x, spec.granularity, None, int(spec.qmin), int(spec.qmax), GRID)
    assert torch.equal(codes * scale, fake_quantize(x, spec))


@pytest.mark.parametrize("scheme", [W4A4_ASYM, "w_int4_per_channel_sym_a_int4_per_token_dynamic"])
def test_each_token_errs_no_more_than_with_any_fixed_ratio_of_the_grid(scheme: str) -> None:
    """Uniform tokens err least unclipped, Gaussian ones clipped: no one ratio suits both, each token's does."""
    spec = scheme_from_name(scheme).input_activations
    grid = (1.0, 0.9, 0.8, 0.7)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=generator) * 2 + 0.5
    x[0::2] = torch.rand(256, 96, generator=generator) * 6 - 2
    searched = (fake_quantize(x, spec.model_copy(update={"clip_grid": grid})) - x).pow(2).sum(-1)
    fixed = torch.stack([(fake_quantize(x, spec.model_copy(update={"clip_ratio": r})) - x).pow(2).sum(-1)
                         for r in grid])
    assert bool((searched <= fixed.min(0).values).all())
    best_fixed = fixed.sum(-1).min()  # the best single ratio for all the tokens
    assert float(searched.sum()) < 0.97 * float(best_fixed), (float(searched.sum()), float(best_fixed))
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    chosen = searched_clip_ratios(x, low, high, grid, spec.symmetric, int(spec.qmin), int(spec.qmax))
    assert set(chosen.flatten().tolist()) <= {torch.tensor(r).item() for r in grid} and chosen.unique().numel() > 1


def test_the_first_ratio_of_the_grid_wins_a_tie() -> None:
    """A zero row errs by nothing at every ratio: it takes the grid's first."""
    x = torch.zeros(2, 8)
    x[1] = torch.linspace(-1, 1, 8)
    chosen = searched_clip_ratios(x, x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0),
                                  (0.6, 1.0), True, -8, 7)
    assert chosen[0].item() == pytest.approx(0.6)


def test_a_recipe_with_a_grid_quantizes_saves_and_loads_to_the_same_logits(calib_ids: torch.Tensor,
                                                                          eval_ids: torch.Tensor, tmp_path) -> None:
    recipe = {"scheme": W4A4_ASYM, "activation_clip_grid": list(GRID)}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q_proj.input_spec.clip_grid == GRID and q_proj.input_spec.clip_ratio == 1.0
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")  # the int8 runtime
    assert loaded.get_submodule("model.layers.0.self_attn.q_proj").input_spec.clip_grid == GRID
    set_runtime(model, "fake")
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))
    fixed = llmquant.quantize(make_model("llama"), {"scheme": W4A4_ASYM, "activation_clip": 0.8}, calib=calib_ids,
                              progress=False)
    assert not torch.equal(logits(fixed, eval_ids), logits(model, eval_ids))
    assert set_input_clip(loaded, 0.8) > 0  # a fixed ratio replaces the grid
    assert loaded.get_submodule("model.layers.0.self_attn.q_proj").input_spec.clip_grid is None
    assert torch.equal(logits(loaded, eval_ids), logits(fixed, eval_ids))


@pytest.mark.parametrize(("fields", "message"), [
    ({"activation_clip_grid": [0.9]}, "at least two ratios in (0, 1]"),
    ({"activation_clip_grid": [0.9, 1.2]}, "at least two ratios in (0, 1]"),
    ({"activation_clip_grid": [0.9, 0.8], "activation_clip": 0.8}, "either activation_clip (0.8) or"),
    ({"activation_clip_grid": [0.9, 0.8], "clip_search": {"samples": 4}}, "clip_search would replace"),
    ({"activation_clip_grid": [0.9, 0.8], "scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic"}, "E4M3"),
])
def test_a_recipe_names_what_is_wrong_with_its_grid(fields: dict, message: str) -> None:
    with pytest.raises(LlmquantError) as err:
        Recipe.build(**{"scheme": W4A4_ASYM, **fields})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_grid_goes_to_dynamic_inputs_only_and_not_where_an_override_fixes_a_ratio() -> None:
    recipe = Recipe.build(scheme="w_int8_per_channel_a_int8_per_tensor_static", activation_clip_grid=[0.9, 0.8],
                          overrides=[{"targets": ["re:.*down_proj"], "scheme": W4A4_ASYM},
                                     {"targets": ["re:.*up_proj"], "scheme": W4A4_ASYM, "activation_clip": 0.7}])
    assert recipe.scheme_named(recipe.scheme).input_activations.clip_grid is None  # (static)
    assert recipe.scheme_named(W4A4_ASYM).input_activations.clip_grid == (0.9, 0.8)
    fixed = recipe.scheme_named(W4A4_ASYM, None, 0.7).input_activations
    assert fixed.clip_grid is None and fixed.clip_ratio == 0.7
    assert "activation_clip_grid" not in Recipe.build(scheme=W4A4_ASYM).model_dump()  # (the fingerprint stays)


def test_what_cannot_take_a_grid_says_so() -> None:
    spec = scheme_from_name(W4A4_ASYM).input_activations
    with pytest.raises(ValueError, match="needs a dynamic integer quantizer"):
        QuantSpec(**{**spec.model_dump(), "dynamic": False, "clip_grid": GRID})
    with pytest.raises(ValueError, match="either clip_ratio"):
        QuantSpec(**{**spec.model_dump(), "clip_ratio": 0.8, "clip_grid": GRID})
    with pytest.raises(ValueError, match="needs a dynamic integer quantizer"):  # (an FP8 cache, dynamic or not)
        QuantSpec(**{**KV_CACHE["fp8_per_tensor"].model_dump(), "dynamic": True, "clip_grid": GRID})
    for fields in ({"activation_clip_grid": list(GRID)},
                   {"kv_cache": "int4_per_token_asym", "kv_cache_clip_grid": list(KV_GRID)}):
        recipe = Recipe.build(scheme=W4A4_ASYM, **fields)
        for target in ("vllm", "transformers"):
            assert any(next(iter(fields)) in finding.message for finding in check_recipe(target, recipe))


@pytest.mark.parametrize("kv_cache", ["int4_per_token_asym", "int4_per_token_group16_asym", "int8_per_token",
                                      "int8_per_tensor_dynamic"])
def test_each_kv_token_errs_no_more_than_with_any_fixed_ratio_of_the_grid(kv_cache: str) -> None:
    """Keys ``[batch, heads, positions, head_dim]``, every other position with an outlier: the quantizer's keys and
    values are `fake_quantize`'s with the grid; per token and head (per tensor: over all) the squared error is at most
    that of each fixed ratio, and below it for some ratio somewhere (the grid chooses)."""
    spec = KV_CACHE[kv_cache]
    states = _heavy_tailed(2 * 3 * 10, 4)[:, :16].reshape(2, 3, 10, 16)
    quantizer = KVCacheQuantizer(spec.model_copy(update={"clip_grid": KV_GRID}))
    key, value = quantizer(states, states * 2)
    assert torch.equal(key, fake_quantize(states, quantizer.spec))
    assert torch.equal(value, fake_quantize(states * 2, quantizer.spec))
    per = (-1,) if spec.granularity in ("token", "group") else (0, 1, 2, 3)  # (a group of 16: the head here)
    error = (key - states).square().sum(per)
    strictly_better = False
    for ratio in KV_GRID:
        fixed = fake_quantize(states, spec.model_copy(update={"clip_ratio": ratio}))
        fixed_error = (fixed - states).square().sum(per)
        assert (error <= fixed_error * (1 + 1e-6)).all()
        strictly_better |= bool((error < fixed_error * (1 - 1e-3)).any())
    assert strictly_better


def test_a_kv_grid_quantizes_saves_and_loads_to_the_same_logits_and_runs_in_the_simulation(
        calib_ids: torch.Tensor, eval_ids: torch.Tensor, tmp_path) -> None:
    """An 8-bit per-token cache with a grid is not stored as codes (`supports_code_storage`): the int8 runtime's
    generation runs the simulation's cache and gives its tokens. (Without 1.0 in the grid: on the tiny model's keys
    every 8-bit token chose 1.0, the logits of no clip.)"""
    from llmquant.nn.kv_storage import supports_code_storage

    recipe = {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "kv_cache": "int8_per_token",
              "kv_cache_clip_grid": list(KV_GRID[1:])}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    quantizer = model.get_submodule("model.layers.0.self_attn").kv_cache_quantizer
    assert quantizer.spec.clip_grid == KV_GRID[1:] and not supports_code_storage(quantizer.spec)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")  # the int8 runtime
    assert loaded.get_submodule("model.layers.0.self_attn").kv_cache_quantizer.spec.clip_grid == KV_GRID[1:]
    set_runtime(model, "fake")
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))
    unclipped = llmquant.quantize(make_model("llama"), {**recipe, "kv_cache_clip_grid": None}, calib=calib_ids,
                                  progress=False)
    assert not torch.equal(logits(unclipped, eval_ids), logits(model, eval_ids))
    prompt = eval_ids[:1, :8]
    with torch.no_grad():
        generated = [m.generate(prompt, max_new_tokens=6, do_sample=False) for m in (model, loaded)]
    assert torch.equal(*generated)
    assert set_kv_clip(loaded, 0.9) > 0 and loaded.get_submodule(
        "model.layers.0.self_attn").kv_cache_quantizer.spec.clip_grid is None  # a fixed ratio replaces the grid


@pytest.mark.parametrize(("fields", "message"), [
    ({"kv_cache_clip_grid": [0.9]}, "kv_cache_clip_grid needs at least two ratios in (0, 1]"),
    ({"kv_cache_clip_grid": [0.9, 0.8], "kv_cache_clip": 0.95}, "either kv_cache_clip (0.95) or"),
    ({"kv_cache_clip_grid": [0.9, 0.8], "clip_search": {"samples": 4}}, "clip_search.kv_cache false"),
    ({"kv_cache_clip_grid": [0.9, 0.8], "kv_cache": None}, "has no KV cache; allowed: kv_cache int8_per_tensor_dyn"),
    ({"kv_cache_clip_grid": [0.9, 0.8], "kv_cache": "int8_per_tensor"}, "has a static KV cache; allowed"),
    ({"kv_cache_clip_grid": [0.9, 0.8], "kv_cache": "fp8_per_tensor"}, "has a static KV cache; allowed"),
])
def test_a_recipe_names_what_is_wrong_with_its_kv_grid(fields: dict, message: str) -> None:
    with pytest.raises(LlmquantError) as err:
        Recipe.build(**{"scheme": W4A4_ASYM, "kv_cache": "int4_per_token_asym", **fields})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert Recipe.build(scheme=W4A4_ASYM, kv_cache="int4_per_token_asym", kv_cache_clip_grid=[0.9, 0.8],
                        clip_search={"kv_cache": False}).scheme_named(W4A4_ASYM).kv_cache.clip_grid == (0.9, 0.8)


def test_the_cli_flag_reaches_the_recipe() -> None:
    from llmquant.cli import _recipe_from_args, build_parser

    args = build_parser().parse_args(["quantize", "--scheme", W4A4_ASYM, "--activation-clip-grid", "0.9", "0.8",
                                      "--kv-cache", "int4_per_token_asym", "--kv-cache-clip-grid", "1", "0.9",
                                      "--output", "unused"])
    recipe = _recipe_from_args(args)
    assert recipe.activation_clip_grid == (0.9, 0.8) and recipe.activation_clip is None
    assert recipe.kv_cache_clip_grid == (1.0, 0.9) and recipe.scheme_named(W4A4_ASYM).kv_cache.clip_grid == (1.0, 0.9)

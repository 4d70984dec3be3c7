"""A dynamic input's clip ratio chosen per token at run time (`QuantSpec.clip_grid`, a recipe's
``activation_clip_grid``): each token takes the grid's ratio of least squared error, so its error is at most that of
any fixed ratio of the grid; the simulation and the int8 runtime choose the same ratios and give the same bits; the
grid goes through a checkpoint and back; what cannot take a grid says so in one line."""

from __future__ import annotations

import pytest
import torch

import llmquant
from conftest import logits, make_model
from llmquant.errors import LlmquantError
from llmquant.export.targets import check_recipe
from llmquant.nn import int8_linear as kernel
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.quant_linear import QuantLinear, set_input_clip, set_runtime
from llmquant.quant.primitives import fake_quantize, searched_clip_ratios
from llmquant.quant.scheme import KV_CACHE, scheme_from_name
from llmquant.quant.spec import QuantSpec
from llmquant.recipe import Recipe

GRID = (0.9, 0.85, 0.8, 0.75, 0.7)
W4A4_ASYM = "w_int4_per_channel_sym_a_uint4_per_token_asym_dynamic"
SCHEMES = [W4A4_ASYM, "w_int4_per_channel_sym_a_int4_per_token_dynamic",
           "w_int8_per_channel_a_int8_per_token_dynamic", "w_int8_per_channel_a_int8_per_tensor_dynamic",
           "w_int4_per_group_sym_a_int8_per_token_dynamic"]


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
    with pytest.raises(LlmquantError, match="a KV cache takes a fixed clip ratio"):
        KVCacheQuantizer(KV_CACHE["int4_per_token_asym"].model_copy(update={"clip_grid": GRID}))
    recipe = Recipe.build(scheme=W4A4_ASYM, activation_clip_grid=list(GRID))
    for target in ("vllm", "transformers"):
        assert any("activation_clip_grid" in finding.message for finding in check_recipe(target, recipe))


def test_the_cli_flag_reaches_the_recipe() -> None:
    from llmquant.cli import _recipe_from_args, build_parser

    args = build_parser().parse_args(["quantize", "--scheme", W4A4_ASYM, "--activation-clip-grid", "0.9", "0.8",
                                      "--output", "unused"])
    recipe = _recipe_from_args(args)
    assert recipe.activation_clip_grid == (0.9, 0.8) and recipe.activation_clip is None

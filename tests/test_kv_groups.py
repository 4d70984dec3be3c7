"""A KV cache in groups of channels (`KV_CACHE["int4_per_token_group16_asym"]`): each token's keys and values of a head
quantized in groups of 16 channels, a scale and zero point each (KIVI's and Atom's finer KV groups)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

import llmquant
from conftest import logits, make_model
from llmquant.errors import LlmquantError
from llmquant.export.targets import check_recipe
from llmquant.model.model_map import detect_model_map
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.pipeline.layer_io import head_dim_of
from llmquant.quant.scheme import KV_CACHE
from llmquant.recipe import Recipe
from llmquant.testing import tiny_models

GROUP16 = "int4_per_token_group16_asym"
W4A4_GROUPS = "w_int4_per_group_sym_a_uint4_per_group_asym_dynamic"


def group_reference(states: torch.Tensor, group: int) -> torch.Tensor:
    """4-bit asymmetric min-max fake quantization of every ``group`` consecutive channels of each row, in float64."""
    rows = states.double().reshape(-1, group)
    low, high = rows.amin(-1, keepdim=True).clamp(max=0), rows.amax(-1, keepdim=True).clamp(min=0)
    scale = (high - low).clamp(min=1e-12) / 15
    zero = torch.round(-low / scale)
    codes = torch.clamp(torch.round(rows / scale) + zero, 0, 15)
    return ((codes - zero) * scale).reshape(states.shape)


def wide_head_states(seed: int = 0) -> torch.Tensor:
    """Keys ``[1, 2 heads, 10 positions, 64]`` whose four 16-channel blocks have ranges 1, 4, 16 and 64 times
    apart: a scale over the whole head spends its levels on the widest block."""
    states = torch.randn(1, 2, 10, 64, generator=torch.Generator().manual_seed(seed))
    return states * torch.tensor([1.0, 4.0, 16.0, 64.0]).repeat_interleave(16)


def test_each_group_of_16_channels_of_a_token_and_head_has_its_own_range() -> None:
    states = wide_head_states()
    key, value = KVCacheQuantizer(KV_CACHE[GROUP16])(states, 2 * states)
    torch.testing.assert_close(key.double(), group_reference(states, 16), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(value.double(), group_reference(2 * states, 16), rtol=1e-6, atol=1e-5)
    per_head, _ = KVCacheQuantizer(KV_CACHE["int4_per_token_asym"])(states, states)
    narrow = slice(0, 16)  # the block a head-wide scale crushes
    grouped_error = (key - states)[..., narrow].square().sum()
    head_error = (per_head - states)[..., narrow].square().sum()
    assert grouped_error < 0.01 * head_error, (grouped_error, head_error)
    assert (key - states).square().sum() < (per_head - states).square().sum()


def llama_with_heads(monkeypatch: pytest.MonkeyPatch, heads: int, kv_heads: int) -> str:
    """A tiny Llama (hidden size 64) with ``heads`` attention heads, as a family `make_model` builds for this test."""
    config = LlamaConfig(**tiny_models.fields(intermediate_size=128, num_attention_heads=heads,
                                              num_key_value_heads=kv_heads))
    name = f"llama_{heads}_heads"
    monkeypatch.setitem(tiny_models.FAMILIES, name, lambda: config)
    return name


@pytest.fixture
def wide_heads(monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny Llama with 2 heads of 32 channels (the suite's have 16): two KV groups a head."""
    return llama_with_heads(monkeypatch, heads=2, kv_heads=1)


def test_a_grouped_kv_recipe_quantizes_saves_and_loads_to_the_same_logits(
        wide_heads: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor, tmp_path: Path) -> None:
    """With a clip grid, centred keys and a float first position (the W4A4KV4 recipes' options): every attention's
    quantizer holds the grouped spec, a checkpoint keeps it, and the loaded model computes the same logits."""
    recipe = {"scheme": W4A4_GROUPS, "group_size": 16, "kv_cache": GROUP16, "kv_cache_clip_grid": [1.0, 0.9],
              "kv_cache_center_keys": True, "kv_cache_keep_first": 1}
    model = llmquant.quantize(make_model(wide_heads), recipe, calib=calib_ids, progress=False)
    specs = [m.spec for m in model.modules() if isinstance(m, KVCacheQuantizer)]
    assert len(specs) == 2 and all(s.granularity == "group" and s.group_size == 16 and s.clip_grid == (1.0, 0.9)
                                   for s in specs)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")
    assert [m.spec for m in loaded.modules() if isinstance(m, KVCacheQuantizer)] == specs
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))


def test_heads_the_group_does_not_divide_are_refused_before_any_layer_runs(calib_ids: torch.Tensor,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    narrow_heads = llama_with_heads(monkeypatch, heads=8, kv_heads=2)  # heads of 8 channels
    recipe = {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "kv_cache": GROUP16}
    with pytest.raises(LlmquantError, match=r"groups of 16 channels needs heads whose width is a multiple of 16; "
                                            r"this model's heads have 8; allowed: .*int4_per_token_asym"):
        llmquant.quantize(make_model(narrow_heads), recipe, calib=calib_ids, progress=False)


def test_the_head_width_comes_from_hidden_size_and_heads_where_nothing_names_it(
        calib_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(llama_with_heads(monkeypatch, heads=8, kv_heads=2))  # heads of 8 channels
    del model.config.head_dim
    for layer in model.model.layers:
        del layer.self_attn.head_dim
    assert head_dim_of(model, detect_model_map(model)) == 64 // 8
    recipe = {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "kv_cache": GROUP16}
    with pytest.raises(LlmquantError, match=r"this model's heads have 8; allowed"):
        llmquant.quantize(model, recipe, calib=calib_ids, progress=False)


def test_the_recipe_takes_the_grid_and_the_serving_targets_refuse_the_cache() -> None:
    recipe = Recipe.model_validate({"scheme": W4A4_GROUPS, "kv_cache": GROUP16, "kv_cache_clip_grid": [1.0, 0.9],
                                    "kv_cache_center_keys": True})
    assert recipe.scheme_named(recipe.scheme).kv_cache.group_size == 16
    assert any(f.refuse and "KV-cache" in f.message for f in check_recipe("vllm", recipe))
    with pytest.raises(ValueError, match="unknown kv cache 'int4_per_token_group8_asym'; allowed: .*" + GROUP16):
        Recipe.model_validate({"scheme": W4A4_GROUPS, "kv_cache": "int4_per_token_group8_asym"})

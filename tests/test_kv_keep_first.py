"""Float first positions of the KV cache (`Recipe.kv_cache_keep_first`, `llmquant.nn.kv_cache`; IntactKV's pivot
tokens): the first N entries of every cache stay float, the others are quantized as the spec says."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import llmquant
from conftest import logits, make_model, relative_error
from llmquant.export.targets import check_recipe
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.quant_linear import set_runtime
from llmquant.quant import fake_quantize
from llmquant.quant.scheme import KV_CACHE
from llmquant.recipe import Recipe

TOKEN = "w_int8_per_channel_a_int8_per_token_dynamic"
KV4 = {"scheme": TOKEN, "kv_cache": "int4_per_token_asym"}


def quantizers(model: torch.nn.Module) -> list[KVCacheQuantizer]:
    return [m for m in model.modules() if isinstance(m, KVCacheQuantizer)]


def states(seed: int = 0, sink: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[1, 2 heads, 16 positions, 8]``; the first position ``sink`` times larger."""
    generator = torch.Generator().manual_seed(seed)
    key, value = torch.randn(2, 1, 2, 16, 8, generator=generator)
    if sink:
        key[..., 0, :] *= sink
        value[..., 0, :] *= sink
    return key, value


@pytest.mark.parametrize("kv_cache", ["int4_per_token_asym", "int8_per_token", "int8_per_tensor_dynamic"])
def test_the_first_positions_stay_float_and_the_others_are_quantized_without_them(kv_cache: str) -> None:
    key, value = states(sink=50.0)
    spec = KV_CACHE[kv_cache]
    quantized_key, quantized_value = KVCacheQuantizer(spec, keep_first=2)(key, value)
    for got, states_in in ((quantized_key, key), (quantized_value, value)):
        assert torch.equal(got[..., :2, :], states_in[..., :2, :])
        assert torch.equal(got[..., 2:, :], fake_quantize(states_in[..., 2:, :], spec))
    kept = relative_error(key[..., 2:, :], quantized_key[..., 2:, :])
    every = relative_error(key[..., 2:, :], KVCacheQuantizer(spec)(key, value)[0][..., 2:, :])
    assert kept <= every  # (a per-tensor range no longer stretched by the sink: 20x smaller here)
    if kv_cache == "int8_per_tensor_dynamic":
        assert kept < 0.1 * every, (kept, every)


def test_a_static_scale_is_calibrated_on_the_quantized_positions_only() -> None:
    key, value = states(sink=50.0)
    quantizer = KVCacheQuantizer(KV_CACHE["int8_per_tensor"], keep_first=1)
    quantizer.start_observing()
    assert quantizer(key, value) == (key, value)
    quantizer(key[..., :1, :], value[..., :1, :])  # (a call of kept positions only: nothing to observe)
    quantizer.stop_observing()
    torch.testing.assert_close(quantizer.k_scale, key[..., 1:, :].abs().amax().reshape(1) / 127)
    torch.testing.assert_close(quantizer.v_scale, value[..., 1:, :].abs().amax().reshape(1) / 127)


def test_a_cache_no_longer_than_the_kept_positions_is_the_float_one() -> None:
    key, value = states()
    quantizer = KVCacheQuantizer(KV_CACHE["int4_per_token_asym"], keep_first=16)
    assert quantizer(key, value) == (key, value)


def test_kept_positions_lower_a_models_error_and_all_kept_is_the_float_cache(calib_ids: torch.Tensor,
                                                                           eval_ids: torch.Tensor) -> None:
    float_model = make_model("llama")
    reference = logits(float_model, eval_ids)
    without_cache = llmquant.quantize(copy.deepcopy(float_model), {"scheme": TOKEN}, calib=calib_ids, progress=False)
    errors = {}
    for keep in (0, 8, eval_ids.shape[1]):
        model = llmquant.quantize(copy.deepcopy(float_model), {**KV4, "kv_cache_keep_first": keep}, calib=calib_ids,
                                  progress=False)
        assert all(q.keep_first == keep for q in quantizers(model))
        errors[keep] = relative_error(reference, logits(model, eval_ids))
    assert errors[eval_ids.shape[1]] < errors[8] < errors[0], errors
    torch.testing.assert_close(logits(model, eval_ids), logits(without_cache, eval_ids), rtol=0, atol=1e-5)


def test_kept_positions_are_saved_and_loaded_with_identical_logits(calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                                                                   tmp_path: Path) -> None:
    model = llmquant.quantize(make_model("qwen2"), {**KV4, "kv_cache_keep_first": 3}, calib=calib_ids, progress=False)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")
    assert [q.keep_first for q in quantizers(loaded)] == [3, 3]
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))


def test_the_int8_runtime_keeps_such_a_cache_in_the_simulation_and_generates_its_tokens(
        calib_ids: torch.Tensor) -> None:
    from test_kv_cache_storage import generate, returned_cache, step_logits

    model = llmquant.quantize(make_model("llama"), {"scheme": TOKEN, "kv_cache": "int8_per_token",
                                                    "kv_cache_keep_first": 2}, calib=calib_ids, progress=False)
    prompt = calib_ids[:2, :12]
    simulated = generate(model, prompt)
    set_runtime(model, "int8")
    assert all(q.runtime == "fake" for q in quantizers(model))  # (no int8 codes: the first positions are float)
    stored = generate(model, prompt)
    assert returned_cache(stored).layers[0].keys.dtype == torch.float32
    assert torch.equal(stored.sequences, simulated.sequences)
    torch.testing.assert_close(step_logits(stored), step_logits(simulated), rtol=0, atol=1e-4)


def test_a_recipe_without_a_kv_cache_or_with_a_negative_count_is_refused() -> None:
    with pytest.raises(ValueError, match=r"kv_cache_keep_first 1 .* this recipe has no KV cache; allowed: kv_cache"):
        Recipe.model_validate({"scheme": TOKEN, "kv_cache_keep_first": 1})
    with pytest.raises(ValueError, match="kv_cache_keep_first"):
        Recipe.model_validate({**KV4, "kv_cache_keep_first": -1})
    assert "kv_cache_keep_first" not in Recipe.model_validate(KV4).model_dump()  # (0, the default, is not written)


@pytest.mark.parametrize("target", ["vllm", "transformers"])
def test_targets_other_than_fake_refuse_kept_positions(target: str) -> None:
    recipe = Recipe.model_validate({"scheme": TOKEN, "kv_cache": "fp8_per_tensor", "kv_cache_keep_first": 1})
    assert any(f.refuse and "kv_cache_keep_first" in f.message for f in check_recipe(target, recipe))
    assert not any("kv_cache_keep_first" in f.message for f in check_recipe("fake", recipe))


def test_the_cli_flag_keeps_positions_or_refuses_in_one_line(tiny_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from llmquant.cli import main

    common = ["quantize", "--model", str(tiny_dir), "--calib-samples", "2", "--seqlen", "32", "--no-eval",
              "--kv-cache-keep-first", "1"]
    assert main([*common, "--kv-cache", "int4_per_token_asym", "--output", str(tmp_path / "a")]) == 0
    loaded, _ = llmquant.load(tmp_path / "a", device="cpu")
    assert all(q.keep_first == 1 for q in quantizers(loaded))
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "kv_cache_keep_first" in error[0] and "no KV cache" in error[0]

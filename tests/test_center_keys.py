"""Centred keys (`Recipe.kv_cache_center_keys`, `llmquant.nn.kv_cache`): the KV cache quantizes the keys minus their
calibrated mean per (KV head, channel), which softmax attention does not see."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmquant
from conftest import logits, make_model, relative_error
from llmquant.errors import LlmquantError
from llmquant.export.targets import check_recipe
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.quant_linear import set_runtime
from llmquant.quant import fake_quantize
from llmquant.quant.scheme import KV_CACHE
from llmquant.recipe import Recipe

KV4 = {"scheme": "none", "kv_cache": "int4_per_token_asym", "kv_cache_center_keys": True}
TOKEN = "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic"


def quantizers(model: torch.nn.Module) -> list[KVCacheQuantizer]:
    return [m for m in model.modules() if isinstance(m, KVCacheQuantizer)]


def offset_keys(model: torch.nn.Module, offset: float = 10.0) -> torch.nn.Module:
    """Qwen2's k_proj has a bias: a large one on the channels RoPE turns slowest (the last of each half of a head)
    gives every key the shared offset real models' keys show."""
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.k_proj.bias.view(-1, 16)  # [kv heads, head_dim]
            slow = torch.tensor([5, 6, 7, 13, 14, 15])
            bias[:, slow] = offset * torch.randn(bias.shape[0], len(slow), generator=torch.Generator().manual_seed(3))
    return model


def attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, keys, values, is_causal=True)


def test_centring_keys_leaves_softmax_attention_unchanged_and_lowers_its_4bit_error() -> None:
    generator = torch.Generator().manual_seed(0)
    offset = 3.0 * torch.randn(2, 1, 16, generator=generator)  # per (head, channel), shared by every position
    keys = torch.randn(1, 2, 64, 16, generator=generator) + offset
    query, values = torch.randn(1, 2, 64, 16, generator=generator), torch.randn(1, 2, 64, 16, generator=generator)
    quantizer = KVCacheQuantizer(KV_CACHE["int4_per_token_asym"], center_keys=True)
    quantizer.start_observing()
    quantizer(keys, values)
    quantizer.stop_observing()
    torch.testing.assert_close(quantizer.k_mean, keys.mean(dim=(0, 2)), rtol=0, atol=1e-6)
    reference = attention(query, keys, values)
    quantizer.quantizing = False  # centred only: the same attention, to float32 rounding
    centred_keys, _ = quantizer(keys, values)
    assert relative_error(reference, attention(query, centred_keys, values)) < 1e-6
    quantizer.quantizing = True
    centred = relative_error(reference, attention(query, *quantizer(keys, values)))
    plain = relative_error(reference, attention(query, fake_quantize(keys, quantizer.spec),
                                                fake_quantize(values, quantizer.spec)))
    assert centred < 0.6 * plain, (centred, plain)


def test_a_model_with_centred_keys_computes_the_float_function_and_a_smaller_kv4_error(
    calib_ids: torch.Tensor, eval_ids: torch.Tensor
) -> None:
    float_model = offset_keys(make_model("qwen2"))
    reference = logits(float_model, eval_ids)
    errors = {}
    for center in (False, True):
        model = llmquant.quantize(copy.deepcopy(float_model), {**KV4, "kv_cache_center_keys": center},
                                  calib=calib_ids, progress=False)
        errors[center] = relative_error(reference, logits(model, eval_ids))
    rows = [row["center_keys"] for row in model.llmquant_manifest.layers]
    assert [row["kept"] for row in rows] == [True, True] and max(r["equivalence_error"] for r in rows) < 1e-5
    assert [row["positions"] for row in rows] == [calib_ids.numel()] * 2  # every calibration sample's keys
    assert errors[True] < 0.8 * errors[False], errors  # (the values' 4-bit error stays: about 0.047 here)
    for quantizer in quantizers(model):  # with nothing quantized, the centred model is the float one
        quantizer.quantizing = False
    assert relative_error(reference, logits(model, eval_ids)) < 1e-5


def test_the_mean_takes_every_calibration_sample_beyond_the_first_batch(eval_ids: torch.Tensor) -> None:
    """Round to nearest with dynamic inputs runs its one calibration pass on the first batch only (it learns nothing
    from the samples); the keys' mean is learned, so 12 samples (more than a batch of 8) are all seen."""
    calib = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(4))
    model = llmquant.quantize(make_model("llama"), {"scheme": TOKEN, "kv_cache_center_keys": True}, calib=calib,
                              progress=False)
    assert [row["center_keys"]["positions"] for row in model.llmquant_manifest.layers] == [12 * 16] * 2


def test_attention_with_sinks_keeps_its_keys_with_a_warning(calib_ids: torch.Tensor,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """gpt-oss adds a learned sink logit to each softmax: a shift of the keys' logits is not invisible there."""
    with caplog.at_level(logging.WARNING):
        model = llmquant.quantize(make_model("gpt_oss"), KV4, calib=calib_ids, progress=False)
    assert [row["center_keys"]["kept"] for row in model.llmquant_manifest.layers] == [False, False]
    assert all(quantizer.k_mean is None for quantizer in quantizers(model))
    assert "keys not centred" in caplog.text and "sinks" in caplog.text


def test_the_key_mean_is_saved_and_loaded_with_identical_logits(calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                                                                 tmp_path: Path) -> None:
    model = llmquant.quantize(offset_keys(make_model("qwen2")), KV4, calib=calib_ids, progress=False)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")
    assert all(q.center_keys and q.k_mean is not None for q in quantizers(loaded))
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))


def test_int8_storage_holds_the_centred_keys_and_generates_the_simulations_tokens(calib_ids: torch.Tensor) -> None:
    from test_kv_cache_storage import generate, returned_cache, step_logits

    model = llmquant.quantize(offset_keys(make_model("qwen2")), {"scheme": TOKEN, "kv_cache_center_keys": True},
                              calib=calib_ids, progress=False)
    prompt = calib_ids[:2, :12]
    simulated = generate(model, prompt)
    set_runtime(model, "int8")
    stored = generate(model, prompt)
    layer = returned_cache(stored).layers[0]
    keys = layer.keys.float() * layer.key_scales  # the stored keys are centred: their mean over positions is small
    assert keys.mean(dim=-2).abs().max() < 0.5 * quantizers(model)[0].k_mean.abs().max()
    assert torch.equal(stored.sequences, simulated.sequences)
    torch.testing.assert_close(step_logits(stored), step_logits(simulated), rtol=0, atol=1e-4)


@pytest.mark.parametrize(("recipe", "message"), [
    ({"scheme": "none", "kv_cache_center_keys": True}, "this recipe has no KV cache; allowed: kv_cache"),
    ({"scheme": "none", "kv_cache": "int8_per_tensor", "kv_cache_center_keys": True}, "a static KV cache"),
    ({**KV4, "calib": {"samples": 0}}, "needs them for the keys' mean"),
])
def test_recipes_that_cannot_centre_keys_are_refused_naming_what_is_allowed(recipe: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"kv_cache_center_keys|calib\.samples 0") as error:
        Recipe.model_validate(recipe)
    assert message in str(error.value)


@pytest.mark.parametrize("target", ["vllm", "transformers"])
def test_targets_other_than_fake_refuse_centred_keys(target: str) -> None:
    findings = check_recipe(target, Recipe.model_validate({"scheme": TOKEN, "kv_cache_center_keys": True}))
    assert any(f.refuse and "k_mean" in f.message for f in findings)
    assert not any("k_mean" in f.message for f in check_recipe("fake", Recipe.model_validate(KV4)))


def test_the_cli_flag_centres_keys_or_refuses_in_one_line(tiny_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from llmquant.cli import main

    common = ["quantize", "--model", str(tiny_dir), "--calib-samples", "2", "--seqlen", "32", "--no-eval",
              "--kv-cache-center-keys"]
    assert main([*common, "--kv-cache", "int8_per_token", "--output", str(tmp_path / "a")]) == 0
    loaded, _ = llmquant.load(tmp_path / "a", device="cpu")
    assert all(q.k_mean is not None for q in quantizers(loaded))
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "kv_cache_center_keys" in error[0] and "no KV cache" in error[0]


def test_a_cache_of_other_states_than_the_keys_refuses_centring_in_one_line(calib_ids: torch.Tensor) -> None:
    """DeepSeek-V3's int8 cache stores the keys' shared rope part with one head, where attention reads four: the
    simulation centres what attention reads, the cache cannot; it says so instead of broadcasting the mean."""
    from test_kv_cache_storage import generate

    model = llmquant.quantize(make_model("deepseek_v3"), {"scheme": TOKEN, "kv_cache_center_keys": True},
                              calib=calib_ids, progress=False)
    generate(model, calib_ids[:1, :8])  # the simulation runs
    set_runtime(model, "int8")
    with pytest.raises(LlmquantError, match=r"cannot lose a mean calibrated over \[4, 16\].*runtime 'fake'"):
        generate(model, calib_ids[:1, :8])

"""Attention in bfloat16 inside a float32 model (`llmquant.nn.attention_dtype`): close to the float32 function but
not equal (one rounding of q, k, v and p), float32 for one query position (a decode step), undone exactly by
"model", composed with the INT8 KV cache of the int8 runtime (in either order), chosen by `llmquant.load`,
``llmquant eval`` and ``llmquant bench``; bad choices get one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llmquant
from conftest import logits, make_model, relative_error
from llmquant.cli import main
from llmquant.errors import LlmquantError
from llmquant.nn.attention_dtype import attention_configs, set_attention_dtype
from llmquant.nn.kv_cache import enable_kv_quantization
from llmquant.testing.tiny_checkpoint import write_tiny_checkpoint


def test_bfloat16_attention_is_close_to_float32_and_model_restores_it(eval_ids: torch.Tensor) -> None:
    model = make_model("llama")
    reference = logits(model, eval_ids)
    set_attention_dtype(model, "bfloat16")
    assert {c._attn_implementation for c in attention_configs(model)} == {"sdpa+bfloat16"}
    rounded = logits(model, eval_ids)
    assert not torch.equal(rounded, reference)
    assert relative_error(reference, rounded) < 1e-2  # bfloat16 keeps 8 significant bits
    one_position = logits(model, eval_ids[:, :1])  # a decode step's shape: float32 attention
    set_attention_dtype(model, "model")
    assert torch.equal(logits(model, eval_ids), reference)
    assert torch.equal(logits(model, eval_ids[:, :1]), one_position)


def test_bfloat16_attention_composes_with_the_int8_kv_cache(calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                                                             tmp_path: Path) -> None:
    scheme = "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic"
    model = llmquant.quantize(make_model("llama"), scheme, calib=calib_ids, progress=False)
    directory = llmquant.save(model, None, tmp_path / "kv8")
    int8, _ = llmquant.load(directory)
    rounded, _ = llmquant.load(directory, attention="bfloat16")
    assert {c._attn_implementation for c in attention_configs(rounded)} == {"llmquant_sdpa+bfloat16"}
    assert relative_error(logits(int8, eval_ids), logits(rounded, eval_ids)) < 1e-2
    prompt = eval_ids[:1, :8]
    with torch.no_grad():  # decoding reads the int8 cache through the bfloat16 attention
        tokens = rounded.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 12)


def test_kv_quantization_enabled_after_the_switch_keeps_bfloat16_attention(eval_ids: torch.Tensor) -> None:
    model = make_model("llama")
    set_attention_dtype(model, "bfloat16")
    rounded = logits(model, eval_ids)
    enable_kv_quantization(model)  # (no quantizer on the attentions: the same function through llmquant's wrapper)
    assert {c._attn_implementation for c in attention_configs(model)} == {"llmquant_sdpa+bfloat16"}
    assert torch.equal(logits(model, eval_ids), rounded)
    set_attention_dtype(model, "model")
    assert {c._attn_implementation for c in attention_configs(model)} == {"llmquant_sdpa"}


def test_bad_attention_choices_get_one_clear_error() -> None:
    with pytest.raises(LlmquantError, match="unknown attention dtype 'float8'; allowed: model, bfloat16"):
        llmquant.load(None, attention="float8")
    model = make_model("llama")
    configs = attention_configs(model)
    configs[0]._attn_implementation = "eager"
    before = [config._attn_implementation for config in configs]
    with pytest.raises(LlmquantError, match="wraps sdpa attention; this model uses 'eager'"):
        set_attention_dtype(model, "bfloat16")
    assert [config._attn_implementation for config in configs] == before  # nothing half-switched


def test_the_command_line_chooses_the_attention_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    float_dir = write_tiny_checkpoint(tmp_path / "float")
    model, tokenizer = llmquant.load(float_dir)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    llmquant.quantize(model, "w_int8_per_channel_a_int8_per_token_dynamic", calib=ids, progress=False)
    w8a8 = llmquant.save(model, tokenizer, tmp_path / "w8a8")
    fast = ["--batch", "1", "--prompt", "16", "--decode", "2", "--repeats", "1", "--json"]
    assert main(["bench", "--model", str(w8a8), "--baseline", str(float_dir), "--attention", "bfloat16", *fast]) == 0
    out = capsys.readouterr().out
    assert "attention bfloat16" in out and json.loads(out.strip().splitlines()[-1])["attention"] == "bfloat16"
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(w8a8), "--attention", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err

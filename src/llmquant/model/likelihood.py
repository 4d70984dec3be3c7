"""The next-token negative log-likelihood of a causal language model: what perplexity and the clip search measure.

NLL(ids) = - sum over windows w and positions t >= 1 of log p(ids[w, t] | ids[w, :t]), from one forward of the
windows ``[n, T]`` without a KV cache; ``n * (T - 1)`` tokens are predicted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.device import device_of
from llmquant.errors import LlmquantError


@torch.no_grad()
def next_token_nll(model: nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """The summed NLL of ``model`` on token windows ``ids`` ``[n, T]`` (one forward, on the model's device) and the
    number of tokens it predicted; a NaN or inf is refused in one line."""
    ids = ids.to(device_of(model))
    logits = model(ids, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    if not torch.isfinite(nll):
        raise LlmquantError("the model produced NaN or inf logits: the perplexity would be meaningless")
    return float(nll), ids[:, 1:].numel()


def mean_nll(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of ``model`` on token ids ``[n, T]`` (one sample a forward)."""
    total, count = 0.0, 0
    for row in ids:
        nll, predicted = next_token_nll(model, row[None])
        total, count = total + nll, count + predicted
    return total / count

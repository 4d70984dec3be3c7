"""Perplexity over consecutive non-overlapping windows (the protocol of DESIGN.md).

ppl = exp(total NLL / number of predicted tokens), ``seqlen - 1`` predictions per window, windows
taken from the start of the tokenized evaluation text, at most ``max_windows`` of them.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmquant.errors import LlmquantError


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = False) -> float:
    """Perplexity of ``model`` on token windows ``[n, seqlen]`` (one window per forward)."""
    model.eval()
    total_nll, count = 0.0, 0
    for row in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        logits = model(row.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, row[1:], reduction="sum")
        if not torch.isfinite(nll):
            raise LlmquantError("the model produced NaN or inf logits: the perplexity would be meaningless")
        total_nll += float(nll)
        count += row.numel() - 1
    return math.exp(total_nll / count)


def timed_perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = False) -> tuple[float, float]:
    start = time.perf_counter()
    ppl = perplexity(model, windows, progress)
    return ppl, time.perf_counter() - start

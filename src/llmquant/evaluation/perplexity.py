"""Perplexity over consecutive non-overlapping windows (the protocol of DESIGN.md).

ppl = exp(total NLL / number of predicted tokens), ``seqlen - 1`` predictions per window, windows
taken from the start of the tokenized evaluation text, at most ``max_windows`` of them.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.device import device_of
from llmquant.model.likelihood import next_token_nll

GPU_BATCH = 8  # windows per forward on a GPU (one at a time on a CPU, where batching gains nothing)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = False, batch: int | None = None) -> float:
    """Perplexity of ``model`` on token windows ``[n, seqlen]``, on the device the model is on, ``batch`` windows
    per forward (default: `GPU_BATCH` on a GPU, 1 on a CPU). The windows are independent: batching changes only
    the rounding of the sums."""
    model.eval()
    device = device_of(model)
    batch = batch or (GPU_BATCH if device.type == "cuda" else 1)
    total_nll, count = 0.0, 0
    chunks = windows.split(batch)
    for chunk in tqdm(chunks, desc="perplexity", unit="batch" if batch > 1 else "window", disable=not progress):
        nll, predicted = next_token_nll(model, chunk)
        total_nll += nll
        count += predicted
    return math.exp(total_nll / count)


def timed_perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = False) -> tuple[float, float]:
    start = time.perf_counter()
    ppl = perplexity(model, windows, progress)
    return ppl, time.perf_counter() - start

"""Clipping ratios of the dynamic activation quantizers and of the KV cache, searched on held-out calibration samples.

A dynamic quantizer takes its range from the tensor itself; with a clip ratio r it takes r times that range and
clamps what lies beyond (`llmquant.quant.spec.QuantSpec.clip_ratio`): rounding error falls on every value, clamping
error on the few outliers. A static KV cache's scales, calibrated on the whole observed range, are multiplied by r
(`llmquant.nn.kv_cache.set_kv_clip`); static input scales keep the range their observer chose. QuaRot fixes
r = 0.9 for 4-bit activations and 0.95 for the 4-bit KV cache; here r is chosen on samples the calibration did not
see: for each r of the grid every dynamic input quantizer of the quantized model takes r and the next-token NLL of
the held-out samples is measured; the best r is kept; then the same for the KV cache, the inputs' ratio fixed (a
coordinate search, one ratio per kind for the whole model).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmquant.model.likelihood import next_token_nll
from llmquant.nn.kv_cache import set_kv_clip
from llmquant.nn.quant_linear import set_input_clip

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def mean_nll(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of ``model`` on token ids ``[n, T]`` (one sample a forward)."""
    total, count = 0.0, 0
    for row in ids:
        nll, predicted = next_token_nll(model, row[None])
        total, count = total + nll, count + predicted
    return total / count


def _search(model: nn.Module, held_out: torch.Tensor, apply, grid: tuple[float, ...],
            known: dict[float, float] | None = None) -> tuple[dict, float]:
    """Try every ratio of ``grid`` (those in ``known`` were measured already, in the same model state), keep the best;
    return what was measured and the best mean NLL."""
    nll = dict(known or {})
    for ratio in grid:
        if ratio not in nll:
            apply(model, ratio)
            nll[ratio] = mean_nll(model, held_out)
    nll = {ratio: nll[ratio] for ratio in grid}
    best = min(nll, key=lambda r: (nll[r], -r))  # ties: the larger ratio (less clamping)
    apply(model, best)
    return {"ratio": best, "ppl_by_ratio": {f"{r:g}": round(math.exp(v), 4) for r, v in nll.items()}}, nll[best]


def search_clip_ratios(model: nn.Module, held_out: torch.Tensor, activations: bool = True, kv_cache: bool = True,
                       grid: tuple[float, ...] = CLIP_GRID) -> dict:
    """Choose and set the clip ratios of ``model``'s dynamic input quantizers, then of its KV-cache ones, on
    token ids ``held_out`` ``[n, T]``; return what was measured (perplexity on the held-out samples per ratio). The
    KV cache is unclipped during the first search, so its ratio 1.0 is that search's best: not measured twice."""
    found: dict = {"samples": held_out.shape[0], "grid": list(grid)}
    searches_kv = kv_cache and set_kv_clip(model, 1.0) > 0
    known: dict[float, float] = {}
    if activations and set_input_clip(model, 1.0):
        found["activations"], known[1.0] = _search(model, held_out, set_input_clip, grid)
    if searches_kv:
        found["kv_cache"], _ = _search(model, held_out, set_kv_clip, grid, known)
    return found


__all__ = ["CLIP_GRID", "mean_nll", "search_clip_ratios"]

"""Clipping ratios of the dynamic activation quantizers and of the KV cache, searched on held-out calibration samples.

A dynamic quantizer takes its range from the tensor itself; with a clip ratio r it takes r times that range and
clamps what lies beyond (`llmquant.quant.spec.QuantSpec.clip_ratio`): rounding error falls on every value, clamping
error on the few outliers. A static KV cache's scales, calibrated on the whole observed range, are multiplied by r
(`llmquant.nn.kv_cache.set_kv_clip`); static input scales keep the range their observer chose. QuaRot fixes
r = 0.9 for 4-bit activations and 0.95 for the 4-bit KV cache; here r is chosen on samples the calibration did not
see: for each r of the grid every dynamic input quantizer of the quantized model takes r and the next-token NLL of
the held-out samples is measured; the best r is kept; then the same for the KV cache, the inputs' ratio fixed (a
coordinate search, one ratio per kind for the whole model).

``by="input"`` refines the activations' ratio per input before the KV cache's: the Linears that read one tensor
(q/k/v, o, gate/up, down in a Llama layer) form an input, named by their leaf names, found by their calls on one
held-out sample; the inputs of the same name in every layer share a ratio; each name in turn tries the grid, the
others fixed (one more coordinate pass: len(grid) - 1 forward passes of the held-out samples a name).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from llmquant.model.likelihood import mean_nll, next_token_nll
from llmquant.nn.kv_cache import set_kv_clip
from llmquant.nn.quant_linear import QuantLinear, set_input_clip

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _search(model: nn.Module, held_out: torch.Tensor, apply: Callable[[nn.Module, float], object],
            grid: tuple[float, ...], known: dict[float, float] | None = None) -> tuple[dict, float]:
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
                       grid: tuple[float, ...] = CLIP_GRID, by: Literal["model", "input"] = "model") -> dict:
    """Choose and set the clip ratios of ``model``'s dynamic input quantizers (one for the model, then, with
    ``by="input"``, one per input name), then of its KV-cache ones, on token ids ``held_out`` ``[n, T]``; return what
    was measured (perplexity on the held-out samples per ratio). The KV cache is unclipped during the first search,
    so the NLL of the inputs' best ratios is the KV search's ratio 1.0: not measured twice."""
    found: dict = {"samples": held_out.shape[0], "grid": list(grid)}
    searches_kv = kv_cache and set_kv_clip(model, 1.0) > 0
    known: dict[float, float] = {}
    if activations and set_input_clip(model, 1.0):
        found["activations"], best = _search(model, held_out, set_input_clip, grid)
        if by == "input":
            found["activations_by_input"] = {}
            for name, linears in dynamic_inputs(model, held_out[:1]).items():
                kept = linears[0].input_spec.clip_ratio
                found["activations_by_input"][name], best = _search(model, held_out, _clip_of(linears), grid,
                                                                    {kept: best})
        known[1.0] = best
    if searches_kv:
        found["kv_cache"], _ = _search(model, held_out, set_kv_clip, grid, known)
    return found


def _clip_of(linears: list[QuantLinear]) -> Callable[[nn.Module, float], None]:
    """``apply(model, ratio)`` for `_search`: the clip ratio of ``linears`` only."""
    def apply(model: nn.Module, ratio: float) -> None:
        for linear in linears:
            set_input_clip(linear, ratio)
    return apply


def dynamic_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, list[QuantLinear]]:
    """The `QuantLinear`s with a dynamic input quantizer grouped by input name: the leaf names of the Linears that
    read one tensor, joined by "," ("q_proj,k_proj,v_proj"), found by their calls in one forward of ``ids``
    (consecutive calls on the same tensor object, unchanged in between: one input; the last one is held until the
    next call, so that a new tensor cannot take its memory and look the same); the inputs of the same name in every
    layer are one group. A Linear the forward did not reach (an expert no token chose) is left out."""
    reads: list[list[tuple[str, QuantLinear]]] = []
    last: list[tuple[torch.Tensor, int]] = []  # the last input read and its version (bumped by in-place writes)

    def record(module: QuantLinear, args: tuple, name: str) -> None:
        if last and last[0][0] is args[0] and last[0][1] == args[0]._version:
            reads[-1].append((name, module))
        else:
            last[:] = [(args[0], args[0]._version)]
            reads.append([(name, module)])

    hooks = [module.register_forward_pre_hook(lambda module, args, name=name: record(module, args, name))
             for name, module in model.named_modules()
             if isinstance(module, QuantLinear) and module.input_spec is not None and module.input_spec.dynamic]
    try:
        next_token_nll(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
        last.clear()
    groups: dict[str, list[QuantLinear]] = {}
    for readers in reads:
        key = ",".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in readers))
        members = groups.setdefault(key, [])
        members.extend(module for _, module in readers if all(module is not m for m in members))
    return groups


__all__ = ["CLIP_GRID", "dynamic_inputs", "mean_nll", "search_clip_ratios"]

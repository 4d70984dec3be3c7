"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): protect the weights that see large activations by scaling them up before quantization.

1. Scale search, per smoothing group (input norm -> q/k/v, v_proj -> o_proj, post-attention norm ->
   gate/up, up_proj -> down_proj): s = mean|X|^ratio, normalised by sqrt(max(s) * min(s)), for the 20
   ratios 0, 0.05, ..., 0.95; keep the ratio whose weight-quantized outputs of the group's Linears,
   (X / s) Q(W s)^T, are closest to the float ones X W^T. s is folded into the producer exactly as
   SmoothQuant folds its scales, so the float function is unchanged.
2. Clipping search, per Linear and per (output channel, input group): clip the weights to
   (1 - i / 20) of their absolute maximum for i = 0 .. 9 and keep the clip with the least squared
   error of that group's partial outputs on the calibration tokens.

Deliberate deviation from the reference implementation: the clipping search runs on every Linear,
q_proj and k_proj included, on the partial outputs as the paper defines them (the reference skips
q/k); `tests/test_awq.py` shows AWQ still beats round to nearest on every Linear.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmquant.algorithms.lifecycle import LayerContext
from llmquant.algorithms.smoothquant import (
    GroupStats,
    SmoothingStep,
    apply_smoothing,
    group_rotation,
    group_specs,
    least_error_scales,
)
from llmquant.model.patterns import SmoothGroup, expand_channels, reduce_channels
from llmquant.parallel import SINGLE, Ranks
from llmquant.quant import QuantSpec, fake_quantize

RATIO_GRID: tuple[float, ...] = tuple(i / 20 for i in range(20))
CLIP_STEPS = 10  # shrink by 0, 5%, ..., 45% of the absolute maximum


def awq_scales(act_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """s = mean|X|^ratio / sqrt(max * min), float64."""
    scales = act_mean.double().clamp(min=1e-4).pow(ratio)
    return scales / (scales.max() * scales.min()).sqrt()


def search_scales(
    layer: nn.Module,
    group: SmoothGroup,
    stats: GroupStats,
    specs: dict[str, tuple[QuantSpec | None, QuantSpec | None]],
    ranks: Ranks = SINGLE,
) -> tuple[float, torch.Tensor]:
    """The ratio of `RATIO_GRID` with the least weight-quantized output error (summed over ``ranks``), and its
    scales."""
    act_mean = reduce_channels(stats.act_absmean, group)
    return least_error_scales(layer, group, stats, specs, {r: awq_scales(act_mean, r) for r in RATIO_GRID}, ranks)


CLIP_CHUNK_BYTES = 256 * 2**20  # on a GPU: the partial outputs of one chunk of rows [rows, groups, tokens]
CLIP_TOKENS = 2048  # the token sample a group keeps (`GroupStatsCollector`), which sizes the chunks


@torch.no_grad()
def search_clip(weight: torch.Tensor, tokens: torch.Tensor, spec: QuantSpec, chunk: int | None = None,
                ranks: Ranks = SINGLE) -> torch.Tensor:
    """The weight clipped per (output channel, input group) to the range with the least output error over the
    tokens of every rank of ``ranks``; ``chunk`` rows at a time (default: 64 on a CPU; on a GPU as many as
    `CLIP_CHUNK_BYTES` of partial outputs hold)."""
    out_features, in_features = weight.shape
    group = spec.group_size if spec.granularity == "group" else in_features
    n_groups = in_features // group
    x = tokens.float().to(weight.device).reshape(-1, n_groups, group)  # [tokens, n_groups, group]
    if chunk is None:  # (from the shapes only, the same on every rank: their collectives must pair up)
        chunk = 64 if not weight.is_cuda else max(64, CLIP_CHUNK_BYTES // (4 * n_groups * CLIP_TOKENS))
    clipped = weight.clone()
    for start in range(0, out_features, chunk):
        w = weight[start : start + chunk].float().reshape(-1, n_groups, group)  # [rows, n_groups, group]
        reference = torch.einsum("tgk,rgk->rgt", x, w)
        absmax = w.abs().amax(dim=-1, keepdim=True)
        best_err = torch.full_like(absmax, float("inf"))
        best_max = absmax.clone()
        for step in range(CLIP_STEPS):
            limit = absmax * (1 - step / 20)
            candidate = torch.maximum(torch.minimum(w, limit), -limit)
            quantized = fake_quantize(candidate.reshape(w.shape[0], -1), spec).reshape(w.shape)
            squared = (torch.einsum("tgk,rgk->rgt", x, quantized) - reference).pow(2)
            if ranks.world == 1:
                err = squared.mean(dim=-1, keepdim=True)
            else:  # the mean over every rank's tokens
                err = ranks.sum(squared.sum(dim=-1, keepdim=True)) / max(ranks.total(float(x.shape[0])), 1.0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, limit, best_max)
        w_clipped = torch.maximum(torch.minimum(w, best_max), -best_max)
        clipped[start : start + chunk] = w_clipped.reshape(-1, in_features).to(weight.dtype)
    return clipped


def scale_group(
    layer: nn.Module,
    group: SmoothGroup,
    stats: GroupStats,
    specs: dict[str, tuple[QuantSpec | None, QuantSpec | None]],
    ranks: Ranks = SINGLE,
) -> tuple[dict[str, object], torch.Tensor]:
    """Step 1 for one group (keeps the function): its manifest row and the tokens the readers now see."""
    ratio, scales = search_scales(layer, group, stats, specs, ranks)
    apply_smoothing(layer, group, scales)
    tokens = (stats.tokens.double() / expand_channels(scales, group)).float()
    rotation = group_rotation(layer, group)
    if rotation is not None:  # the readers' weights multiply the rotated input
        tokens = rotation.apply(tokens)
    return {"producer": group.producer, "linears": list(group.linears), "awq_ratio": ratio}, tokens


class AWQStep(SmoothingStep):
    """AWQ in the engine: the groups and activation statistics of `SmoothingStep` (every group with the choice
    "awq"), the scale search of every group (step 1, which keeps the function: the engine checks it), then, once
    the layer's QuantLinears exist, the clipping search on each quantized reader (step 2) and its weights
    quantized again from the clipped ones."""

    name = "awq"

    def __init__(self, groups: list[dict[str, Any]] | None = None) -> None:
        super().__init__({"smoothquant": "awq"}, groups)
        self.to_clip: list[tuple[SmoothGroup, torch.Tensor]] = []

    def transform(self, ctx: LayerContext) -> dict[str, Any]:
        assert self.collector is not None
        rows = []
        for (group, _), stats in zip(self.chosen, self.collector.close(), strict=True):
            row, tokens = scale_group(ctx.layer, group, stats, group_specs(group, ctx), ctx.ranks)
            rows.append(row)
            self.to_clip.append((group, tokens))
        return {"smoothing": rows}

    def quantize(self, ctx: LayerContext) -> dict[str, Any]:
        clipped = []
        for group, tokens in self.to_clip:
            for name in group.linears:
                w_spec = ctx.specs.get(name, (None, None))[0]
                if w_spec is None or name not in ctx.linears:
                    continue
                linear, quantized = ctx.linears[name]
                linear.weight.data = search_clip(linear.weight.data, tokens, w_spec, ranks=ctx.ranks)
                quantized.set_weight(linear.weight.detach())
                clipped.append(name)
        return {"clipped": clipped}

    def release(self, ctx: LayerContext) -> None:
        super().release(ctx)
        self.to_clip = []

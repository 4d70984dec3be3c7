"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models"): move activation outliers into the weights with an exact identity.

    Y = (X diag(s)^-1) (diag(s) W),   s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

where max|X_j| is the absolute maximum of input channel j over the calibration tokens and max|W_j| the
absolute maximum of column j over every Linear that reads X. diag(s)^-1 is folded into the producer of
X (a norm's weight and bias, or a Linear's output rows and bias), diag(s) into the readers' columns, so
inference pays nothing. The folds are computed in float64 and cast back to the weights' dtype.

``alpha="auto"`` searches alpha per group on a grid (0.3 .. 0.95, step 0.05) and keeps the one whose
quantized outputs of the group's Linears are closest (squared error, float32) to the float outputs, using
the Linears' own quantization specs. The search is cross-validated: the calibration samples are split in
two halves (alternate forward calls); the scales s and a static input range are taken from one half's
channel maxima and the error is measured on the other half's tokens, both ways, and summed. The chosen
alpha is then applied with the maxima of all samples. Scoring on the tokens the scales came from rewards
alphas that fit those tokens' outliers exactly (0.9-0.95 on most groups of the default model), which then
lose to a uniform 0.85 end to end: x1.038 against x1.030 per-channel static, x1.027 when scored on held-out
samples (BENCHMARKS.md; the tests show the held-out criterion choosing a lower alpha when a channel's
outliers do not repeat). A single calibration sample
leaves nothing to hold out: the error is then measured on the fitting tokens themselves.

Through an online rotation (SmoothRot, Czako et al. 2025, arXiv:2506.05413): when the readers rotate their input
online, y = (x Q) (W Q)^T (QuaRot's R4 before down_proj), the scales act before the rotation, on x and W, where a
massive channel is still one channel: x -> x diag(s)^-1 Q, W Q -> W diag(s) Q. The statistics are taken before the
rotation, the stored weight is changed as W Q <- ((W Q) Q^T diag(s)) Q in float64, and alpha=auto scores the
quantized output with the rotation applied to both the smoothed input and the smoothed weight.

Deliberate deviation from the paper: channels that are never active (max|X_j| = 0) or whose weights are
all zero get s_j = 1, and s is clamped to [1e-5, 1e5], so a dead channel never produces an inf or NaN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from llmquant.algorithms.lifecycle import LayerContext, LayerStep, SetupContext
from llmquant.errors import LlmquantError
from llmquant.model.patterns import (
    SmoothGroup,
    detect_smooth_groups,
    expand_channels,
    norm_offset,
    reduce_channels,
    resolve_heads,
    split_foldable,
)
from llmquant.nn.online_rotation import input_rotation_of
from llmquant.parallel import SINGLE, Ranks
from llmquant.quant import QuantSpec, fake_quantize, qparams_from_min_max
from llmquant.quant.rotation import Rotation

log = logging.getLogger(__name__)

AUTO_GRID: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))


@dataclass(frozen=True)
class GroupStats:
    """Per input channel absolute maxima of a group's input, and a sample of its tokens."""

    act_absmax: torch.Tensor  # [readers' in_features]
    tokens: torch.Tensor  # [n_tokens, readers' in_features]
    act_absmean: torch.Tensor | None = None  # [readers' in_features], for AWQ
    folds: tuple[GroupStats, GroupStats] | None = None  # the same of two halves of the samples, for alpha=auto


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), float64, 1 where a channel is dead."""
    act, weight = act_absmax.double(), weight_absmax.double()
    scales = act.pow(alpha) / weight.pow(1.0 - alpha)
    dead = (act <= 0) | (weight <= 0) | ~torch.isfinite(scales)
    return torch.where(dead, torch.ones_like(scales), scales).clamp(1e-5, 1e5)


def group_rotation(layer: nn.Module, group: SmoothGroup) -> Rotation | None:
    """The rotation the group's readers apply to their input online (`llmquant.nn.online_rotation`), or None."""
    rotations = {input_rotation_of(layer.get_submodule(name)) for name in group.linears}
    if len(rotations) > 1:
        raise LlmquantError(f"smoothing group {group.producer} -> {list(group.linears)}: its readers rotate their "
                            "input differently, so no scale of the producer's channels reaches them all")
    return rotations.pop()


def reader_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """A reader's weight W on the producer's channels: its stored weight, or W Q Q^T when it rotates its input."""
    reader = layer.get_submodule(name)
    rotation = input_rotation_of(reader)
    weight = reader.weight.detach()
    return weight if rotation is None else rotation.apply(weight, inverse=True)


def reader_weights(layer: nn.Module, group: SmoothGroup) -> dict[str, torch.Tensor]:
    """`reader_weight` of every reader of the group, float32: computed once for all the candidates a search scores."""
    return {name: reader_weight(layer, name).float() for name in group.linears}


def statistics_module(layer: nn.Module, group: SmoothGroup) -> nn.Module:
    """The module whose input is the group's input on the producer's channels: the first reader, or its online
    input rotation."""
    reader = layer.get_submodule(group.linears[0])
    return reader.input_rotation if input_rotation_of(reader) is not None else reader


def weight_absmax(layer: nn.Module, group: SmoothGroup) -> torch.Tensor:
    """Column absolute maxima over all readers, on the producer's channels."""
    columns = torch.stack([reader_weight(layer, n).abs().amax(dim=0) for n in group.linears])
    return reduce_channels(columns.amax(dim=0), group)


@torch.no_grad()
def apply_smoothing(layer: nn.Module, group: SmoothGroup, scales: torch.Tensor) -> None:
    """Fold diag(s)^-1 into the producer and diag(s) into the readers (s on producer channels)."""
    producer = layer.get_submodule(group.producer)
    if group.producer_kind == "norm":  # the gain w + offset is divided: w' = (w + offset) / s - offset
        gain = producer.weight.double() + group.producer_offset
        producer.weight.data = (gain / scales - group.producer_offset).to(producer.weight.dtype)
        if getattr(producer, "bias", None) is not None:
            producer.bias.data = (producer.bias.double() / scales).to(producer.bias.dtype)
    else:
        producer.weight.data = (producer.weight.double() / scales[:, None]).to(producer.weight.dtype)
        if producer.bias is not None:
            producer.bias.data = (producer.bias.double() / scales).to(producer.bias.dtype)
    columns = expand_channels(scales, group)
    rotation = group_rotation(layer, group)
    for name in group.linears:
        reader = layer.get_submodule(name)
        if rotation is None:
            reader.weight.data = (reader.weight.double() * columns[None, :]).to(reader.weight.dtype)
        else:  # W Q <- (W Q Q^T diag(s)) Q
            unrotated = rotation.apply(reader.weight.double(), inverse=True)
            reader.weight.data = rotation.apply(unrotated * columns[None, :]).to(reader.weight.dtype)


def outlier_ratio(act_absmax: torch.Tensor) -> float:
    """max / median of the per-channel absolute maxima: how hard per-tensor quantization is."""
    return float(act_absmax.max() / act_absmax.median().clamp(min=1e-12))


def quantized_group_error(
    layer: nn.Module,
    group: SmoothGroup,
    stats: GroupStats,
    scales: torch.Tensor,
    specs: dict[str, tuple[QuantSpec | None, QuantSpec | None]],
    references: dict[str, torch.Tensor] | None = None,
    static_absmax: torch.Tensor | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> float:
    """Squared error of the group's quantized outputs against the float ones X W^T, for scales ``s``
    (float32, the readers' online rotation too (`Rotation.apply_float32`): only the ranking of candidates matters);
    ``references`` caches X W^T per Linear. A static
    symmetric input scale is max_j(static_absmax_j / s_j) / qmax when ``static_absmax`` (per reader channel,
    before smoothing) is given, as calibration would set it; otherwise every input scale comes from the
    tokens themselves. ``weights`` caches `reader_weights`. Readers with one input spec (q/k/v, gate/up) share
    one quantized input, as the runtime's shared input codes do."""
    x = stats.tokens.float()
    if x.shape[0] == 0:  # a fold this rank did not see (several processes): nothing to score here
        return 0.0
    columns = expand_channels(scales, group).float()
    rotation = group_rotation(layer, group)
    x_smooth = x / columns
    if rotation is not None:  # the reader quantizes (x / s) Q and (W s) Q; a static range would be the rotated one's
        x_smooth, static_absmax = rotation.apply_float32(x_smooth), None
    quantized_inputs: dict[QuantSpec | None, torch.Tensor] = {}
    error = 0.0
    for name in group.linears:
        weight = weights[name] if weights is not None else reader_weight(layer, name).float()
        reference = references[name] if references is not None else x @ weight.T
        w_spec, a_spec = specs[name]
        w_smooth = weight * columns[None, :]
        if rotation is not None:
            w_smooth = rotation.apply_float32(w_smooth)
        wq = fake_quantize(w_smooth, w_spec) if w_spec is not None else w_smooth
        if a_spec not in quantized_inputs:
            quantized_inputs[a_spec] = _quantized_input(x_smooth, a_spec, columns, static_absmax)
        error += float((quantized_inputs[a_spec] @ wq.T - reference).double().pow(2).sum())
    return error


def _quantized_input(x_smooth: torch.Tensor, spec: QuantSpec | None, columns: torch.Tensor,
                     static_absmax: torch.Tensor | None) -> torch.Tensor:
    if spec is None:
        return x_smooth
    if static_absmax is None or spec.dynamic or not spec.symmetric:
        return fake_quantize(x_smooth, spec)
    absmax = (static_absmax.float() / columns).amax().reshape(1, 1)
    return fake_quantize(x_smooth, spec, *qparams_from_min_max(-absmax, absmax, spec))


def choose_alpha(
    layer: nn.Module,
    group: SmoothGroup,
    stats: GroupStats,
    specs: dict[str, tuple[QuantSpec | None, QuantSpec | None]],
    grid: tuple[float, ...] = AUTO_GRID,
    ranks: Ranks = SINGLE,
) -> tuple[float, torch.Tensor]:
    """The alpha of ``grid`` whose scales give the least quantized output error, and those scales (from all
    samples' maxima). With ``stats.folds``, each alpha is scored on held-out tokens (module docstring); the
    errors are summed over ``ranks``."""
    act = reduce_channels(stats.act_absmax, group)
    w_max = weight_absmax(layer, group)
    if stats.folds is None:
        candidates = {a: smoothing_scales(act, w_max, a) for a in grid}
        return least_error_scales(layer, group, stats, specs, candidates, ranks)
    errors = dict.fromkeys(grid, 0.0)
    first, second = stats.folds
    weights = reader_weights(layer, group)
    for fit, held in ((first, second), (second, first)):
        fit_act = reduce_channels(fit.act_absmax, group)
        references = _float_outputs(weights, held.tokens)
        for alpha in grid:
            scales = smoothing_scales(fit_act, w_max, alpha)
            errors[alpha] += quantized_group_error(layer, group, held, scales, specs, references, fit.act_absmax,
                                                   weights)
    best = _least(errors, ranks)
    return best, smoothing_scales(act, w_max, best)


def _least(errors: dict[float, float], ranks: Ranks) -> float:
    """The key of the least error summed over ``ranks`` (the first on ties), the same on every rank."""
    if ranks.world > 1:
        summed = ranks.sum(torch.tensor(list(errors.values()), dtype=torch.float64)).tolist()
        errors = dict(zip(errors, summed, strict=True))
    return min(errors, key=errors.__getitem__)


def _float_outputs(weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """X W^T of every Linear of a group (``weights``: `reader_weights`) on ``tokens`` (float32): the reference of
    `quantized_group_error`."""
    x = tokens.float()
    return {name: x @ weight.T for name, weight in weights.items()}


def least_error_scales(
    layer: nn.Module,
    group: SmoothGroup,
    stats: GroupStats,
    specs: dict[str, tuple[QuantSpec | None, QuantSpec | None]],
    candidates: dict[float, torch.Tensor],
    ranks: Ranks = SINGLE,
) -> tuple[float, torch.Tensor]:
    """Of ``{parameter: scales}``, the entry with the least quantized output error summed over ``ranks`` (first on
    ties)."""
    weights = reader_weights(layer, group)
    references = _float_outputs(weights, stats.tokens)
    errors = {p: quantized_group_error(layer, group, stats, s, specs, references, weights=weights)
              for p, s in candidates.items()}
    best = _least(errors, ranks)
    return best, candidates[best]


def smooth_group(
    layer: nn.Module,
    group: SmoothGroup,
    stats: GroupStats,
    alpha: float | str,
    specs: dict[str, tuple[QuantSpec | None, QuantSpec | None]],
    ranks: Ranks = SINGLE,
) -> dict[str, object]:
    """Smooth one group in place; return its manifest row."""
    act = reduce_channels(stats.act_absmax, group)
    if alpha == "auto":
        chosen, scales = choose_alpha(layer, group, stats, specs, ranks=ranks)
    else:
        chosen, scales = float(alpha), smoothing_scales(act, weight_absmax(layer, group), float(alpha))
    apply_smoothing(layer, group, scales)
    after = stats.act_absmax.double() / expand_channels(scales, group)
    rotation = group_rotation(layer, group)
    return {
        "producer": group.producer,
        "linears": list(group.linears),
        "alpha": chosen,
        "outlier_ratio_before": outlier_ratio(stats.act_absmax),
        "outlier_ratio_after": outlier_ratio(after),
        **({"before_online_rotation": rotation.describe()} if rotation is not None else {}),
    }


class GroupStatsCollector:
    """Forward pre-hooks on each group's first reader (on its online input rotation if it has one,
    `statistics_module`): channel absolute maxima, mean absolute values and a
    token sample, kept for two folds (alternate forward calls) so that alpha=auto can score held-out tokens.

    In several processes (``ranks``) the maxima, sums and counts are reduced over the ranks; each rank keeps a
    token sample of its own (``max_tokens`` shared among them), on which the searches score their candidates
    and sum the scores over the ranks."""

    def __init__(self, layer: nn.Module, groups: list[SmoothGroup], max_tokens: int = 2048, seed: int = 0,
                 ranks: Ranks = SINGLE) -> None:
        self.groups, self.ranks = groups, ranks
        self.max_tokens = max(1, max_tokens // ranks.world)
        self.generator = torch.Generator().manual_seed(seed)
        self.absmax: dict[tuple[int, int], torch.Tensor] = {}
        self.abssum: dict[tuple[int, int], torch.Tensor] = {}
        self.count: dict[tuple[int, int], int] = {}
        self.tokens: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in range(len(groups))}  # (fold, x)
        self.handles = [
            statistics_module(layer, group).register_forward_pre_hook(self._hook(i))
            for i, group in enumerate(groups)
        ]

    def _hook(self, index: int):
        def record(_module: nn.Module, args: tuple) -> None:
            key = (index, len(self.tokens[index]) % 2)  # one token sample per call so far: alternate folds
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            current = x.abs().amax(dim=0)
            previous = self.absmax.get(key)
            self.absmax[key] = current if previous is None else torch.maximum(previous, current)
            self.abssum[key] = self.abssum.get(key, 0) + x.abs().sum(dim=0)
            self.count[key] = self.count.get(key, 0) + x.shape[0]
            keep = torch.randperm(x.shape[0], generator=self.generator)[: self.max_tokens]
            self.tokens[index].append((key[1], x[keep]))

        return record

    def _sample(self, tokens: list[torch.Tensor], features: int) -> torch.Tensor:
        if not tokens:  # a fold another rank saw and this one did not
            return torch.zeros(0, features, device=self.absmax[next(iter(self.absmax))].device)
        tokens = torch.cat(tokens)
        if tokens.shape[0] > self.max_tokens:
            tokens = tokens[torch.randperm(tokens.shape[0], generator=self.generator)[: self.max_tokens]]
        return tokens

    def _fold(self, key: tuple[int, int]) -> GroupStats:
        tokens = [x for fold, x in self.tokens[key[0]] if fold == key[1]]
        return GroupStats(act_absmax=self.absmax[key], tokens=self._sample(tokens, self.absmax[key].shape[0]),
                          act_absmean=self.abssum[key] / self.count[key])

    def _reduce(self) -> None:
        """Maxima, sums and counts of every (group, fold) over the ranks; a fold no rank saw stays absent."""
        for i in range(len(self.groups)):
            like = self.absmax[(i, 0)]
            for key in ((i, 0), (i, 1)):
                count = self.ranks.total(float(self.count.get(key, 0)))
                if count == 0:
                    continue
                self.absmax[key] = self.ranks.max(self.absmax.get(key, torch.zeros_like(like)).clone())
                self.abssum[key] = self.ranks.sum(self.abssum.get(key, torch.zeros_like(like)).clone())
                self.count[key] = int(count)

    def close(self) -> list[GroupStats]:
        """Remove the hooks; the statistics of each group (over every rank)."""
        for handle in self.handles:
            handle.remove()
        if self.ranks.world > 1:
            self._reduce()
        stats = []
        for i in range(len(self.groups)):
            keys = [key for key in ((i, 0), (i, 1)) if key in self.absmax]
            absmax = torch.stack([self.absmax[k] for k in keys]).amax(dim=0)
            mean = sum(self.abssum[k] for k in keys) / sum(self.count[k] for k in keys)
            tokens = self._sample([x for _, x in self.tokens[i]], absmax.shape[0])  # in call order
            folds = (self._fold(keys[0]), self._fold(keys[1])) if len(keys) == 2 else None
            stats.append(GroupStats(act_absmax=absmax, tokens=tokens, act_absmean=mean, folds=folds))
        return stats


# --- the per-layer lifecycle (`llmquant.algorithms.lifecycle`) -------------------------------------------
GroupChoice = float | str  # a fixed alpha, "auto" or (AWQ) "awq"


def smoothing_groups(ctx: SetupContext, given: list[dict[str, Any]] | None) -> tuple[list[SmoothGroup], dict]:
    """The smoothing groups of a decoder layer: ``given`` (a hand-written map), or found on the first layer by
    its function (`llmquant.model.patterns`), less those whose producer takes no fold (`foldable`); and, by
    Linear, why the ones no group reads are not smoothed (said once, and kept in the manifest)."""
    if given is not None:
        groups = [resolve_heads(SmoothGroup.from_dict(g), ctx.layer, ctx.head_dim) for g in given]
        groups = [replace(group, producer_offset=norm_offset(ctx.layer.get_submodule(group.producer)))
                  if group.producer_kind == "norm" else group for group in groups]  # (a hand-written map names none)
    else:
        groups = detect_smooth_groups(ctx.layer, ctx.run_sample, ctx.head_dim, ctx.where)
    kept, unsmoothed = split_foldable(ctx.layer, groups, ctx.linears)
    for why in dict.fromkeys(unsmoothed.values()):
        log.warning("not smoothed: %s (%s)", [n for n, w in unsmoothed.items() if w == why], why)
    return kept, unsmoothed


def chosen_groups(groups: list[SmoothGroup], alphas: dict[str, GroupChoice]) -> list[tuple[SmoothGroup, GroupChoice]]:
    """Each group with the alpha its kind asks for: ``alphas["smooth_fc_fc"]`` for a Linear producer (else the
    ``smoothquant`` one), ``alphas["smoothquant"]`` for a norm; groups with neither are left alone."""
    chosen = []
    for group in groups:
        kind = "smooth_fc_fc" if group.producer_kind == "linear" else "smoothquant"
        alpha = alphas.get(kind, alphas.get("smoothquant"))
        if alpha is not None:
            chosen.append((group, alpha))
    return chosen


def describe_groups(chosen: list[tuple[SmoothGroup, GroupChoice]]) -> list[dict[str, Any]]:
    return [{**group.to_dict(), "alpha": alpha} for group, alpha in chosen]


class SmoothingStep(LayerStep):
    """SmoothQuant in the engine: channel statistics from the float pass, then every group smoothed in place
    (`smooth_group`), which keeps the layer's function (the engine checks it). ``alphas`` maps
    ``smoothquant`` / ``smooth_fc_fc`` to a fixed alpha or "auto"."""

    name = "smoothing"
    keeps_function = True

    def __init__(self, alphas: dict[str, GroupChoice], groups: list[dict[str, Any]] | None = None) -> None:
        self.alphas, self.given = alphas, groups
        self.chosen: list[tuple[SmoothGroup, GroupChoice]] = []
        self.collector: GroupStatsCollector | None = None

    def setup(self, ctx: SetupContext) -> dict[str, Any]:
        groups, unsmoothed = smoothing_groups(ctx, self.given)
        self.chosen = chosen_groups(groups, self.alphas)
        return {"smooth_groups": describe_groups(self.chosen), "not_smoothed": unsmoothed}

    def observe(self, ctx: LayerContext) -> list[RemovableHandle]:
        self.collector = GroupStatsCollector(ctx.layer, [group for group, _ in self.chosen], ranks=ctx.ranks)
        return self.collector.handles

    def transform(self, ctx: LayerContext) -> dict[str, Any]:
        assert self.collector is not None
        stats = self.collector.close()
        rows = [smooth_group(ctx.layer, group, group_stats, alpha, group_specs(group, ctx), ctx.ranks)
                for (group, alpha), group_stats in zip(self.chosen, stats, strict=True)]
        return {"smoothing": rows}

    def release(self, ctx: LayerContext) -> None:
        self.collector = None


def group_specs(group: SmoothGroup, ctx: LayerContext) -> dict[str, tuple[QuantSpec | None, QuantSpec | None]]:
    """The (weight, input) specs of the group's readers."""
    return {name: ctx.specs.get(name, (None, None)) for name in group.linears}

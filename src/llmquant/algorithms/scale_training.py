"""The weights' scales trained end to end (EfficientQAT's E2E-QP: Chen et al. 2024, "EfficientQAT: Efficient
Quantization-Aware Training for Large Language Models", arXiv 2407.11062, section 3.3).

Once every layer is quantized, each weight is W = (q - z) s with integer codes q (GPTQ's), zero points z and scales s
(per channel or per group). E2E-QP keeps q and z and trains every scale of the network together against a loss of its
logits on the calibration samples (below), with the activations and the KV cache quantized in the forward
pass and their rounding passed straight through in the backward pass (`llmquant.quant.straight_through`). The
checkpoint keeps its format: only the scales' values change (with the options below, the norms' gains and the codes
too). Where per-layer steps (GPTQ, the smoothing searches)
each minimise one layer's output error with the layers before already quantized, this step sees what the errors of
all the layers do to the logits together.

The loss (``loss``):

- ``kl`` (the default): the KL divergence from the float model's next-token distribution p to the quantized one's q
  at every position, as in knowledge distillation. The float model's p is taken before the layers are quantized and
  kept as its ``top_k`` most likely tokens and the rest of the mass as one bin (k + 1 bins; by the data-processing
  inequality the KL of that coarser distribution is at most the full one's): with k = 64, 64 x 8 bytes a position
  instead of a vocabulary's float32 row.
  KL(p || q) = sum_{i in top k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest).
- ``ce``: EfficientQAT's next-token cross-entropy on the samples' own tokens. It fits the calibration text itself: on
  the default model, trained on pydoc samples, the pydoc perplexity fell below the float model's (x0.947 of float,
  BENCHMARKS.md), which is fitting the corpus, not undoing quantization error.

Deliberate deviations from EfficientQAT, and why:

- The distillation loss by default (above).
- The scales are trained in the log domain: s = s0 exp(t), t from 0, by Adam with a cosine-decayed step, so one
  step moves every scale by about the same relative amount (the scales of one model span two orders of magnitude;
  EfficientQAT trains s itself with one learning rate).
- ``norms`` (off by default; EfficientQAT trains only the step sizes): the gains of the normalisation layers
  (RMSNorm, LayerNorm) are trained with the scales, in the same log domain: g = g0 exp(t), with g the gain the norm
  applies (its weight, plus Gemma's offset of 1). A gain scales the channels of the activations the next Linears
  quantize, so it can move an outlier channel's share of the 4-bit range, which the weights' scales cannot; the
  checkpoint keeps its format (the norms' weights are float in it). Effect measured in BENCHMARKS.md.
- ``codes_lr`` (0 by default: the codes stay, as in E2E-QP): above 0, the integer codes train too, as offsets d on
  them (in code units, from 0, Adam's step ``codes_lr``): the weight is (round(q + d) - z) s, clamped to the codes'
  range, rounded straight through, so a code moves by one where its offset passes 0.5. EfficientQAT trains the
  weights only block by block (Block-AP); this trains them end to end against the same loss as the scales. After
  training the codes are stored rounded; the manifest counts the codes changed.
- Held-out check: the last ``holdout`` samples given are not trained on; the trained scales are kept only if
  they lower those samples' loss (the KL, or the next-token NLL), measured on the model as it will run (else the
  scales found by the per-layer steps stay). EfficientQAT trains on 4096 samples of 2048 tokens; a calibration set
  is tens of samples, so a run that only fits the samples it saw is possible. A recipe can train on more windows than
  it calibrates on (`scale_training.samples`, drawn after the calibration ones); on the default model's W4A4KV4, 256
  windows beat a second epoch over 128 on both corpora (BENCHMARKS.md).

Cost: a forward and a backward pass of the whole quantized network a step (each layer dequantizes its weight at every
call), the whole model on one device (with ``codes_lr``, a float offset a weight and Adam's two moments: 12 bytes a
weight more); the manifest records the steps, the seconds and the loss before and after.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from llmquant.device import device_of
from llmquant.errors import LlmquantError
from llmquant.model.likelihood import mean_nll
from llmquant.model.patterns import is_norm, norm_form, norm_offset
from llmquant.nn.quant_linear import QuantLinear
from llmquant.parallel import SINGLE, Ranks


@dataclass(frozen=True)
class ScaleTrainingConfig:
    """``epochs`` passes over the training samples in batches of ``batch`` samples (a fraction: that share of one
    pass); ``lr``: Adam's largest step on log s (cosine-decayed to 0); ``holdout``: the last samples kept out of
    training to decide whether the trained scales are kept (0: kept without a check); ``loss`` and ``top_k``: the
    module docstring."""

    epochs: float = 1.0
    batch: int = 1
    lr: float = 1e-3
    holdout: int = 8
    loss: str = "kl"  # "kl": from the float model's next-token distribution; "ce": the samples' own next tokens
    top_k: int = 64  # the float model's most likely tokens kept a position for "kl"
    norms: bool = False  # train the norms' gains too (module docstring)
    codes_lr: float = 0.0  # Adam's step on the codes' offsets (0: the codes stay; module docstring)


@dataclass
class TrainedScales:
    """What a run did: what it trained (layers, scales, norms), on how many samples (and how many it held out), its
    steps, tokens and seconds, the training loss over its first and last tenth of steps, the held-out loss before and
    after (None without a held-out set), the codes it changed, and whether what it trained was kept."""

    layers: int
    scales: int
    loss: str
    norms: int = 0
    codes_changed: int = 0
    samples: int = 0
    held_out: int = 0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    held_out_before: float | None = None
    held_out_after: float | None = None
    kept: bool = True

    def describe(self) -> dict[str, Any]:
        tenth = max(1, len(self.losses) // 10)
        first, last = self.losses[:tenth], self.losses[-tenth:]
        return {"layers": self.layers, "scales": self.scales, "norms": self.norms, "loss": self.loss,
                "samples": self.samples, "held_out": self.held_out, "steps": self.steps, "tokens": self.tokens,
                "seconds": round(self.seconds, 1),
                "loss_first_tenth": _rounded(sum(first) / len(first) if first else None),
                "loss_last_tenth": _rounded(sum(last) / len(last) if last else None),
                "held_out_loss_before": _rounded(self.held_out_before),
                "held_out_loss_after": _rounded(self.held_out_after), "codes_changed": self.codes_changed,
                "kept": self.kept}


def _rounded(value: float | None) -> float | None:
    return float(f"{value:.6g}") if value is not None else None


@dataclass(frozen=True)
class TeacherTargets:
    """The float model's next-token distribution on samples ``[n, T]``: at each position its ``k`` most likely tokens
    (``ids`` ``[n, T, k]``) and their log-probabilities (``log_probs``, float32)."""

    ids: torch.Tensor
    log_probs: torch.Tensor

    def __getitem__(self, rows: torch.Tensor | slice) -> TeacherTargets:
        return TeacherTargets(self.ids[rows], self.log_probs[rows])


@torch.no_grad()
def teacher_targets(model: nn.Module, samples: torch.Tensor, top_k: int, progress: bool = False) -> TeacherTargets:
    """``model``'s (the float one, before quantization) `TeacherTargets` on token ids ``samples``, a sample a
    forward."""
    ids, log_probs = [], []
    for row in tqdm(samples, desc="the float model's targets", unit="sample", disable=not progress):
        logits = model(input_ids=row[None].to(device_of(model)), use_cache=False).logits.float()
        top = torch.log_softmax(logits, -1).topk(top_k, dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        log_probs.append(top.values.cpu())
    return TeacherTargets(torch.cat(ids), torch.cat(log_probs))


def coarse_kl(logits: torch.Tensor, teacher: TeacherTargets) -> torch.Tensor:
    """Mean over positions of KL(p || q) on k + 1 bins (module docstring): ``teacher``'s top-k tokens and the rest,
    q = softmax(``logits`` ``[b, T, V]``)."""
    log_q = torch.log_softmax(logits.float(), -1)
    log_q_top = log_q.gather(-1, teacher.ids.to(log_q.device, torch.int64))
    log_p_top = teacher.log_probs.to(log_q.device)
    p_top = log_p_top.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - log_q_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_top * (log_p_top - log_q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


def trainable_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The Linears whose weights have scales to train: every `QuantLinear` with a quantized weight."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, QuantLinear) and module.weight_spec is not None}


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` without a gradient meanwhile (the embeddings', the norms'), as it was after."""
    wanted = {p: p.requires_grad for p in model.parameters()}
    for p in wanted:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, requires in wanted.items():
            p.requires_grad_(requires)


class _LogGain(nn.Module):
    """A norm's weight w as (w + offset) exp(t) - offset: its gain w + offset times a trained factor, t from 0
    (a `torch.nn.utils.parametrize` parametrization)."""

    def __init__(self, weight: torch.Tensor, offset: float) -> None:
        super().__init__()
        self.offset = offset
        self.log = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return ((weight.float() + self.offset) * torch.exp(self.log) - self.offset).to(weight.dtype)


def trainable_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The norms whose gains ``norms`` trains: every module with a per-channel weight that computes an RMSNorm or
    LayerNorm form (`llmquant.model.patterns.norm_form`; a gated norm or another form is left alone)."""
    return {name: module for name, module in model.named_modules() if is_norm(module)
            and getattr(module, "weight", None) is not None and module.weight.dim() == 1
            and norm_form(module, module.weight.shape[0]) is not None}


@contextmanager
def _trained_gains(norms: dict[str, nn.Module]) -> Iterator[dict[str, _LogGain]]:
    """Each norm's weight a `_LogGain` of its own meanwhile; after, plain weights with the last trained values."""
    gains = {}
    for name, norm in norms.items():
        gains[name] = _LogGain(norm.weight, norm_offset(norm)).to(norm.weight.device)
        parametrize.register_parametrization(norm, "weight", gains[name])
    try:
        yield gains
    finally:
        for norm in norms.values():
            parametrize.remove_parametrizations(norm, "weight", leave_parametrized=True)


@contextmanager
def _trained_codes(layers: dict[str, QuantLinear], start: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Offsets on the codes ``start`` of each of those layers, from 0 (`QuantLinear.code_offsets`: the layer computes
    with them meanwhile); after, its codes are stored rounded (interrupted too: the offsets trained so far)."""
    offsets = {name: torch.zeros(codes.shape, device=codes.device, requires_grad=True) for name, codes in start.items()}
    for name, offset in offsets.items():
        layers[name].code_offsets = offset
    try:
        yield offsets
    finally:
        with torch.no_grad():
            for name, offset in offsets.items():
                spec = layers[name].weight_spec
                codes = (start[name].float() + offset).round().clamp(spec.qmin, spec.qmax)
                layers[name].code_offsets = None
                layers[name].set_codes(codes.to(start[name].dtype))


def float_codes_refusal(weight: str) -> str:
    """The one line refusing ``codes_lr`` where ``weight`` (a Linear's or a scheme's name) stores float codes."""
    return (f"scale_training.codes_lr trains integer codes, but {weight} stores float (FP8) codes; allowed: codes_lr 0 "
            "with a float weight scheme")


def _set_scales(layers: dict[str, QuantLinear], scales: dict[str, torch.Tensor]) -> None:
    """Give each layer its scale tensor (a function of the trained logarithms, or plain values) and drop what its
    runtimes built from the old ones."""
    for name, layer in layers.items():
        layer.weight_scale = scales[name]
        layer.drop_caches()


def loss_of(model: nn.Module, ids: torch.Tensor, teacher: TeacherTargets | None) -> torch.Tensor:
    """The training loss on token ids ``[b, T]``: the KL from ``teacher`` (its rows for ``ids``), or without one the
    next-token cross-entropy."""
    if teacher is None:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    return coarse_kl(model(input_ids=ids, use_cache=False).logits, teacher)


def held_out_loss(model: nn.Module, ids: torch.Tensor, teacher: TeacherTargets | None = None,
                  ranks: Ranks = SINGLE) -> float:
    """The mean loss of ``model`` on token ids ``[n, T]`` (one sample a forward, no gradient): the KL from
    ``teacher`` (its rows for ``ids``), or without one the next-token NLL; in several processes each measures them all
    and the mean over the processes is taken, the same number on every one."""
    if teacher is not None:
        with torch.no_grad():
            mean = sum(float(loss_of(model, row[None], teacher[i:i + 1])) for i, row in enumerate(ids)) / len(ids)
    else:
        mean = mean_nll(model, ids)
    return ranks.total(mean) / ranks.world


def _batches(count: int, config: ScaleTrainingConfig, ranks: Ranks) -> list[torch.Tensor]:
    """The sample indices of each step: ``batch`` samples a process, in order, wrapping around, the same number of
    steps on every process (``epochs`` passes over ``count`` samples in all)."""
    per_step = config.batch * ranks.world
    steps = max(1, round(config.epochs * count / per_step))
    return [(torch.arange(config.batch) + step * per_step + ranks.rank * config.batch) % count
            for step in range(steps)]


def train_scales(model: nn.Module, samples: torch.Tensor, config: ScaleTrainingConfig,
                 teacher: TeacherTargets | None = None, ranks: Ranks = SINGLE, progress: bool = True) -> TrainedScales:
    """Train the scales of every quantized weight of ``model`` (with ``config.norms`` its norms' gains, with
    ``config.codes_lr`` its codes too; module docstring) on token ids ``samples`` ``[n, T]`` (``teacher``: the float
    model's `teacher_targets` on them, for the ``kl`` loss), the same on every process of ``ranks`` (each takes its
    share of a step's samples, the gradients are averaged); the model keeps what was trained, or its own values where
    the held-out samples say they are worse."""
    if (config.loss == "kl") != (teacher is not None):
        raise LlmquantError(f"scale_training loss '{config.loss}' " + (
            "needs the float model's targets (teacher_targets, taken before quantization)" if teacher is None else
            "takes no teacher targets") + "; allowed: loss kl with them, ce without")
    layers = trainable_layers(model)
    if not layers:
        raise LlmquantError("scale_training trains the scales of quantized weights, but this model has none; "
                            "allowed: a recipe whose scheme quantizes weights")
    if config.codes_lr and (floats := [name for name, layer in layers.items() if layer.weight_spec.type != "int"]):
        raise LlmquantError(float_codes_refusal(floats[0]))
    if config.holdout >= samples.shape[0]:
        raise LlmquantError(f"scale_training.holdout {config.holdout} keeps every one of the {samples.shape[0]} "
                            f"calibration samples out of training; allowed: fewer than {samples.shape[0]}")
    count = samples.shape[0] - config.holdout
    train, held = samples[:count].to(device_of(model)), samples[count:] if config.holdout else None
    held_teacher = teacher[count:] if teacher is not None else None
    norms = trainable_norms(model) if config.norms else {}
    start = {name: layer.weight_scale.detach().clone() for name, layer in layers.items()}
    start_gains = {name: norm.weight.detach().clone() for name, norm in norms.items()}
    start_codes = {name: layer.codes().clone() for name, layer in layers.items()} if config.codes_lr else {}
    logs = {name: torch.zeros_like(scale, requires_grad=True) for name, scale in start.items()}
    result = TrainedScales(layers=len(layers), scales=sum(s.numel() for s in start.values()), loss=config.loss,
                           norms=len(norms), samples=count, held_out=config.holdout)
    began = time.perf_counter()
    if held is not None:
        result.held_out_before = held_out_loss(model, held, held_teacher, ranks)
    batches = _batches(train.shape[0], config, ranks)
    bar = tqdm(batches, desc="training the weights' scales", unit="step", disable=not progress or not ranks.writes)
    with _frozen(model), _trained_gains(norms) as gains, _trained_codes(layers, start_codes) as offsets:
        groups = [{"params": [*logs.values(), *(gain.log for gain in gains.values())], "lr": config.lr}]
        groups += [{"params": list(offsets.values()), "lr": config.codes_lr}] if offsets else []
        trained = [p for group in groups for p in group["params"]]
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / len(batches))))
        try:
            for rows in bar:
                _set_scales(layers, {name: start[name] * torch.exp(logs[name]) for name in layers})
                loss = loss_of(model, train[rows], teacher[rows] if teacher is not None else None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if ranks.world > 1:  # (an expert no token reached on this rank: a zero gradient, to meet the others)
                    for log in trained:
                        log.grad = ranks.sum(log.grad if log.grad is not None else torch.zeros_like(log))
                        log.grad.div_(ranks.world)
                optimizer.step()
                schedule.step()
                result.losses.append(ranks.total(loss.item()) / ranks.world)
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
        finally:  # (interrupted too: plain tensors again, the trained values so far)
            with torch.no_grad():
                _set_scales(layers, {name: (start[name] * torch.exp(logs[name])).contiguous() for name in layers})
    result.steps, result.tokens = len(batches), len(batches) * config.batch * ranks.world * samples.shape[1]
    result.codes_changed = sum(int((layers[name].codes() != codes).sum()) for name, codes in start_codes.items())
    if held is not None:
        result.held_out_after = held_out_loss(model, held, held_teacher, ranks)
        result.kept = result.held_out_after < result.held_out_before
        if not result.kept:
            _set_scales(layers, start)
            for name, codes in start_codes.items():
                layers[name].set_codes(codes)
            with torch.no_grad():
                for name, norm in norms.items():
                    norm.weight.copy_(start_gains[name])
    result.seconds = time.perf_counter() - began
    return result


__all__ = ["ScaleTrainingConfig", "TeacherTargets", "TrainedScales", "coarse_kl", "float_codes_refusal",
           "held_out_loss", "loss_of", "teacher_targets", "train_scales", "trainable_layers", "trainable_norms"]

"""Layer-wise learned online rotations: each decoder layer's online rotations before Linears (R4, R5, R6) learned
on that layer's output error, on top of the Hadamards they start from.

FlatQuant (Sun et al. 2024, "FlatQuant: Flatness Matters for LLM Quantization", arXiv:2410.09426) learns, for each
layer and each quantized input, an invertible transform P (x -> x P, W -> W P^-T) minimising the layer's output error
||F(X) - F_q(X; P)||^2 on its calibration inputs, with the quantizers in the forward (straight-through), and keeps
the float function: (x P)(W P^-T)^T = x W^T. Here P = Q U: Q is the rotation already in place (R6's Hadamard after
SmoothRot's per-channel scales, which play FlatQuant's diagonal scaling; R4's, R5's) and U is orthogonal, U = Cayley(A)
from A = 0 (the identity), A trained by Adam (FlatQuant's optimiser) with a cosine-decayed step. The deliberate
deviations from FlatQuant, and why:

- U is orthogonal, not any invertible matrix: the inverse is exact (P^-1 = P^T) in every dtype, the stored transform
  is the same kind of object as every rotation (a `Rotation` of kind ``learned``, written as compressed-tensors'
  ``transform_config`` matrix, which vLLM applies), and the engine checks the float function as it does for the
  Hadamards. The diagonal part of FlatQuant's transform is the smoothing step's, searched before.
- U is one dense n x n matrix (``form: dense``) or, as FlatQuant's transforms are, a Kronecker product U1 (x) U2 of
  two small orthogonal ones (``form: kronecker``, n = n1 n2 with n1 the largest divisor of n up to sqrt(n): 24 x 24
  at 576, 32 x 48 at 1536; n1^2 + n2^2 learned entries instead of n^2). Either is stored and applied as the dense
  product Q U, and each Linear rotates its own copy of its input (as R6 does): the online cost is n^2 multiply-adds a
  token per Linear instead of a Hadamard's n log n (the manifest's ``online_multiply_adds_per_token``).
- The loss is the relative squared error of the layer's output, ||F(X) - F_q(X)||^2 / ||F(X)||^2, against the float
  layer's output on the same inputs (the inputs the quantized layers before give, as every other step sees them): at
  U = I it is the square of the engine's ``output_error`` of the layer quantized to nearest.
- The U found are kept only if their loss is below the start's (the straight-through loss is rough: a run can end
  above where it began); else the layer keeps its Hadamards. The check is over every calibration batch, or, with
  ``holdout`` batches set aside (not learned from), over those alone, so that a U that only fits the batches it
  learned from is turned back.

Linears that read one input (q/k/v; gate/up) share one U: they are found by running the layer once and grouping the
rotated Linears whose input is the same tensor. Every quantized input of the layer (and the KV cache) is
fake-quantized in the loss; the weights too (round to nearest) when ``weights`` (GPTQ rounds them afterwards either
way: FlatQuant calibrates its transforms with quantized weights).

Measured on the default model (W4A4KV4, BENCHMARKS.md "Learned online rotations"): with a dense U each layer's
calibration loss falls 8-19%, the perplexity does not (pydoc unchanged, the second corpus worse); in the Kronecker form
with a held-out check 26 of 30 layers keep a U that lowers their held-out loss by 1-7%, and both corpora get worse.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from llmquant.algorithms.lifecycle import LayerContext, LayerStep
from llmquant.algorithms.spinquant import (
    KVStraightThrough,
    QuantizerSwitch,
    StraightThroughWeight,
    learning_spec,
    quantize_input_hook,
)
from llmquant.errors import LlmquantError
from llmquant.nn.online_rotation import OnlineRotation, input_rotation_of
from llmquant.quant.rotation import learned_rotation, storable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineLearningConfig:
    """Per layer: ``iterations`` Adam steps of ``lr`` (cosine-decayed to 0) on batches of ``batch`` calibration
    samples (taken in turn); ``weights``: round the weights to nearest in the loss; ``max_size``: learn only rotations
    of at most this many channels (0: every size)."""

    iterations: int = 32
    batch: int = 4
    lr: float = 1e-4
    weights: bool = True
    max_size: int = 0
    form: str = "dense"  # or "kronecker"
    holdout: int = 0  # calibration batches set aside for the keep-check (0: the check runs on every batch)


def kronecker_factors(n: int) -> tuple[int, int]:
    """(n1, n2), n1 n2 = n, n1 the largest divisor of n up to sqrt(n) (1 for a prime n: then U is dense)."""
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return n1, n // n1


def cayley(a: torch.Tensor) -> torch.Tensor:
    """The Cayley transform of the skew-symmetric part of ``a``: (I + S)^-1 (I - S), S = A - A^T; orthogonal for any
    A and the identity at A = 0 (one solve: the matrix exponential costs about ten times as much at n = 1536)."""
    skew = a - a.T
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye + skew, eye - skew)


class _Site(nn.Module):
    """Rotated Linears (relative names) that read one input, and the U they share: one Cayley transform (dense), or
    the Kronecker product of two (``kronecker``; orthogonal, as a product of orthogonal factors). ``value`` is U as
    the current forward uses it (`refresh`)."""

    def __init__(self, linears: list[str], n: int, device: torch.device, kronecker: bool = False) -> None:
        super().__init__()
        self.linears, self.n = linears, n
        sizes = [k for k in kronecker_factors(n) if k > 1] if kronecker else [n]
        self.factors = nn.ParameterList([nn.Parameter(torch.zeros(k, k, device=device)) for k in sizes])
        self.value = torch.eye(n, device=device)

    def _u(self, factors: list[torch.Tensor]) -> torch.Tensor:
        u = cayley(factors[0])
        for a in factors[1:]:
            u = torch.kron(u, cayley(a))
        return u

    def refresh(self) -> None:
        self.value = self._u(list(self.factors))

    def orthogonal(self) -> torch.Tensor:
        """U in float64 (orthogonal to float64 rounding)."""
        return self._u([a.detach().double() for a in self.factors])

    def reset(self) -> None:
        """Back to U = I."""
        for a in self.factors:
            a.data.zero_()


def shared_input_sites(layer: nn.Module, run: Callable[[], Any]) -> list[list[str]]:
    """The layer's Linears with an online input rotation, grouped by the input they read (one run of ``run``):
    Linears given the same tensor share a group, in the layer's module order. (Every input is held until the run
    ends, so no two of them can share an address.)"""
    rotated = {name: m for name, m in layer.named_modules() if input_rotation_of(m) is not None}
    seen: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0])
        return hook

    handles = [m.register_forward_pre_hook(record(name), prepend=True) for name, m in rotated.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name in rotated:
        if name in seen:  # (a routed expert no token of the sample chose is not called: it keeps its rotation)
            groups.setdefault((seen[name].data_ptr(), tuple(seen[name].shape)), []).append(name)
    return list(groups.values())


class _TimesU(nn.Module):
    """Parametrization of a weight: W <- W U (the site's current U)."""

    def __init__(self, site: _Site) -> None:
        super().__init__()
        self.site = [site]  # (a list: not a submodule, so its parameter is not the Linear's)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.site[0].value.to(w.dtype)


def _rotate_after(site: _Site) -> Callable:
    return lambda _module, args: (args[0] @ site.value.to(args[0].dtype), *args[1:])


class _LossNetwork:
    """The layer with each site's U acting after its rotation (x Q U, W Q U) and the quantizers straight-through;
    `close` removes all of it, leaving the layer as it was."""

    def __init__(self, ctx: LayerContext, sites: list[_Site], weights: bool) -> None:
        self.layer, self.handles, self.parametrized = ctx.layer, [], []
        switch = QuantizerSwitch()
        site_of = {name: site for site in sites for name in site.linears}
        for name, (weight_spec, input_spec) in ctx.specs.items():
            linear = ctx.layer.get_submodule(name)
            site = site_of.get(name)
            if site is not None:  # after the rotation's own pre-hook (registered first)
                parametrize.register_parametrization(linear, "weight", _TimesU(site))
                self.handles.append(linear.register_forward_pre_hook(_rotate_after(site)))
            if weights and weight_spec is not None:
                parametrize.register_parametrization(linear, "weight", StraightThroughWeight(weight_spec, switch))
            if site is not None or (weights and weight_spec is not None):
                self.parametrized.append(linear)
            if input_spec is not None:
                self.handles.append(linear.register_forward_pre_hook(quantize_input_hook(learning_spec(input_spec),
                                                                                         switch)))
        self.attentions = {name: ctx.layer.get_submodule(name) for name in ctx.kv_cache}
        self.kept = {name: getattr(module, "kv_cache_quantizer", None) for name, module in self.attentions.items()}
        for name, spec in ctx.kv_cache.items():
            self.attentions[name].kv_cache_quantizer = KVStraightThrough(spec, switch)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for linear in self.parametrized:
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
        for name, attention in self.attentions.items():
            if self.kept[name] is None:
                del attention.kv_cache_quantizer
            else:
                attention.kv_cache_quantizer = self.kept[name]


def _relative_mse(out: Any, target: torch.Tensor) -> torch.Tensor:
    out = out[0] if isinstance(out, tuple) else out
    return (out.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


@torch.no_grad()
def _mean_loss(ctx: LayerContext, data: list, sites: list[_Site], start: bool) -> float:
    """The loss over the batches ``data`` (averaged over the ranks), at the sites' current U or (``start``) at U = I."""
    for site in sites:
        site.value = torch.eye(site.n, device=site.value.device) if start else site.orthogonal().float()
    losses = [_relative_mse(ctx.layer(hidden, **kwargs), target).item() for hidden, kwargs, target in data]
    total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
    total = ctx.ranks.sum(total) if ctx.ranks.world > 1 else total
    return float(total[0] / total[1])


def _learn(ctx: LayerContext, sites: list[_Site], config: OnlineLearningConfig) -> dict[str, Any]:
    """Adam on the sites' A over the layer's calibration batches (targets: the float layer's outputs). The U found are
    kept only if their loss over the check's batches (every batch, or the last ``holdout``, not learned from) is
    below the start's (the straight-through loss is not smooth: a run can end above where it began), else the sites
    go back to U = I. With several ranks each step takes the mean gradient of theirs, so every rank learns the same U.
    Returns the manifest entry."""
    data = []
    for hidden, kwargs in ctx.batches(config.batch):
        with torch.no_grad():
            target = ctx.layer(hidden, **kwargs)
        data.append((hidden, kwargs, (target[0] if isinstance(target, tuple) else target).float()))
    if config.holdout >= len(data):
        raise LlmquantError(f"learn_online.holdout: {config.holdout} of the layer's {len(data)} calibration batches "
                            f"of {config.batch} set aside leaves none to learn from (allowed: 0 to {len(data) - 1})")
    learn, check = (data[:-config.holdout], data[-config.holdout:]) if config.holdout else (data, data)
    params = [a for site in sites for a in site.factors]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations)
    frozen = [p for p in ctx.layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    network = _LossNetwork(ctx, sites, config.weights)
    losses: list[float] = []
    try:
        before = _mean_loss(ctx, check, sites, start=True)
        with torch.enable_grad():
            for step in range(config.iterations):
                hidden, kwargs, target = learn[step % len(learn)]
                optimizer.zero_grad()
                for site in sites:
                    site.refresh()
                loss = _relative_mse(ctx.layer(hidden, **kwargs), target)
                loss.backward()
                ctx.ranks.average_gradients(params)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
        after = _mean_loss(ctx, check, sites, start=False)
    finally:
        network.close()
        for p in frozen:
            p.requires_grad_(True)
    if after >= before:
        for site in sites:
            site.reset()
    return {"steps": len(losses), "form": config.form, "checked_on": "held-out" if config.holdout else "calibration",
            "loss_start": before, "loss_learned": after, "kept": after < before}


def _fold(layer: nn.Module, site: _Site, label: str) -> None:
    """Q <- Q U in the online rotation of the site's Linears (one learned rotation, shared: they all start from the
    same Q) and W <- W U (float64, cast back): the float function is kept."""
    u = site.orthogonal()
    linears = [layer.get_submodule(name) for name in site.linears]
    start = input_rotation_of(linears[0])
    assert start is not None and all(input_rotation_of(linear) == start for linear in linears)
    learned = learned_rotation(storable(start.matrix() @ u.cpu()), f"{label}, from {start.describe()}")
    for linear in linears:
        linear.weight.data = (linear.weight.data.double() @ u.to(linear.weight.device)).to(linear.weight.dtype)
        linear.input_rotation = OnlineRotation(learned).to(linear.weight.device)


def _online_cost(layer: nn.Module, sites: list[_Site]) -> int:
    """Multiply-adds a token of the sites' online rotations (each Linear rotates its own copy of the input)."""
    return sum(input_rotation_of(layer.get_submodule(name)).online_flops()  # type: ignore[union-attr]
               for site in sites for name in site.linears)


class OnlineLearningStep(LayerStep):
    """The per-layer step (`llmquant.algorithms.lifecycle`): after the smoothing step, before the weights are
    rounded; each site's U learned, then folded into the rotation and the weights (the engine checks the function)."""

    name = "learned_online_rotations"
    keeps_function = True

    def __init__(self, config: OnlineLearningConfig) -> None:
        self.config = config

    def transform(self, ctx: LayerContext) -> dict[str, Any]:
        start = time.perf_counter()
        found = shared_input_sites(ctx.layer, lambda: ctx.run_sample(1))
        sites = []
        for names in found:
            first = ctx.layer.get_submodule(names[0])
            size = input_rotation_of(first).n  # type: ignore[union-attr]
            if not self.config.max_size or size <= self.config.max_size:
                sites.append(_Site(names, size, first.weight.device, self.config.form == "kronecker"))
        if not sites:
            return {}
        entry = _learn(ctx, sites, self.config)
        entry["online_multiply_adds_per_token"] = {"before": _online_cost(ctx.layer, sites)}
        if entry["kept"]:
            label = f"layer {ctx.index}, {entry['steps']} Adam steps on its output error"
            for site in sites:
                _fold(ctx.layer, site, label)
        entry["online_multiply_adds_per_token"]["after"] = _online_cost(ctx.layer, sites)
        log.info("%s: learned online rotations %s (output loss %.5f -> %.5f)", ctx.where,
                 "kept" if entry["kept"] else "not kept", entry["loss_start"], entry["loss_learned"])
        return {"learned_online_rotations": {"sites": [site.linears for site in sites], **entry,
                                             "seconds": round(time.perf_counter() - start, 2)}}


__all__ = ["OnlineLearningConfig", "OnlineLearningStep", "cayley", "kronecker_factors", "shared_input_sites"]

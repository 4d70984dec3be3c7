"""One decoder layer's quantized weights trained against its float output (EfficientQAT's Block-AP: Chen et al. 2024,
"EfficientQAT: Efficient Quantization-Aware Training for Large Language Models", arXiv 2407.11062, section 3.2).

Once a layer's Linears are quantized (by GPTQ, AWQ or round to nearest), each weight is W = (q - z) s. Block-AP
trains the weights and their step sizes of a whole block at once, with the block's own quantizers in the forward pass,
against the mean squared error of the block's output:

    min over s, d of  E_x || block_q(x; s, round(q + d)) - block(x) ||^2

over the layer's calibration inputs x (those the quantized model feeds it), with the activations and the KV cache
quantized as the block will run them and every rounding passed straight through (`llmquant.quant.straight_through`).
Where GPTQ minimises each Linear's output error alone, with float inputs to the later Linears' quantizers taken as
they come, this sees what the Linears' errors, the 4-bit inputs and the KV cache do to the layer's output together.

Deliberate deviations from EfficientQAT, and why:

- The weights train as offsets d on the codes (`QuantLinear.code_offsets`, in steps of the codes' grid, from 0; Adam's
  step ``codes_lr``), not as float weights: the checkpoint keeps its codes, zero points and format, and the offsets
  start from the codes GPTQ chose, not from round to nearest. A code moves to the next one of its grid (integers, or
  E4M3 values) where its offset passes 0.5 (`llmquant.algorithms.scale_training`).
- The scales train in the log domain, s = s0 exp(t) (as `llmquant.algorithms.scale_training`), the zero points stay.
- The target (``target``): ``model`` (the default, EfficientQAT's own: its labels are the float blocks' outputs on
  the float stream), the float model's own output of the layer (the float layer on the float model's inputs, the
  stream GPTAQ carries), so that a layer also learns to undo what the layers before it got wrong; or ``layer``, the
  float layer's output on the same (quantized-model) inputs, what GPTQ aims each Linear at, which needs no second
  stream. ``model`` measured better on both corpora for W3 and W4 g64 (BENCHMARKS.md).
- Held-out check: the last ``holdout`` calibration samples are not trained on; what was trained is kept only if it
  lowers their error (else the layer keeps what the per-layer steps gave it). EfficientQAT trains on 4096 samples.

Effect on the default model (BENCHMARKS.md "Block training", the defaults below, 120 samples): W3 g64 with
``target: model`` x1.1174 -> x1.0902 of float on pydoc and x1.2927 -> x1.2464 on stdlib; W4A4KV4 (per-channel weights,
per-token inputs) x1.1138 -> x1.0956 on pydoc but x1.2197 -> x1.2306 on stdlib; W4 g64 within a percent.

Cost: ``epochs`` passes of one sample a step, a forward and a backward pass of the layer each, before the layer's
quantized pass; memory (`state_bytes`): the float weight and its gradient (8 bytes a weight of the layer), and with
``codes_lr`` a float offset, its gradient, Adam's two moments and the starting code (17 more), and one sample's
autograd graph (`saved_tensor_bytes`, measured at the first step). The engine refuses a layer whose state exceeds what
the run's memory caps leave, before it trains, and one whose graph exceeds what the state leaves, at its first step
before any update (the float weights the graph saves are counted in the state too: the check errs on the safe side).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmquant.algorithms.scale_training import (
    codes_changed,
    frozen,
    loss_tenths,
    restore_weights,
    rounded,
    set_scales,
    trainable_layers,
    trained_codes,
)
from llmquant.errors import LlmquantError
from llmquant.parallel import SINGLE, Ranks
from llmquant.quant.metrics import relative_error

Sample = Callable[[int], tuple[torch.Tensor, dict[str, Any]]]  # sample i's hidden state [1, T, H] and kwargs


@dataclass(frozen=True)
class BlockTrainingConfig:
    """``epochs`` passes over the layer's calibration samples but the last ``holdout`` (which decide whether what was
    trained is kept; 0: kept unchecked), one sample a step; Adam's largest steps on the scales' logarithms (``lr``)
    and on the codes' offsets (``codes_lr``; 0: the codes stay), cosine-decayed to 0; ``target``: what the layer's
    output is aimed at (module docstring; the caller gives the targets)."""

    epochs: float = 1.0
    lr: float = 1e-2
    codes_lr: float = 2e-2
    holdout: int = 8
    target: str = "model"  # "model": the float model's own output of the layer; "layer": the float layer on its inputs


@dataclass
class TrainedBlock:
    """What one layer's training did: its steps and seconds, the relative output error of the held-out samples
    before and after (None without a held-out set), the training loss over its first and last tenth of steps, the
    codes it changed and whether what it trained was kept."""

    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    held_out_before: float | None = None
    held_out_after: float | None = None
    codes_changed: int = 0
    kept: bool = True
    graph_bytes: int = 0  # what autograd kept of the first step's forward for its backward

    def describe(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 1), **loss_tenths(self.losses),
                "held_out_error_before": rounded(self.held_out_before),
                "held_out_error_after": rounded(self.held_out_after),
                "codes_changed": self.codes_changed, "kept": self.kept,
                "graph_mib": round(self.graph_bytes / 2**20, 1)}


def state_bytes(layer: nn.Module, config: BlockTrainingConfig) -> int:
    """The bytes `train_block` holds for ``layer``'s quantized weights beyond the layer itself: each weight's float
    value and gradient (8 bytes), and with ``config.codes_lr`` its offset, the offset's gradient, Adam's two moments
    (16) and the code it started from (1). One sample's autograd graph comes on top (`saved_tensor_bytes`)."""
    weights = sum(linear.in_features * linear.out_features for linear in trainable_layers(layer).values())
    return weights * (8 + (17 if config.codes_lr else 0))


@contextmanager
def saved_tensor_bytes(layer: nn.Module) -> Iterator[dict[int, int]]:
    """The storages autograd saves for the backward pass of what runs inside (data pointer -> bytes, each storage
    once), but ``layer``'s own parameters and buffers, which are there anyway: one sample's graph, measured. Each
    storage is held until the block ends, so that no address is freed and reused within it (a branch of the graph
    the output does not keep, such as the KV cache the layer returns, still counts: the count errs high)."""
    resident = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    saved: dict[int, int] = {}
    held: list[torch.UntypedStorage] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident and storage.data_ptr() not in saved:
            saved[storage.data_ptr()] = storage.nbytes()
            held.append(storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def _check_graph(graph: int, memory_left: int | None, ranks: Ranks, where: str) -> None:
    """Refuse (on every process alike) a first step whose graph exceeds ``memory_left``, what the run's caps leave
    beyond the training's state (None: unknown)."""
    if memory_left is not None and not ranks.least(int(graph <= memory_left)):
        some = " (on some process)" if ranks.world > 1 else ""  # (the figure is this process's; one over refuses all)
        raise LlmquantError(f"{where}: block training's autograd graph of one calibration sample takes "
                            f"{graph / 2**20:.1f} MiB{some}, more than the {memory_left / 2**20:.1f} MiB "
                            f"its weights' state leaves free where the layer computes, under the run's memory caps; "
                            f"allowed: a larger --max-memory or --max-gpu-memory, shorter calibration samples, or no "
                            f"block_training")


def _output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class SampleSplit:
    """This process's samples to train on and to hold out (indices into its own), and how many all the processes
    train on together."""

    train: list[int]
    held: list[int]
    trained_in_all: int


def split_rows(count: int, holdout: int, ranks: Ranks = SINGLE, where: str = "") -> SampleSplit:
    """This process's samples (``count`` of them, its block of `Ranks.share`) to train on and to hold out: the held-out
    ones are the last ``holdout`` of all the processes' samples, so the last process holds them. A holdout that
    leaves a process none to train on is a one-line error (the same on every process)."""
    total = round(ranks.total(float(count)))
    last = total - Ranks(ranks.world - 1, ranks.world).share(total).start  # the last process's samples
    if holdout >= last:
        whose = "this process's" if ranks.world == 1 else f"the last of the {ranks.world} processes'"
        raise LlmquantError(f"{where}: block_training.holdout {holdout} leaves none of {whose} {last} calibration "
                            f"samples to train on; allowed: fewer than {last}")
    start = ranks.share(total).start
    train = [i for i in range(count) if start + i < total - holdout]
    return SampleSplit(train, [i for i in range(count) if start + i >= total - holdout], total - holdout)


@torch.no_grad()
def relative_output_error(layer: nn.Module, sample: Sample, targets: Sequence[torch.Tensor],
                          rows: Sequence[int], ranks: Ranks = SINGLE) -> float:
    """||layer(x) - target|| / ||target|| over the samples ``rows`` (of every process of ``ranks``)."""
    return relative_error((targets[i] for i in rows), (_output(layer, *sample(i)) for i in rows), ranks)


def train_block(layer: nn.Module, sample: Sample, targets: Sequence[torch.Tensor], config: BlockTrainingConfig,
                ranks: Ranks = SINGLE, where: str = "", memory_left: int | None = None) -> TrainedBlock:
    """Train the scales (and, with ``config.codes_lr``, the codes) of every quantized weight of ``layer`` so that its
    output on sample i (``sample(i)``) nears ``targets[i]`` (``config.target``'s, module docstring); the layer keeps
    what was trained, or its own values where the held-out samples say they are worse. The caller checks that the
    layer has integer weights to train.

    In several processes (``ranks``) each holds its block of the samples: a step takes one sample on every process
    and averages their gradients (data parallel), so every process ends with the same layer, after about 1/world of
    one process's steps (as scale training's steps).

    The first step measures its autograd graph (`saved_tensor_bytes`) and, where it exceeds ``memory_left`` (the
    bytes the run's caps leave beyond `state_bytes`), refuses in one line before its backward pass: the layer keeps
    its values."""
    result = TrainedBlock()
    layers = trainable_layers(layer)
    split = split_rows(len(targets), config.holdout, ranks, where)
    train, held = split.train, split.held
    began = time.perf_counter()
    if config.holdout:
        result.held_out_before = relative_output_error(layer, sample, targets, held, ranks)
    start = {name: linear.weight_scale.detach().clone() for name, linear in layers.items()}
    start_codes = {name: linear.codes().clone() for name, linear in layers.items()} if config.codes_lr else {}
    logs = {name: torch.zeros_like(scale, requires_grad=True) for name, scale in start.items()}
    steps = max(1, round(config.epochs * split.trained_in_all / ranks.world))
    with torch.enable_grad(), frozen(layer), trained_codes(layers, start_codes) as offsets:
        groups = [{"params": list(logs.values()), "lr": config.lr}]
        groups += [{"params": list(offsets.values()), "lr": config.codes_lr}] if offsets else []
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
        try:
            for step in range(steps):
                set_scales(layers, {name: start[name] * torch.exp(logs[name]) for name in layers}, step=True)
                row = train[step % len(train)]
                with saved_tensor_bytes(layer) if step == 0 else nullcontext({}) as saved:
                    out = _output(layer, *sample(row))
                if step == 0:
                    result.graph_bytes = sum(saved.values())
                    _check_graph(result.graph_bytes, memory_left, ranks, where)
                loss = (out.float() - targets[row].to(out.device).float()).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                ranks.average_gradients([p for group in groups for p in group["params"]])
                optimizer.step()
                schedule.step()
                result.losses.append(loss.item())
        finally:  # (interrupted too: plain tensors again, the trained values so far)
            with torch.no_grad():
                set_scales(layers, {name: (start[name] * torch.exp(logs[name])).contiguous() for name in layers})
    result.steps, result.losses = steps, ranks.mean(result.losses)
    result.codes_changed = codes_changed(layers, start_codes)
    if config.holdout:
        result.held_out_after = relative_output_error(layer, sample, targets, held, ranks)
        result.kept = result.held_out_after < result.held_out_before
        if not result.kept:
            restore_weights(layers, start, start_codes)
    result.seconds = time.perf_counter() - began
    return result


__all__ = ["BlockTrainingConfig", "SampleSplit", "TrainedBlock", "relative_output_error", "saved_tensor_bytes",
           "split_rows", "state_bytes", "train_block"]

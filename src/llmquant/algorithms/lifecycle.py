"""One per-layer lifecycle for every algorithm: observe -> transform -> quantize -> release.

The engine (`llmquant.pipeline.engine`) runs each decoder layer through the steps a recipe asks for, in
recipe order, and knows none of them by name. For one layer it

1. runs a float pass over every calibration sample with the hooks of each step's `LayerStep.observe`
   (statistics of the untouched layer: channel maxima, token samples); this pass gives the reference
   outputs (it is skipped when no step observes or claims to keep the function, and the pass of 3 is the
   reference);
2. calls each step's `LayerStep.transform`: changes of the float weights that keep the layer's function
   (smoothing scales), which the engine checks on the layer's outputs;
3. makes the layer's `QuantLinear`s (round to nearest from the transformed weights); when a step
   `LayerStep.wants_reference`, runs the transformed float layer on the float model's own inputs (the reference
   stream, which the engine carries from layer to layer beside the quantized one) with the hooks of
   `LayerStep.observe_reference` (GPTAQ's targets); then runs a float pass
   of the transformed layer with the hooks of `LayerStep.observe_transformed` (GPTQ's Hessians from the
   float layer) and the scheme's own observers (static input scales, the KV cache); every sample when a
   hook needs them, else the first batch (the equivalence check only);
4. swaps the `QuantLinear`s in and calls each step's `LayerStep.quantize`, which may set their weights
   otherwise (GPTQ's sweeps, AWQ's clipping) and may run the layer on its inputs (`LayerContext.feed`);
5. calls `LayerStep.release`, then runs the quantized pass that feeds the next layer.

Once per run, before the first layer, `LayerStep.setup` sees the first decoder layer (smoothing groups
are found there). Each hook returns the entries it adds to the layer's manifest row.

The context hands a step what it may touch: the layer, its Linears and their specs, and two ways to run
the layer on its calibration inputs, so the algorithms stay below the engine in the stack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from llmquant.nn.quant_linear import QuantLinear
from llmquant.parallel import Ranks
from llmquant.quant.spec import QuantSpec

Specs = dict[str, tuple[QuantSpec | None, QuantSpec | None]]  # Linear (relative name) -> (weight, input) specs


@dataclass
class SetupContext:
    """What `LayerStep.setup` sees once per run: the first decoder layer, the relative names of a decoder
    layer's Linears (the model map's), and a way to run the layer on one calibration sample (``run_sample()``)."""

    layer: nn.Module
    where: str  # the layer's name in the model
    head_dim: int | None
    linears: list[str]
    run_sample: Callable[[], Any]
    ranks: Ranks = field(default_factory=Ranks)


@dataclass
class LayerContext:
    """One decoder layer as the steps see it.

    ``specs``: the weight and input spec of each of the layer's Linears (None: left float).
    ``linears``: the float Linear and the `QuantLinear` that replaces it, by relative name (from step 3 on).
    ``run_sample(batch)``: run the layer on the first ``batch`` calibration samples, returning the outputs.
    ``feed(module, consume)``: run the layer on every calibration sample only as far as ``module``, giving each
    batch's input of ``module`` to ``consume``.
    ``feed_each(consumers)``: run the layer on every calibration sample, giving each module's input to its consumer
    whenever it is called (modules on parallel paths, such as experts, in one pass).
    ``ranks``: the processes sharing the calibration samples (`llmquant.parallel`); a step reduces what it
    gathered over them (`Ranks.sum`, `Ranks.max`, ...) and may split its solves among them. One process: every
    collective is the identity.
    ``working_memory()``: the bytes the step's working tensors may still take where the layer computes, under the
    run's caps (`llmquant.device.DevicePolicy.working_memory`; None: unknown), read when the work begins: GPTQ
    sizes its rounds of experts and its sweeps by it.
    ``batches(batch)``: the calibration inputs of the layer, ``batch`` samples at a time where their keyword
    arguments allow it, as (hidden states, keyword arguments) on the layer's device: for a step that runs the layer
    itself (with gradients: `llmquant.algorithms.learned_online`).
    ``kv_cache``: the KV-cache spec of each attention of the layer that quantizes its cache (relative names).
    """

    layer: nn.Module
    index: int
    where: str
    specs: Specs
    run_sample: Callable[[int], Any]
    feed: Callable[[nn.Module, Callable[[torch.Tensor], None]], None]
    feed_each: Callable[[dict[nn.Module, Callable[[torch.Tensor], None]]], None]
    linears: dict[str, tuple[nn.Linear, QuantLinear]] = field(default_factory=dict)
    ranks: Ranks = field(default_factory=Ranks)
    working_memory: Callable[[], int | None] = field(default=lambda: None)
    batches: Callable[[int], Iterator[tuple[torch.Tensor, dict[str, Any]]]] = field(default=lambda _batch: iter(()))
    kv_cache: dict[str, QuantSpec] = field(default_factory=dict)

    def quantized_names(self) -> list[str]:
        """The Linears whose weights are quantized, in the layer's module order."""
        return [name for name, (_, quantized) in self.linears.items() if quantized.weight_spec is not None]


class LayerStep:
    """An algorithm's per-layer lifecycle; every hook is optional (the defaults do nothing)."""

    name = "step"
    keeps_function = False  # whether `transform` claims to keep the layer's function (the engine checks it)
    wants_reference = False  # whether the step reads the float model's own inputs (`observe_reference`)

    def setup(self, ctx: SetupContext) -> dict[str, Any]:
        """Once per run, on the first decoder layer; returns the run's manifest entries."""
        return {}

    def observe(self, ctx: LayerContext) -> list[RemovableHandle]:
        """Hooks for the float pass over every calibration sample, before any transform."""
        return []

    def transform(self, ctx: LayerContext) -> dict[str, Any]:
        """Change the float weights (keeping the function when `keeps_function`); manifest row entries."""
        return {}

    def observe_reference(self, ctx: LayerContext) -> list[RemovableHandle]:
        """Hooks for the pass of the transformed float layer on the float model's own inputs over every sample (only
        when a step `wants_reference`), batched as the passes over the quantized model's inputs are."""
        return []

    def observe_transformed(self, ctx: LayerContext) -> list[RemovableHandle]:
        """Hooks for the float pass of the transformed layer (every sample when any are returned)."""
        return []

    def quantize(self, ctx: LayerContext) -> dict[str, Any]:
        """Set the weights of ``ctx.linears``' QuantLinears (they hold round to nearest); manifest row entries."""
        return {}

    def release(self, ctx: LayerContext) -> None:
        """Drop what was kept for this layer."""


__all__ = ["LayerContext", "LayerStep", "SetupContext", "Specs"]

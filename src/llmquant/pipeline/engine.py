"""The engine: run a recipe on a model, decoder layer by decoder layer.

1. Resolve the recipe into a `QuantPlan` (a scheme per Linear) before any weight is touched.
1b. With QuaRot, plan the rotations on the first layer and rotate the embeddings (data-free, checked for
   equivalence: `llmquant.pipeline.rotation`); each layer is rotated just before it is calibrated.
2. Capture the first decoder layer's inputs for the calibration samples (one pass of the embeddings).
3. For each layer: a float pass records the output (and, with smoothing, each group's activation
   statistics; the groups are found once on layer 0, then smoothed and checked for equivalence), and,
   through observers, the input range of every Linear with a static input scale and of the KV cache;
   the Linears are swapped for `QuantLinear`s (with ``block_training``, then trained against the float pass's
   outputs: `llmquant.algorithms.block_training`); a quantized pass gives the outputs that become the next
   layer's inputs (so each layer is calibrated on what the quantized model really feeds it) and the
   layer's output error. When a step wants the float model's own activations (GPTAQ), a second stream of
   them, the reference, goes through each transformed float layer beside the quantized one.
4. Linears outside the decoder layers (the head, when a recipe asks for it) are quantized last.

Only the current layer's weights and the calibration activations are touched at a time; with a
streaming `LayerSource` only they are in memory, with an offloading `ActivationStorage` the activations
wait on disk too (one batch read at a time), and a `RunDir` keeps every finished layer so that an
interrupted run resumes from the last one.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from llmquant.algorithms.block_training import BlockTrainingConfig, state_bytes, train_block
from llmquant.algorithms.generated_windows import end_of_sequence_ids, generated_windows
from llmquant.algorithms.lifecycle import LayerContext, LayerStep, SetupContext, Specs
from llmquant.algorithms.quarot import rotate_layer
from llmquant.algorithms.scale_training import (
    TeacherTargets,
    TrainedScales,
    teacher_targets,
    train_scales,
    trainable_layers,
)
from llmquant.device import (
    DevicePolicy,
    cast_weights,
    device_of,
    peak_memory_mb,
    reset_peak_memory,
    resident_bytes,
    to_device,
)
from llmquant.errors import LlmquantError
from llmquant.model.lazy import map_large_allocations
from llmquant.model.model_map import ModelMap, detect_model_map, layer_structure, not_quantizable, untie_head
from llmquant.model.moe import unfuse_experts
from llmquant.model.offloaded import is_offloaded, load_offloaded
from llmquant.model.patterns import SmoothGroup, detect_smooth_groups
from llmquant.nn.experts import all_experts, lean_experts
from llmquant.nn.kv_cache import KVCacheQuantizer, enable_kv_quantization
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.parallel import SINGLE, Ranks
from llmquant.pipeline.activations import ActivationStorage
from llmquant.pipeline.clip_search import search_clip_ratios
from llmquant.pipeline.layer_io import (
    BATCH,
    LayerInputs,
    capture_layer_inputs,
    check_equivalence,
    compute_dtype,
    equivalence_tolerance,
    float32_probe,
    head_dim_of,
    input_batches,
    inputs_of,
    inputs_of_each,
    never_called,
    run_layer,
    run_through,
    uncalled_linears,
)
from llmquant.pipeline.learned_rotation import learn_rotations
from llmquant.pipeline.memory import activation_storage
from llmquant.pipeline.rotation import RotationOverrides, RotationPass, with_seed_map
from llmquant.pipeline.run_dir import RunDir
from llmquant.pipeline.source import LayerSource
from llmquant.quant.metrics import relative_error
from llmquant.quant.scheme import Scheme
from llmquant.recipe import QuantPlan, QuaRotPreOpt, Recipe

log = logging.getLogger(__name__)
ROTATION_CHECK_TOKENS = 128  # the rotation pass plans and checks on one calibration sample this long
ERROR_SAMPLES = 1  # samples (of each process) of a pass that only gives the error figures its reference or outputs


@dataclass
class Manifest:
    """What a run did: written as llmquant.json next to the checkpoint."""

    recipe: dict
    model_map: dict
    versions: dict
    seconds: dict[str, float] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    plan: list[dict] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def versions() -> dict[str, str]:
    import transformers

    import llmquant

    return {
        "llmquant": llmquant.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _batch_invariant(plan: QuantPlan, prefix: str) -> bool:
    """Whether the quantized layer computes each sample alone (no scale taken over a whole batch)."""
    specs = [s.input_activations for n, s in plan.linears.items() if n.startswith(prefix + ".")]
    specs += [s for n, s in plan.kv_cache.items() if n.startswith(prefix + ".")]
    return not any(s is not None and s.dynamic and s.granularity == "tensor" for s in specs)


class _InputObservers:
    """Forward pre-hooks that feed the inputs of float Linears to the QuantLinears that replace them."""

    def __init__(self, linears: dict[str, tuple[nn.Linear, QuantLinear]]) -> None:
        self.handles = []
        for _, (linear, quantized) in linears.items():
            quantized.start_observing()
            if quantized.observer is not None:
                hook = self._hook(quantized)
                self.handles.append(linear.register_forward_pre_hook(hook))

    @staticmethod
    def _hook(quantized: QuantLinear):
        def observe(_module: nn.Module, args: tuple) -> None:
            quantized.quantize_input(args[0])

        return observe

    def close(self) -> None:
        _remove(self.handles)


class _LinearErrorProbe:
    """On the first sample of a quantized pass, each QuantLinear's relative output error against its float
    weight on the same (quantized-model) input: which Linears of a layer are hard to quantize. (One sample,
    not the first batch: the float products cost a quarter of a pass over 32 samples otherwise.)"""

    def __init__(self, layer: nn.Module, linears: dict[str, tuple[nn.Linear, QuantLinear]]) -> None:
        self.errors: dict[str, float] = {}
        self.handles = [
            quantized.register_forward_hook(self._hook(rel, linear)) for rel, (linear, quantized) in linears.items()
        ]

    def _hook(self, rel: str, linear: nn.Linear):
        def measure(module: QuantLinear, args: tuple, out: torch.Tensor) -> None:
            if rel in self.errors:
                return
            reference = torch.nn.functional.linear(args[0][:1].float(), linear.weight.float(),
                                                   None if linear.bias is None else linear.bias.float())
            self.errors[rel] = float((out[:1].float() - reference).norm() / reference.norm().clamp(min=1e-30))

        return measure

    def close(self) -> None:
        _remove(self.handles)


def _weight_errors(linears: dict[str, tuple[nn.Linear, QuantLinear]]) -> dict[str, float]:
    """Each quantized Linear's relative weight error ||W_hat - W|| / ||W||, by relative name (the manifest's)."""
    return {rel: quantized.weight_error(linear.weight) for rel, (linear, quantized) in linears.items()}


def _leave_float(plan: QuantPlan, prefix: str, names: list[str]) -> None:
    """The plan's scheme of each Linear ``names`` of the layer ``prefix`` becomes float (`uncalled_linears`)."""
    for name in names:
        if f"{prefix}.{name}" in plan.linears:
            plan.linears[f"{prefix}.{name}"] = Scheme()


def _check_attention_interface(attention: nn.Module, where: str) -> None:
    """Refuse a KV cache whose attention never called the attention interface on the pass just run (Falcon computes
    attention in its own code): the cache quantizer would act nowhere, and the wrapper's name changes its function."""
    if getattr(attention, "_llmquant_attention_calls", 0) == 0:
        raise LlmquantError(f"{where}: {type(attention).__name__} computes attention in its own code, not through "
                            "transformers' attention interface, where llmquant quantizes the KV cache; choose a "
                            "scheme without a KV cache (--kv-cache is not available for this model)")


def _probe_attention_interface(first: nn.Module, model_map: ModelMap, attention: nn.Module, probe: LayerInputs
                               ) -> None:
    """`_check_attention_interface` on the first layer run once on 8 random tokens (``probe``: a run without
    calibration samples, its KV cache is dynamic, nothing else runs the layer before the checkpoint is written)."""
    attention._llmquant_attention_calls = 0
    run_layer(first, probe, model_map.layer_name(0))
    _check_attention_interface(attention, model_map.layer_name(0))


def _random_layer_inputs(model: nn.Module, model_map: ModelMap) -> LayerInputs:
    """The first layer's inputs for 8 random tokens: what a run without calibration samples runs a layer on to
    learn how it behaves (which Linears it calls, whether its attention calls the interface)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    return capture_layer_inputs(model, model_map, ids)


def _swap(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _quantizers_for_layer(
    layer: nn.Module, prefix: str, plan: QuantPlan
) -> dict[str, tuple[nn.Linear, QuantLinear]]:
    chosen = {}
    for rel, module in layer.named_modules():
        scheme = plan.linears.get(f"{prefix}.{rel}")
        if isinstance(module, nn.Linear) and scheme is not None and not scheme.is_float:
            chosen[rel] = (module, QuantLinear.from_linear(module, scheme.weights, scheme.input_activations))
    return chosen


def find_smooth_groups(model: nn.Module, model_map: ModelMap, inputs: LayerInputs) -> list[SmoothGroup]:
    """The smoothing groups of the first decoder layer, observed on its first calibration input."""
    layer, run = float32_probe(model_map.layers(model)[0], inputs)
    with all_experts(layer):
        return detect_smooth_groups(layer, run, head_dim_of(model, model_map), model_map.layer_name(0))


def _check_equivalence(reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor], what: str,
                       where: str, dtype: torch.dtype, ranks: Ranks = SINGLE) -> float:
    """A transform that claims to keep the function must keep the layer's outputs (`check_equivalence`)."""
    return check_equivalence(relative_error(reference, actual, ranks), dtype, what, where,
                             "the layer map or smoothing groups do not fit this model")


def _check_key_centering(layer: nn.Module, quantizer: KVCacheQuantizer, inputs: LayerInputs,
                         reference: Sequence[torch.Tensor], where: str, ranks: Ranks) -> dict[str, Any]:
    """Centred keys keep softmax attention's function (`llmquant.nn.kv_cache`); a layer whose outputs on the first
    samples move by more than `equivalence_tolerance` with the keys centred and nothing quantized (attention sinks,
    soft-capping) keeps its keys as they are, with a warning. Returns the manifest's ``center_keys`` entry."""
    quantizer.quantizing = False
    try:
        centred = run_layer(layer, inputs.head(min(BATCH, len(reference))), where)  # (the samples it compares)
    finally:
        quantizer.quantizing = True
    error = relative_error(reference, centred, ranks)
    tolerance = equivalence_tolerance(compute_dtype(layer))
    row = {"kept": error <= tolerance, "equivalence_error": error, "positions": quantizer.key_positions}
    if row["kept"]:
        return {"center_keys": row}
    quantizer.drop_key_mean()
    log.warning("%s: keys not centred: centring them changed the layer's float output by %.2e > %.1e (its attention "
                "is not softmax over q k alone: sinks, soft-capping or a cache of other states)", where, error,
                tolerance)
    return {"center_keys": row}


def _layer_specs(layer: nn.Module, prefix: str, plan: QuantPlan) -> Specs:
    """The (weight, input) specs of every Linear of the layer, by relative name ((None, None): float)."""
    specs: Specs = {}
    for rel, module in layer.named_modules():
        scheme = plan.linears.get(f"{prefix}.{rel}")
        if isinstance(module, nn.Linear):
            specs[rel] = (scheme.weights, scheme.input_activations) if scheme is not None else (None, None)
    return specs


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def layer_context(layer: nn.Module, index: int, prefix: str, plan: QuantPlan, inputs: LayerInputs,
                  ranks: Ranks = SINGLE, policy: DevicePolicy | None = None) -> LayerContext:
    """What the steps of `llmquant.algorithms.lifecycle` see of one layer and its calibration inputs (this rank's
    share of them, with ``ranks``), and the working memory ``policy``'s caps leave them (unknown without one)."""
    return LayerContext(
        layer=layer, index=index, where=prefix, specs=_layer_specs(layer, prefix, plan),
        run_sample=lambda count: run_layer(layer, inputs.head(count), prefix),
        feed=lambda module, consume: inputs_of(layer, module, inputs, consume),
        feed_each=lambda consumers: inputs_of_each(layer, consumers, inputs), ranks=ranks,
        working_memory=policy.working_memory if policy is not None else lambda: None,
        batches=lambda batch: input_batches(inputs, batch, device_of(layer)),
        kv_cache={name[len(prefix) + 1:]: spec for name, spec in plan.kv_cache.items()
                  if spec is not None and name.startswith(prefix + ".")},
    )


def setup_steps(steps: Sequence[LayerStep], layer: nn.Module, where: str, head_dim: int | None,
                linears: list[str], inputs: LayerInputs, ranks: Ranks = SINGLE) -> dict:
    """`LayerStep.setup` of every step on ``layer`` (in float32: `float32_probe`), with every expert running; the
    manifest entries they return. The engine calls it on the first decoder layer and again on each layer made
    otherwise than the one before (`layer_structure`)."""
    if not steps:
        return {}
    probe, run = float32_probe(layer, inputs)
    context = SetupContext(layer=probe, where=where, head_dim=head_dim, linears=linears, run_sample=run, ranks=ranks)
    results: dict[str, Any] = {}
    with all_experts(probe):  # (patterns are found with every expert running)
        for step in steps:
            results.update(step.setup(context))
    return results


def _calibrate(ctx: LayerContext, steps: Sequence[LayerStep], plan: QuantPlan, inputs: LayerInputs,
               storage: ActivationStorage, row: dict[str, Any], attention: nn.Module | None, kv_spec: Any,
               every_sample: bool, reference: LayerInputs | None = None
               ) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor] | None]:
    """Steps 1-4 of `llmquant.algorithms.lifecycle` on one layer: the float pass with the steps' observers, their
    transforms (checked for equivalence), the pass of the transformed layer on the float model's own inputs
    (``reference``, when given) with the steps' reference observers, the QuantLinears swapped in after the
    transformed pass with the static observers (every sample when ``every_sample`` or a step's hook needs them, else
    the first sample; a static KV cache's observers see the other samples as far as the attention), then the steps'
    quantization. Returns the float layer's outputs on ``inputs`` and on
    ``reference`` (None without it); the manifest entries go to ``row``. A pass that feeds
    statistics runs every calibration token through every expert of an MoE layer (`all_experts`, unless the recipe
    says ``moe_calibrate: routed``, around the call); one that only checks runs as the router chooses (the same
    outputs)."""
    layer, prefix, ranks = ctx.layer, ctx.where, ctx.ranks
    float_out = None
    handles = [handle for step in steps for handle in step.observe(ctx)]
    if handles or any(step.keeps_function for step in steps):  # statistics of the untouched layer, over every
        # sample; its outputs are the reference, against which a transform that claims to keep the function is checked
        try:
            float_out = run_layer(layer, inputs, prefix, into=storage.new())
        finally:
            _remove(handles)
    for step in steps:
        row.update(step.transform(ctx))

    ctx.linears = _quantizers_for_layer(layer, prefix, plan)  # round to nearest from the transformed weights
    reference_out = None
    if reference is not None:  # the float model's own stream, through the transformed float layer
        handles = [handle for step in steps for handle in step.observe_reference(ctx)]
        try:
            reference_out = run_layer(layer, reference, prefix, into=storage.new())
        finally:
            _remove(handles)
    handles = [handle for step in steps for handle in step.observe_transformed(ctx)]
    if kv_spec is not None:
        quantizer = KVCacheQuantizer(kv_spec, plan.center_keys, plan.kv_keep_first)
        attention.kv_cache_quantizer = quantizer.to(device_of(layer))
        attention.kv_cache_quantizer.start_observing()
        attention._llmquant_attention_calls = 0
    observers = _InputObservers(ctx.linears)
    subset = inputs if every_sample or handles else inputs.head(ERROR_SAMPLES)  # (the rest: as far as the attention)
    try:
        with all_experts(layer, plan.calibrate_all_experts and bool(handles or observers.handles)):
            transformed_out = run_layer(layer, subset, prefix, into=storage.new())  # (no hook: as routed)
    finally:
        observers.close()
        _remove(handles)
    if kv_spec is not None:
        _check_attention_interface(attention, prefix)
        if _kv_needs_every_sample(kv_spec, plan) and len(subset.hidden) < len(inputs.hidden):
            # the other samples only feed the cache's observers: each runs as far as its keys and values (about a
            # sixth of a Llama layer's products), in the batches of a whole pass, so the same statistics
            run_through(layer, attention.kv_cache_quantizer, inputs.tail(len(subset.hidden)))
        attention.kv_cache_quantizer.stop_observing(ranks)
        if plan.center_keys:
            row.update(_check_key_centering(layer, attention.kv_cache_quantizer, inputs, transformed_out, prefix,
                                            ranks))
    if float_out is None:
        float_out = transformed_out
    else:
        claimed = "+".join(step.name for step in steps if step.keeps_function)
        row["equivalence_error"] = _check_equivalence(float_out, transformed_out, claimed, prefix,
                                                      compute_dtype(layer), ranks)

    input_ranges = {}  # static inputs: the scale each observer chose over that of the observed min-max
    for rel, (_, quantized) in ctx.linears.items():
        if (ratio := quantized.stop_observing(ranks)) is not None:
            input_ranges[rel] = ratio
        _swap(layer, rel, quantized)
    if input_ranges:
        row["input_range_ratio"] = input_ranges
    for step in steps:
        row.update(step.quantize(ctx))
    for step in steps:
        step.release(ctx)
    return float_out, reference_out


@torch.no_grad()
def quantize_layer(
    layer: nn.Module,
    index: int,
    model_map: ModelMap,
    plan: QuantPlan,
    inputs: LayerInputs,
    steps: Sequence[LayerStep] = (),
    storage: ActivationStorage | None = None,
    ranks: Ranks = SINGLE,
    policy: DevicePolicy | None = None,
    reference: LayerInputs | None = None,
) -> tuple[Sequence[torch.Tensor], dict, Sequence[torch.Tensor] | None]:
    """Transform and quantize one decoder layer in place through the recipe's ``steps``
    (`llmquant.algorithms.lifecycle`); return its outputs, its manifest row and, with ``reference`` (the float
    model's own inputs of the layer, for steps that `LayerStep.wants_reference`), the float layer's outputs on them
    (the next layer's reference). With several ``ranks`` each runs the passes on its share of the samples, and the
    statistics, checks and error figures are over all of them.

    Passes over the calibration inputs: float (the steps' statistics; only when a step observes the untouched
    layer), transformed float (equivalence check, the steps' later statistics and the static-scale observers; where
    only a KV cache's observers need every sample, the first sample and then the others as far as the attention),
    quantized (the outputs fed to the next layer, with the int8 kernels where the layer has them: the same
    function as the simulation, about 4x faster here; with the plan's ``propagate_float`` the float pass's outputs,
    over every sample, are fed instead, and the quantized pass only serves the error figures). A pass that only
    serves the error figures runs on the first `ERROR_SAMPLES` of each process, where `_LinearErrorProbe` measures
    (BENCHMARKS.md, "Error figures on one sample"). The outputs of the passes over every
    sample go where ``storage`` says; the steps' working tensors take what ``policy``'s caps leave
    (`LayerContext.working_memory`).
    """
    storage = storage or ActivationStorage()
    prefix = model_map.layer_name(index)
    start = time.perf_counter()
    row: dict[str, Any] = {"layer": index}
    attention = model_map.attention_of(layer)
    kv_spec = plan.kv_cache.get(f"{prefix}.{model_map.attention}")
    schemes = [s for n, s in plan.linears.items() if n.startswith(prefix + ".") and not s.is_float]
    quantizes = bool(schemes) or kv_spec is not None
    static = any(s.input_activations is not None and not s.input_activations.dynamic for s in schemes)
    # (a static input scale must see every calibration sample through the whole layer; the KV cache's scales, or the
    # keys' mean, only through the attention: `_calibrate`)
    ctx = layer_context(layer, index, prefix, plan, inputs, ranks, policy)

    with all_experts(layer, plan.calibrate_all_experts):  # every expert sees every calibration token
        float_out, reference_out = _calibrate(ctx, steps, plan, inputs, storage, row, attention, kv_spec,
                                              every_sample=static or not quantizes or plan.propagate_float
                                              or plan.block_training is not None, reference=reference)
    if plan.block_training is not None and trainable_layers(layer):  # (a layer with quantized weights)
        targets = reference_out if plan.block_training.target == "model" else float_out
        row["block_training"] = _train_block(layer, inputs, targets, plan.block_training, prefix, ranks,
                                             ranks.least(ctx.working_memory()))
    if quantizes:
        quantized_batch = BATCH if _batch_invariant(plan, prefix) else 1  # per-tensor dynamic: one sample at a time
        set_runtime(layer, "int8", exact_only=True)  # (the simulation's bits, faster; weight-only: the simulation)
        probe = _LinearErrorProbe(layer, ctx.linears)
        # (with float propagation the quantized outputs only feed the error figures: the first sample, in memory)
        checked, kept = (inputs.head(ERROR_SAMPLES), None) if plan.propagate_float else (inputs, storage.new())
        try:
            with lean_experts(layer, _capped(policy)):  # (under a cap: one expert's kernel caches at a time)
                quant_out = run_layer(layer, checked, prefix, quantized_batch, into=kept)
        finally:
            probe.close()
            set_runtime(layer, "fake")
        row["linear_output_error"] = _mean_over(ranks, probe.errors)
    else:
        quant_out = float_out
    row["output_error"] = relative_error(float_out, quant_out, ranks)
    row["weight_error"] = _weight_errors(ctx.linears)
    row["seconds"] = time.perf_counter() - start
    return (float_out if plan.propagate_float else quant_out), row, reference_out


def _train_block(layer: nn.Module, inputs: LayerInputs, targets: Sequence[torch.Tensor], config: BlockTrainingConfig,
                 where: str, ranks: Ranks = SINGLE, working: int | None = None) -> dict[str, Any]:
    """`train_block` on the quantized ``layer`` fed ``inputs`` against ``targets`` (the float layer's outputs on them,
    or on the float model's own inputs), a sample a step on each process of ``ranks``, as the router chooses in an
    MoE layer; the manifest row's entry. Refused when the training's state (`state_bytes`) exceeds ``working``, the
    bytes the run's caps leave (the least over the processes; None: unknown), and at the first step when one sample's
    autograd graph exceeds what the state leaves of them."""
    needed = state_bytes(layer, config)
    if working is not None and needed > working:
        codes = ("; codes_lr: 0 trains the scales alone, 8 bytes a weight" if config.codes_lr else "")
        raise LlmquantError(f"{where}: block training needs {needed / 2**20:.1f} MiB for its weights' gradients and "
                            f"optimizer state, more than the {working / 2**20:.1f} MiB free where the layer "
                            f"computes, under the run's memory caps; allowed: a larger --max-memory or "
                            f"--max-gpu-memory{codes}, or no block_training")
    device = device_of(layer)

    def sample(i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return inputs.hidden[i].to(device), to_device(inputs.kwargs[i], device)

    trained = train_block(layer, sample, targets, config, ranks, where,
                          None if working is None else working - needed)
    return {**trained.describe(), "state_mib": round(needed / 2**20, 1)}


def _block_training_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The layers' ``block_training`` records summed up: how many layers trained and kept what they trained, the
    codes changed in those, and the seconds (the records themselves stay in each layer's row)."""
    records = [row["block_training"] for row in rows if "block_training" in row]
    kept = [record for record in records if record["kept"]]
    return {"layers": len(records), "kept": len(kept), "codes_changed": sum(r["codes_changed"] for r in kept),
            "seconds": round(sum(r["seconds"] for r in records), 1)}


def _kv_needs_every_sample(kv_spec: Any, plan: QuantPlan) -> bool:
    """Whether the layer's KV-cache quantizer calibrates on every sample: static scales, or the keys' mean."""
    return kv_spec is not None and (not kv_spec.dynamic or plan.center_keys)


def _check_kv_groups(plan: QuantPlan, head_dim: int | None) -> None:
    """A KV cache in groups of channels needs heads whose width the group divides (checked before any layer runs)."""
    for spec in {spec for spec in plan.kv_cache.values() if spec is not None and spec.granularity == "group"}:
        if head_dim is not None and head_dim % spec.group_size:
            raise LlmquantError(f"the KV cache in groups of {spec.group_size} channels needs heads whose width is a "
                                f"multiple of {spec.group_size}; this model's heads have {head_dim}; allowed: a KV "
                                f"cache per token and head (int4_per_token_asym, int8_per_token) or per tensor")


@torch.no_grad()
def quantize_layer_weights(layer: nn.Module, index: int, model_map: ModelMap, plan: QuantPlan) -> dict:
    """One decoder layer quantized without a calibration pass (``calib.samples: 0``, for a recipe that learns
    nothing from samples): its Linears rounded to nearest, its (dynamic) KV-cache quantizer attached. The same
    layer as `quantize_layer` leaves; its manifest row has the weight errors but no output error, which only a
    pass over samples measures."""
    start = time.perf_counter()
    prefix = model_map.layer_name(index)
    kv_spec = plan.kv_cache.get(f"{prefix}.{model_map.attention}")
    if kv_spec is not None:
        attention = layer.get_submodule(model_map.attention)  # (a layer in the plan's kv_cache has one)
        attention.kv_cache_quantizer = KVCacheQuantizer(kv_spec, keep_first=plan.kv_keep_first).to(device_of(layer))
    linears = _quantizers_for_layer(layer, prefix, plan)
    for rel, (_, quantized) in linears.items():
        _swap(layer, rel, quantized)
    return {"layer": index, "weight_error": _weight_errors(linears), "seconds": time.perf_counter() - start}


def _capped(policy: DevicePolicy | None) -> bool:
    """Whether the run has a memory cap (``--max-memory`` or ``--max-gpu-memory``)."""
    return policy is not None and (policy.max_memory is not None or policy.max_gpu_memory is not None)


def _calibrates(recipe: Recipe) -> bool:
    """Whether the recipe learns anything from the calibration samples (`Recipe.learns_from_samples`)."""
    return bool(recipe.learns_from_samples())


def _linears_of(layer: nn.Module, model_map: ModelMap) -> list[str]:
    """The model map's Linears that ``layer`` has (relative names)."""
    names = {name for name, _ in layer.named_modules()}
    return [name for name in model_map.linears if name in names]


def _mean_over(ranks: Ranks, figures: dict[str, float]) -> dict[str, float]:
    """Each figure averaged over the ranks (each measured on its own first sample)."""
    return dict(zip(figures, ranks.mean(list(figures.values())), strict=True))


def _outside_linears(model_map: ModelMap, plan: QuantPlan) -> list[tuple[str, Scheme]]:
    """The (name, scheme) of the Linears outside the decoder layers that the plan quantizes."""
    prefix = model_map.decoder_layers + "."
    return [(name, s) for name, s in plan.linears.items() if not name.startswith(prefix) and not s.is_float]


def _quantize_outside_layers(model: nn.Module, model_map: ModelMap, plan: QuantPlan) -> list[str]:
    """Weights of the Linears outside decoder layers (e.g. a head a recipe asks to quantize).

    Static input scales are not calibrated here: such a Linear takes a dynamic per-token input.
    """
    done = []
    for name, scheme in _outside_linears(model_map, plan):
        linear = model.get_submodule(name)
        inputs = scheme.input_activations
        if inputs is not None and not inputs.dynamic:
            inputs = inputs.model_copy(update={"granularity": "token", "dynamic": True, "observer": "minmax"})
            log.warning("%s: static input scales are calibrated only inside decoder layers; using per-token", name)
        if model_map.lm_head == name and model_map.embeddings:
            untie_head(model, model_map)
            linear = model.get_submodule(name)
        _swap(model, name, QuantLinear.from_linear(linear, scheme.weights, inputs))
        done.append(name)
    return done


def _restore_layer(layer: nn.Module, prefix: str, model_map: ModelMap, plan: QuantPlan,
                   state: dict[str, torch.Tensor]) -> None:
    """Give a float layer (already rotated, if the run rotates) the modules a finished run left, and load
    their tensors: QuantLinears as the plan says, the KV-cache quantizer, then the saved state."""
    for rel, (_, quantized) in _quantizers_for_layer(layer, prefix, plan).items():
        _swap(layer, rel, quantized)
    kv_spec = plan.kv_cache.get(f"{prefix}.{model_map.attention}")
    if kv_spec is not None:
        layer.get_submodule(model_map.attention).kv_cache_quantizer = KVCacheQuantizer(kv_spec)
    layer.load_state_dict(state, strict=True, assign=True)


def quantize(
    model: nn.Module,
    recipe: Recipe,
    calib: torch.Tensor,
    model_map: ModelMap | None = None,
    progress: bool = True,
    run_dir: RunDir | None = None,
    source: LayerSource | None = None,
    activations: ActivationStorage | None = None,
    policy: DevicePolicy | None = None,
    ranks: Ranks | None = None,
) -> Manifest:
    """Quantize ``model`` in place following ``recipe``, calibrating on token ids ``calib`` [n, seqlen] (with
    ``scale_training.samples``, its first ``calib.samples`` rows; the rest only train the scales: `calibration_part`).

    ``policy`` (`llmquant.device`, default: the CPU, the model's dtype) says where each layer computes: with
    ``offload="layers"`` the model rests where it was given (CPU memory, usually) and each decoder layer comes onto
    the device for its passes, then goes back; with ``"none"`` the whole model moves to the device first.

    With ``run_dir``, every finished layer is saved there and the layers it already holds are restored instead of
    recomputed (resume). With a streaming ``source``, decoder layers are read from disk one at a time and released
    after they are saved: ``run_dir`` is then required and the checkpoint writer reads the layers back from it
    (``model.llmquant_run_dir``). ``activations`` says where the calibration activations wait between passes
    (default: in memory, on the device while they fit: `llmquant.pipeline.memory.activation_storage`; its
    directory, when offloaded to disk, is removed at the end).

    In several processes (``ranks``, default: the process group this one belongs to, `llmquant.parallel`) each
    rank calibrates on its block of ``calib`` and the statistics are reduced over all of them; every rank ends
    with the same quantized model and manifest, and rank 0 writes the run directory's shared files.
    """
    policy = policy or DevicePolicy()
    ranks = ranks or Ranks.current()
    source = source or LayerSource()
    if source.streams and run_dir is None:
        raise LlmquantError("a model streamed from disk needs a run directory for its finished layers")
    model.eval()
    if policy.max_memory is not None:  # a freed working tensor goes back to the system at once (no heap growth)
        map_large_allocations()
    unfused = unfuse_experts(model)  # one Linear per expert matrix (`llmquant.model.moe`)
    model_map = model_map or detect_model_map(model)
    unquantizable = not_quantizable(model, model_map.decoder_layers)
    if unquantizable:
        log.warning("left float whatever the recipe: %s", "; ".join(f"{n} ({why})" for n, why in unquantizable.items()))
    home = _resting_device(model, model_map, policy)  # where each layer goes back to once quantized
    offloaded = _prepare_model(model, model_map, source, policy)
    storage = activations or activation_storage("memory", policy, model, calib)
    quarot = recipe.quarot()
    if quarot is not None:
        model_map = with_seed_map(model, model_map, quarot.backbone, quarot.model_decoder_layers, quarot.self_attn)
    plan = recipe.resolve(model, model_map)
    manifest = Manifest(recipe=recipe.model_dump(mode="json"), model_map=model_map.to_dict(), versions=versions(),
                        plan=plan.describe())
    manifest.results.update(placement=policy.describe(), activations=storage.where, accelerate_offloaded=offloaded)
    if model_map.moe:
        manifest.results["moe"] = {"blocks": [b.to_dict() for b in model_map.moe], "unfused": len(unfused),
                                   "calibrate": recipe.moe_calibrate}
    steps = recipe.layer_steps()
    ids = calib  # (every drawn window: scale training's are taken from them, `scale_training_inputs`)
    calib = calibration_part(recipe, calib)[0]
    calibrated = calib.shape[0] > 0  # (0: calib.samples 0, a recipe that needs none: no pass)
    if calibrated:  # what each next layer is calibrated on (`Recipe.propagation`: not given, it depends on the recipe)
        manifest.results["propagate"] = recipe.propagation()
    else:
        why = ("calib.samples 0" if recipe.calib.samples == 0 else "the recipe learns nothing from samples and "
               "calib.samples is not given")
        manifest.results["calibration"] = {"samples": 0, "why": f"{why}: no calibration pass; the layers' output "
                                           "errors are not measured (calib.samples N measures them on one sample a "
                                           "process)"}
    calib, held_out = _hold_out(recipe, calib, source)
    if recipe.scale_training is not None and source.streams:
        raise LlmquantError("scale_training runs the whole quantized model forward and backward, but the model is "
                            "streamed from disk (--max-memory); drop scale_training or load the model whole")
    if calibrated and not _calibrates(recipe) and calib.shape[0] > ranks.world:  # the samples only measure errors
        manifest.results["calibration"] = {
            "samples": ranks.world, "given": calib.shape[0],
            "why": "round to nearest with dynamic activations: the weights do not depend on the samples; one a "
                   "process measures the layers' output error"}
        calib = calib[:ranks.world]
    sample = calib[:1, :ROTATION_CHECK_TOKENS]  # the same on every rank
    whole_calib = calib
    calib = calib[ranks.share(calib.shape[0])]
    t0 = time.perf_counter()
    training, teacher = scale_training_inputs(model, recipe, ids, ranks, manifest, progress)  # (model still float)
    kv_cache = any(spec is not None for spec in plan.kv_cache.values())
    if kv_cache:
        _check_kv_groups(plan, head_dim_of(model, model_map))
        enable_kv_quantization(model)
    first = source.materialize(model, model_map, 0).to(policy.device)
    probe = None if calibrated else _random_layer_inputs(model, model_map)  # (while the embeddings are here)
    if probe is not None and kv_cache and (attention := model_map.attention_of(first)) is not None:
        _probe_attention_interface(first, model_map, attention, probe)  # (no pass will show it otherwise)
    rotation = None
    if quarot is not None:
        overrides = None
        if quarot.learn is not None:
            overrides, manifest.results["learned_rotations"] = _learned(
                model, model_map, recipe, quarot, whole_calib, sample, policy, source, run_dir, ranks, progress)
            manifest.results["learned_rotations"]["peak_rss_mb"] = peak_rss_mb()
        rotation = RotationPass(model, model_map, quarot.config(), sample, ranks, overrides)
    inputs = capture_layer_inputs(model, model_map, calib, into=storage.new()) if calibrated else None
    aims_at_model = plan.block_training is not None and plan.block_training.target == "model"
    reference = inputs if calibrated and (aims_at_model or any(step.wants_reference for step in steps)) else None
    # (the float model's own stream: GPTAQ's inputs, block training's targets)
    if rotation is None:  # nothing changes the embeddings or the head: they wait on disk (when streaming)
        source.release_outside()
    else:
        rotation.rotate(first, 0, inputs.head(1))
    set_up_for: tuple[str, ...] | None = None  # the structure of the layer the steps were set up on
    never_calls: dict[tuple[str, ...], list[str]] = {}  # by layer structure: Linears never called (`uncalled_linears`)
    manifest.seconds["prepare"] = time.perf_counter() - t0
    manifest.results["rss_mb_after_prepare"] = rss_mb()
    if run_dir is not None:
        run_dir.ranks = ranks  # each rank keeps its own next inputs there; rank 0 the shared files
    done = int(ranks.min(torch.tensor([run_dir.finished_layers() if run_dir is not None else 0])))
    if done:
        if calibrated:
            inputs = LayerInputs(hidden=storage.adopt(run_dir.next_inputs()), kwargs=inputs.kwargs)
        if reference is not None:
            reference = LayerInputs(hidden=storage.adopt(run_dir.next_inputs(reference=True)), kwargs=inputs.kwargs)
        manifest.results["resumed_after_layer"] = done - 1
    layers = model_map.layers(model)
    bar = tqdm(range(len(layers)), desc="quantizing layers", unit="layer", disable=not progress or not ranks.writes)
    t1 = time.perf_counter()
    for index in bar:
        prefix = model_map.layer_name(index)
        layer = source.materialize(model, model_map, index)
        if index < done:  # finished before an interruption: its modules and tensors come from the run dir
            if rotation is not None and index > 0:
                rotate_layer(layer, rotation.plan_at(layer, index))
            row = run_dir.layer_row(index)
            _leave_float(plan, prefix, row.get("never_called", []))
            unquantizable.update(never_called(layer, model_map, row.get("never_called", [])))
            _restore_layer(layer, prefix, model_map, plan, run_dir.layer_state(index))
            layer.to(home)
            manifest.layers.append(row)
        else:
            reset_peak_memory(policy.device)
            layer.to(policy.device)
            reference_out = None
            if calibrated and rotation is not None and index > 0:
                rotation.rotate(layer, index, inputs.head(1))
            structure = layer_structure(layer)
            if structure not in never_calls:  # (Jamba alternates two structures: each probed once)
                never_calls[structure] = uncalled_linears(layer, probe if probe is not None else inputs.head(1), prefix,
                                                          _linears_of(layer, model_map))
                unquantizable.update(never_called(layer, model_map, never_calls[structure]))
            uncalled = never_calls[structure]
            _leave_float(plan, prefix, uncalled)
            if not calibrated:
                outputs, row = [], quantize_layer_weights(layer, index, model_map, plan)
            else:
                setup = {}
                if structure != set_up_for:  # the first layer, or one made otherwise than the one before
                    first_setup, set_up_for = set_up_for is None, structure
                    setup = setup_steps(steps, layer, prefix, head_dim_of(model, model_map),
                                        _linears_of(layer, model_map), inputs, ranks)
                    if first_setup:
                        manifest.results.update(setup)
                        setup = {}
                outputs, row, reference_out = quantize_layer(layer, index, model_map, plan, inputs, steps, storage,
                                                             ranks, policy, reference)
                if setup:
                    row["setup"] = setup
                inputs = LayerInputs(hidden=outputs, kwargs=inputs.kwargs)
                if reference_out is not None:
                    reference = LayerInputs(hidden=reference_out, kwargs=inputs.kwargs)
            if uncalled:
                row["never_called"] = uncalled  # (left float; what a resumed run restores the layer with)
            layer.to(home)
            row["peak_gpu_mb"] = peak_memory_mb(policy.device)
            manifest.layers.append(row)
            if run_dir is not None:
                run_dir.save_layer(index, layer, row, outputs, reference_out)
            bar.set_postfix(_progress(row))
        source.release(index)
        manifest.layers[-1]["rss_mb"] = rss_mb()  # resident memory once the layer is done (and released)
        manifest.layers[-1]["peak_rss_mb"] = peak_rss_mb()
    manifest.seconds["layers"] = time.perf_counter() - t1
    if recipe.block_training is not None:
        manifest.results["block_training"] = _block_training_summary(manifest.layers)
    if rotation is not None:
        manifest.results["rotation"] = rotation.finish(inputs.head(1).hidden)
    del inputs, reference  # (their files, when offloaded, go with them)
    storage.remove()
    if rotation is None and _outside_linears(model_map, plan):
        source.materialize_outside()
    manifest.results["outside_layers"] = _quantize_outside_layers(model, model_map, plan)
    manifest.results["left_float"] = plan.left_float(model_map.decoder_layers)
    if unquantizable:
        manifest.results["not_quantizable"] = unquantizable
        manifest.plan = plan.describe()  # (with the Linears found never called, float)
    if held_out is not None:
        t2 = time.perf_counter()
        options = recipe.clip_search
        manifest.results["clip_search"] = search_clip_ratios(model, held_out, options.activations, options.kv_cache,
                                                             tuple(options.grid), options.by)
        manifest.seconds["clip_search"] = time.perf_counter() - t2
    if recipe.scale_training is not None:
        t3 = time.perf_counter()
        trained = train_scales(model, training, recipe.scale_training.config(), teacher, ranks, progress)
        manifest.results["scale_training"] = scale_training_entry(trained, recipe)
        manifest.seconds["scale_training"] = time.perf_counter() - t3
    manifest.seconds["total"] = time.perf_counter() - t0
    manifest.results["peak_rss_mb"] = peak_rss_mb()
    manifest.results["peak_gpu_mb"] = max((row.get("peak_gpu_mb") or 0 for row in manifest.layers), default=0) or None
    if ranks.world > 1:  # who took part, and how long each waited in collectives
        manifest.results["ranks"] = {"world": ranks.world, "waited_s": ranks.gather(ranks.waited)}
    if source.streams:
        model.llmquant_run_dir = run_dir  # type: ignore[attr-defined]
        model.llmquant_source = source.lazy  # type: ignore[attr-defined]  # tensors still on disk
    return manifest


def calibration_part(recipe: Recipe, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration samples of ``ids``, and the windows after them that only scale training sees (none without
    ``scale_training.samples``: every given row calibrates; `Recipe.drawn_samples`)."""
    calibrating = recipe.calibration_samples()
    if recipe.drawn_samples() == calibrating:
        return ids, ids[:0]
    return ids[:calibrating], ids[calibrating:]


def scale_training_inputs(model: nn.Module, recipe: Recipe, ids: torch.Tensor, ranks: Ranks, manifest: Manifest,
                          progress: bool) -> tuple[torch.Tensor, TeacherTargets | None]:
    """Scale training's windows from the drawn ``ids`` (the calibration ones but those the clip search holds out,
    then those drawn for the training only, then any the float model generates) and the float model's targets on
    them (None but for the ``kl`` loss); ``model`` must still be the float model. Empty windows and None without
    ``scale_training``."""
    if recipe.scale_training is None:
        return ids[:0], None
    calib, training_only = calibration_part(recipe, ids)
    if recipe.clip_search is not None:
        calib = calib[:-recipe.clip_search.samples]
    generated = _generated(model, recipe, ids.shape[1], ranks, manifest, progress)
    training = torch.cat([calib, training_only, generated])  # (the calibration windows first)
    return training, _teacher(model, recipe, training, ranks, manifest, progress)


def scale_training_entry(trained: TrainedScales, recipe: Recipe) -> dict[str, Any]:
    """What the manifest records of a scale training run (`TrainedScales.describe`, and how many windows the float
    model generated for it)."""
    generated = recipe.generated_samples()
    return {**trained.describe(), **({"generated": generated} if generated else {})}


def _teacher(model: nn.Module, recipe: Recipe, calib: torch.Tensor, ranks: Ranks, manifest: Manifest,
             progress: bool) -> TeacherTargets | None:
    """The float model's next-token targets on ``calib`` for scale training's ``kl`` loss, taken before any layer
    changes, each rank its share, gathered on every rank (None when the recipe does not ask for them)."""
    options = recipe.scale_training
    if options is None or options.loss != "kl" or calib.shape[0] == 0:
        return None
    start = time.perf_counter()
    part = teacher_targets(model, calib[ranks.share(calib.shape[0])], options.top_k, progress and ranks.writes)
    teacher = TeacherTargets(ranks.all_rows(part.ids, calib.shape[0]), ranks.all_rows(part.log_probs, calib.shape[0]))
    manifest.seconds["scale_training_teacher"] = time.perf_counter() - start
    return teacher


def _generated(model: nn.Module, recipe: Recipe, seqlen: int, ranks: Ranks, manifest: Manifest,
               progress: bool) -> torch.Tensor:
    """Scale training's windows of ``seqlen`` tokens generated by the float model (``extra_windows: generated``; none
    otherwise), by the first rank and sent to the others, so that every rank trains on the same ones."""
    count = recipe.generated_samples()
    if not count:
        return torch.empty(0, seqlen, dtype=torch.long)
    start = time.perf_counter()
    windows = torch.empty(count, seqlen, dtype=torch.long)
    if ranks.rank == 0:
        windows = generated_windows(model, count, seqlen, recipe.calib.seed, never=end_of_sequence_ids(model),
                                    progress=progress)
    windows = ranks.broadcast(windows, 0)
    manifest.seconds["scale_training_generation"] = time.perf_counter() - start
    return windows


def _hold_out(recipe: Recipe, calib: torch.Tensor, source: LayerSource) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The calibration samples, and the last ``clip_search.samples`` held out of them for the clip search."""
    if recipe.clip_search is None:
        return calib, None
    count = recipe.clip_search.samples
    if source.streams:
        raise LlmquantError("clip_search runs the whole quantized model, but the model is streamed from disk "
                            "(--max-memory); drop clip_search or load the model whole")
    if calib.shape[0] <= count:
        raise LlmquantError(f"clip_search holds out {count} calibration samples, but only {calib.shape[0]} were "
                            f"given: give more than {count} (calib.samples) or hold out fewer (clip_search.samples)")
    return calib[:-count], calib[-count:]


def _learned(model: nn.Module, model_map: ModelMap, recipe: Recipe, quarot: QuaRotPreOpt, calib: torch.Tensor,
             sample: torch.Tensor, policy: DevicePolicy, source: LayerSource, run_dir: RunDir | None, ranks: Ranks,
             progress: bool) -> tuple[RotationOverrides, dict]:
    """SpinQuant's rotations (`llmquant.pipeline.learned_rotation`): learned, or those an interrupted run of the same
    recipe and samples left in ``run_dir``."""
    kept = run_dir.rotations() if run_dir is not None else None
    if kept is not None:
        return kept
    overrides, entry = learn_rotations(model, model_map, recipe, quarot, calib, sample, policy.device,
                                       streams=source.streams, ranks=ranks, progress=progress)
    if run_dir is not None:
        run_dir.save_rotations(overrides, entry)
    return overrides, entry


def _resting_device(model: nn.Module, model_map: ModelMap, policy: DevicePolicy) -> torch.device:
    """Where a quantized layer goes back to: the device with ``offload="none"``, else where the model's layers
    were given (the CPU for a model streamed from disk or offloaded by accelerate)."""
    if policy.offload == "none":
        return policy.device
    given = device_of(model_map.layers(model)[0])
    return torch.device("cpu") if given.type == "meta" else given


def _prepare_model(model: nn.Module, model_map: ModelMap, source: LayerSource, policy: DevicePolicy) -> bool:
    """Bring the model to where the policy wants it before the layers run: the policy's dtype, every weight
    accelerate keeps offloaded outside the decoder layers in memory (each layer is loaded when its turn comes),
    and, with ``offload="none"``, the whole model on the device. Returns whether accelerate offloaded it."""
    offloaded = not source.streams and is_offloaded(model)
    if offloaded:
        load_offloaded(model, skip=model.get_submodule(model_map.decoder_layers))
        if hasattr(model, "tie_weights"):  # loaded as copies: a tied head shares the embeddings again
            model.tie_weights()
    if policy.dtype is not None:
        cast_weights(model, policy.dtype)
    if policy.offload == "none" and not source.streams and not offloaded:
        model.to(policy.device)
    return offloaded


def _progress(row: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows after a layer: its output error (where a pass measured it), and its peak GPU
    memory on a GPU."""
    shown = {"err": f"{row['output_error']:.4f}"} if "output_error" in row else {}
    if row.get("peak_gpu_mb"):
        shown["gpu"] = f"{row['peak_gpu_mb'] / 1024:.1f}GiB"
    return shown


def rss_mb() -> float:
    """The process's resident memory now, in MiB (Linux /proc; 0 where it does not exist)."""
    return resident_bytes() / 2**20


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

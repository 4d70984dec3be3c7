"""The engine: run a recipe on a model, decoder layer by decoder layer.

1. Resolve the recipe into a `QuantPlan` (a scheme per Linear) before any weight is touched.
1b. With QuaRot, plan the rotations on the first layer and rotate the embeddings (data-free, checked for
   equivalence: `llmquant.pipeline.rotation`); each layer is rotated just before it is calibrated.
2. Capture the first decoder layer's inputs for the calibration samples (one pass of the embeddings).
3. For each layer: a float pass records the output (and, with smoothing, each group's activation
   statistics; the groups are found once on layer 0, then smoothed and checked for equivalence), and,
   through observers, the input range of every Linear with a static input scale and of the KV cache;
   the Linears are swapped for `QuantLinear`s; a quantized pass gives the outputs that become the next
   layer's inputs (so each layer is calibrated on what the quantized model really feeds it) and the
   layer's output error.
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
from tqdm.auto import tqdm

from llmquant.algorithms import awq
from llmquant.algorithms.gptq import GPTQ, HessianAccumulator, stacks_rows
from llmquant.algorithms.quarot import rotate_layer
from llmquant.algorithms.smoothquant import GroupStatsCollector, smooth_group
from llmquant.errors import LlmquantError
from llmquant.model.lazy import LazyLayers
from llmquant.model.model_map import ModelMap, detect_model_map, untie_head
from llmquant.model.offloaded import is_offloaded, load_offloaded
from llmquant.model.patterns import SmoothGroup, detect_smooth_groups, resolve_heads
from llmquant.nn.kv_cache import KVCacheQuantizer, enable_kv_quantization
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.pipeline.activations import ActivationStorage
from llmquant.pipeline.layer_io import (
    BATCH,
    LayerInputs,
    capture_layer_inputs,
    head_dim_of,
    inputs_of,
    relative_error,
    run_layer,
)
from llmquant.pipeline.rotation import RotationPass, with_seed_map
from llmquant.pipeline.run_dir import RunDir
from llmquant.quant.scheme import Scheme
from llmquant.recipe import GPTQOptions, QuantPlan, Recipe

log = logging.getLogger(__name__)
ROTATION_CHECK_TOKENS = 128  # the rotation pass plans and checks on one calibration sample this long


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
        for handle in self.handles:
            handle.remove()


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
        for handle in self.handles:
            handle.remove()


def _weight_error(linear: nn.Linear, quantized: QuantLinear) -> float:
    w = linear.weight.detach().float()
    return float((quantized.dequantized_weight() - w).norm() / w.norm().clamp(min=1e-30))


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


@dataclass(frozen=True)
class Smoothing:
    """The smoothing step of a run: the groups of a decoder layer and the alpha of each."""

    groups: list[SmoothGroup]
    alphas: list[float | str]

    def describe(self) -> list[dict]:
        return [{**g.to_dict(), "alpha": a} for g, a in zip(self.groups, self.alphas, strict=True)]


SMOOTHING_NAMES = ("smoothquant", "smooth_fc_fc")


def find_smooth_groups(model: nn.Module, model_map: ModelMap, inputs: LayerInputs) -> list[SmoothGroup]:
    """The smoothing groups of the first decoder layer, observed on its first calibration input."""
    layer = model_map.layers(model)[0]
    head_dim = head_dim_of(model, model_map)

    def run() -> None:
        layer(inputs.hidden[0], **inputs.kwargs[0])

    return detect_smooth_groups(layer, run, head_dim, model_map.layer_name(0))


def plan_smoothing(model: nn.Module, model_map: ModelMap, recipe: Recipe, inputs: LayerInputs) -> Smoothing | None:
    """Groups to smooth from the recipe's pre-optimizations: given in the recipe, or found on layer 0."""
    wanted: dict[str, float | str] = {p.name: p.alpha for p in recipe.pre_opts if p.name in SMOOTHING_NAMES}
    if recipe.algorithm == "awq":
        if wanted:
            raise LlmquantError("AWQ rescales the same groups as smoothquant/smooth_fc_fc: choose one of them")
        wanted = {"smoothquant": "awq"}
    if not wanted:
        return None
    if recipe.smooth_groups is not None:
        layer, head_dim = model_map.layers(model)[0], head_dim_of(model, model_map)
        groups = [resolve_heads(SmoothGroup.from_dict(g), layer, head_dim) for g in recipe.smooth_groups]
    else:
        groups = find_smooth_groups(model, model_map, inputs)
    readers = {name for group in groups for name in group.linears}
    unsmoothed = [name for name in model_map.linears if name not in readers]
    if unsmoothed:
        log.warning("no smoothing fold exists for %s (no norm or Linear feeds them channel for channel)", unsmoothed)
    chosen, alphas = [], []
    for group in groups:
        kind = "smooth_fc_fc" if group.producer_kind == "linear" else "smoothquant"
        alpha = wanted.get(kind, wanted.get("smoothquant"))
        if alpha is not None:
            chosen.append(group)
            alphas.append(alpha)
    return Smoothing(groups=chosen, alphas=alphas)


EQUIVALENCE_TOLERANCE = 1e-4


def _check_equivalence(reference: list[torch.Tensor], actual: list[torch.Tensor], what: str, where: str) -> float:
    """A transform that claims to keep the function must keep the layer's outputs (relative error)."""
    error = relative_error(reference, actual)
    if error > EQUIVALENCE_TOLERANCE:
        raise LlmquantError(
            f"{what} changed the function of {where}: relative output change {error:.2e} > "
            f"{EQUIVALENCE_TOLERANCE:.0e}; the layer map or smoothing groups do not fit this model"
        )
    return error


def _group_specs(group: SmoothGroup, prefix: str, plan: QuantPlan) -> dict:
    specs = {}
    for name in group.linears:
        scheme = plan.linears.get(f"{prefix}.{name}")
        specs[name] = (scheme.weights, scheme.input_activations) if scheme else (None, None)
    return specs


def _smooth(
    layer: nn.Module, prefix: str, plan: QuantPlan, smoothing: Smoothing, stats: list
) -> tuple[list[dict], list[tuple[SmoothGroup, torch.Tensor]]]:
    """Function-preserving rescaling of every group; AWQ groups also return the tokens to clip on."""
    rows, to_clip = [], []
    for group, alpha, group_stats in zip(smoothing.groups, smoothing.alphas, stats, strict=True):
        specs = _group_specs(group, prefix, plan)
        if alpha == "awq":
            row, tokens = awq.scale_group(layer, group, group_stats, specs)
            to_clip.append((group, tokens))
        else:
            row = smooth_group(layer, group, group_stats, alpha, specs)
        rows.append(row)
    return rows, to_clip


def _stages(layer: nn.Module, names: list[str], inputs: LayerInputs, where: str) -> list[list[str]]:
    """The Linears in execution order, grouped by the input tensor they share (q/k/v, gate/up, ...)."""
    seen: list[tuple[str, torch.Tensor]] = []  # the inputs themselves: a freed tensor's id() can be reused
    handles = [
        layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.append((name, args[0]))
        )
        for name in names
    ]
    try:
        run_layer(layer, inputs.head(1), where)
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    last_input = None
    for name, tensor in seen:
        if stages and tensor is last_input:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_input = tensor
    return stages


class _FloatHessians:
    """Forward pre-hooks that accumulate, during a float pass, the Hessian of each stage's shared input
    (GPTQ with ``true_sequential=False``)."""

    def __init__(self, layer: nn.Module, stages: list[list[str]]) -> None:
        self.hessians: dict[str, HessianAccumulator] = {}
        self.handles = []
        for stage in stages:
            module = layer.get_submodule(stage[0])
            accumulator = self.hessians[stage[0]] = HessianAccumulator(module.in_features)
            self.handles.append(module.register_forward_pre_hook(
                lambda _m, args, accumulator=accumulator: accumulator.add_batch(args[0])))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _gptq_layer(
    layer: nn.Module,
    linears: dict[str, tuple[nn.Linear, QuantLinear]],
    stages: list[list[str]],
    inputs: LayerInputs,
    options: GPTQOptions,
    float_hessians: dict[str, HessianAccumulator] | None = None,
) -> None:
    """GPTQ the layer's Linears stage by stage. The Linears of a stage read one input, so they share one
    Hessian (and, with the same spec, one sweep of their stacked rows). Without ``float_hessians`` (true
    sequential), each stage's Hessian sees the already quantized stages: the layer runs only as far as the
    stage's first Linear (what comes after it is not needed yet)."""
    for stage in stages:
        if float_hessians is not None:
            hessian = float_hessians[stage[0]]
        else:
            hessian = HessianAccumulator(linears[stage[0]][0].in_features)
            inputs_of(layer, layer.get_submodule(stage[0]), inputs, hessian.add_batch)
        for sweep in _stacked_sweeps(stage, linears):
            spec = linears[sweep[0]][1].weight_spec
            state = GPTQ([linears[name][0].weight for name in sweep], hessian)
            results = state.quantize(spec, options.block_size, options.damp_ratio, options.act_order)
            for name, (weight, qparams) in zip(sweep, results, strict=True):
                linears[name][1].set_weight(weight, qparams)


def _stacked_sweeps(stage: list[str], linears: dict[str, tuple[nn.Linear, QuantLinear]]) -> list[list[str]]:
    """The Linears of a stage in runs swept together: same weight spec, and a spec whose rows stack."""
    sweeps: list[list[str]] = []
    for name in stage:
        spec = linears[name][1].weight_spec
        previous = linears[sweeps[-1][0]][1].weight_spec if sweeps else None
        if sweeps and spec == previous and spec is not None and stacks_rows(spec):
            sweeps[-1].append(name)
        else:
            sweeps.append([name])
    return sweeps


@torch.no_grad()
def quantize_layer(
    layer: nn.Module,
    index: int,
    model_map: ModelMap,
    plan: QuantPlan,
    inputs: LayerInputs,
    smoothing: Smoothing | None = None,
    gptq: GPTQOptions | None = None,
    storage: ActivationStorage | None = None,
) -> tuple[Sequence[torch.Tensor], dict]:
    """Transform and quantize one decoder layer in place; return its outputs and its manifest row.

    Passes over the calibration inputs: float (smoothing statistics, static-scale observers, the
    reference of the output error), smoothed float (equivalence check and observers; only when
    smoothing), quantized (the outputs fed to the next layer, with the int8 kernels where the layer
    has them: the same function as the simulation, about 4x faster here). A pass that only serves a
    check or the error figure runs on the first `BATCH` samples. The outputs of the passes over every
    sample go where ``storage`` says (memory by default).
    """
    storage = storage or ActivationStorage()
    prefix = model_map.layer_name(index)
    start = time.perf_counter()
    row: dict[str, Any] = {"layer": index}
    attention = layer.get_submodule(model_map.attention)
    kv_spec = plan.kv_cache.get(f"{prefix}.{model_map.attention}")
    schemes = [s for n, s in plan.linears.items() if n.startswith(prefix + ".") and not s.is_float]
    quantizes = bool(schemes) or kv_spec is not None
    observes = any(s.input_activations is not None and not s.input_activations.dynamic for s in schemes) or (
        kv_spec is not None and not kv_spec.dynamic
    )  # a static scale must see every calibration sample
    float_hessians = gptq is not None and not gptq.true_sequential  # so must Hessians from the float pass
    subset = inputs if observes or float_hessians or not quantizes else inputs.head(BATCH)
    hessians: dict[str, HessianAccumulator] = {}

    def observe_and_run(linears: dict[str, tuple[nn.Linear, QuantLinear]]) -> Sequence[torch.Tensor]:
        if gptq is not None:  # (before any observer starts: this runs one sample)
            row["gptq_stages"] = _stages(layer, [n for n, (_, q) in linears.items() if q.weight_spec is not None],
                                         inputs, prefix)
        if kv_spec is not None:
            attention.kv_cache_quantizer = KVCacheQuantizer(kv_spec)
            attention.kv_cache_quantizer.start_observing()
        observers = _InputObservers(linears)
        collector = _FloatHessians(layer, row["gptq_stages"]) if float_hessians else None
        try:
            outputs = run_layer(layer, subset, prefix, into=storage.new())
        finally:
            observers.close()
            if collector is not None:
                collector.close()
                hessians.update(collector.hessians)
        if kv_spec is not None:
            attention.kv_cache_quantizer.stop_observing()
        return outputs

    if smoothing is not None:
        collector = GroupStatsCollector(layer, smoothing.groups)
        try:
            float_out = run_layer(layer, inputs, prefix, into=storage.new())
        finally:
            stats = collector.close()
        row["smoothing"], to_clip = _smooth(layer, prefix, plan, smoothing, stats)
        if to_clip:  # AWQ: check the scaling alone, then clip (which changes the function on purpose)
            scaled_out = run_layer(layer, subset, prefix, into=storage.new())
            row["equivalence_error"] = _check_equivalence(float_out, scaled_out, "awq", prefix)
            row["clipped"] = [n for g, t in to_clip for n in awq.clip_group(layer, g, t, _group_specs(g, prefix, plan))]
        linears = _quantizers_for_layer(layer, prefix, plan)  # from the smoothed (and clipped) weights
        smoothed_out = observe_and_run(linears)
        if not to_clip:
            row["equivalence_error"] = _check_equivalence(float_out, smoothed_out, "smoothing", prefix)
    else:
        linears = _quantizers_for_layer(layer, prefix, plan)
        float_out = observe_and_run(linears)
    for rel, (_, quantized) in linears.items():
        quantized.stop_observing()
        _swap(layer, rel, quantized)
    if gptq is not None:
        _gptq_layer(layer, linears, row["gptq_stages"], inputs, gptq, hessians or None)
    if quantizes:
        quantized_batch = BATCH if _batch_invariant(plan, prefix) else 1  # per-tensor dynamic: one sample at a time
        set_runtime(layer, "int8")
        probe = _LinearErrorProbe(layer, linears)
        try:
            quant_out = run_layer(layer, inputs, prefix, quantized_batch, into=storage.new())
        finally:
            probe.close()
            set_runtime(layer, "fake")
        row["linear_output_error"] = probe.errors
    else:
        quant_out = float_out
    row["output_error"] = relative_error(float_out, quant_out)
    row["weight_error"] = {rel: _weight_error(linear, q) for rel, (linear, q) in linears.items()}
    row["seconds"] = time.perf_counter() - start
    return quant_out, row


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


@dataclass
class LayerSource:
    """Where decoder layers live: in memory (the default; a layer accelerate keeps offloaded is loaded when
    its turn comes, `llmquant.model.offloaded`), or on disk (`LazyLayers`, read one at a time and released
    to ``meta`` once their result is in the run directory; the embeddings and head are released too while
    the layers run, when nothing changes them)."""

    lazy: LazyLayers | None = None

    @property
    def streams(self) -> bool:
        return self.lazy is not None

    def materialize(self, model: nn.Module, model_map: ModelMap, index: int) -> nn.Module:
        if self.lazy is not None:
            return self.lazy.materialize(index)
        layer = model_map.layers(model)[index]
        load_offloaded(layer)
        return layer

    def release(self, index: int) -> None:
        if self.lazy is not None:
            self.lazy.release(index)

    def release_outside(self) -> None:
        if self.lazy is not None:
            self.lazy.release_outside()

    def materialize_outside(self) -> None:
        if self.lazy is not None:
            self.lazy.materialize_outside()


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
) -> Manifest:
    """Quantize ``model`` in place following ``recipe``, calibrating on token ids ``calib`` [n, seqlen].

    With ``run_dir``, every finished layer is saved there and the layers it already holds are restored
    instead of recomputed (resume). With a streaming ``source``, decoder layers are read from disk one at a
    time and released after they are saved: ``run_dir`` is then required and the checkpoint writer reads
    the layers back from it (``model.llmquant_run_dir``). An offloading ``activations`` storage keeps the
    calibration activations on disk (its directory is removed at the end).
    """
    source = source or LayerSource()
    storage = activations or ActivationStorage()
    if source.streams and run_dir is None:
        raise LlmquantError("a model streamed from disk needs a run directory for its finished layers")
    model.eval()
    model_map = model_map or detect_model_map(model)
    offloaded = not source.streams and is_offloaded(model)
    if offloaded:  # what lies outside the decoder layers now, each layer when its turn comes
        load_offloaded(model, skip=model.get_submodule(model_map.decoder_layers))
        if hasattr(model, "tie_weights"):  # loaded as copies: a tied head shares the embeddings again
            model.tie_weights()
    quarot = recipe.quarot()
    if quarot is not None:
        model_map = with_seed_map(model, model_map, quarot.backbone, quarot.model_decoder_layers, quarot.self_attn)
    plan = recipe.resolve(model, model_map)
    manifest = Manifest(
        recipe=recipe.model_dump(mode="json"),
        model_map=model_map.to_dict(),
        versions=versions(),
        plan=plan.describe(),
    )
    manifest.results["activations"] = "disk" if storage.offloads else "memory"
    manifest.results["accelerate_offloaded"] = offloaded
    t0 = time.perf_counter()
    if any(spec is not None for spec in plan.kv_cache.values()):
        enable_kv_quantization(model)
    first = source.materialize(model, model_map, 0)
    rotation = None
    if quarot is not None:
        rotation = RotationPass(model, model_map, quarot.config(), calib[:1, :ROTATION_CHECK_TOKENS])
    inputs = capture_layer_inputs(model, model_map, calib, into=storage.new())
    if rotation is None:  # nothing changes the embeddings or the head: they wait on disk (when streaming)
        source.release_outside()
    else:
        rotation.rotate(first, 0, inputs.head(1))
    smoothing = plan_smoothing(model, model_map, recipe, inputs)
    if smoothing is not None:
        manifest.results["smooth_groups"] = smoothing.describe()
    manifest.seconds["prepare"] = time.perf_counter() - t0
    manifest.results["rss_mb_after_prepare"] = rss_mb()
    done = run_dir.finished_layers() if run_dir is not None else 0
    if done:
        inputs = LayerInputs(hidden=storage.adopt(run_dir.next_inputs()), kwargs=inputs.kwargs)
        manifest.results["resumed_after_layer"] = done - 1
    layers = model_map.layers(model)
    bar = tqdm(range(len(layers)), desc="quantizing layers", unit="layer", disable=not progress)
    t1 = time.perf_counter()
    gptq = recipe.gptq if recipe.algorithm == "gptq" else None
    for index in bar:
        prefix = model_map.layer_name(index)
        layer = source.materialize(model, model_map, index)
        if index < done:  # finished before an interruption: its modules and tensors come from the run dir
            if rotation is not None and index > 0:
                rotate_layer(layer, rotation.plan)
            _restore_layer(layer, prefix, model_map, plan, run_dir.layer_state(index))
            manifest.layers.append(run_dir.layer_row(index))
        else:
            if rotation is not None and index > 0:
                rotation.rotate(layer, index, inputs.head(1))
            outputs, row = quantize_layer(layer, index, model_map, plan, inputs, smoothing, gptq, storage)
            inputs = LayerInputs(hidden=outputs, kwargs=inputs.kwargs)
            manifest.layers.append(row)
            if run_dir is not None:
                run_dir.save_layer(index, layer, row, outputs)
            bar.set_postfix(err=f"{row['output_error']:.4f}")
        source.release(index)
        manifest.layers[-1]["rss_mb"] = rss_mb()  # resident memory once the layer is done (and released)
        manifest.layers[-1]["peak_rss_mb"] = peak_rss_mb()
    manifest.seconds["layers"] = time.perf_counter() - t1
    if rotation is not None:
        manifest.results["rotation"] = rotation.finish(inputs.head(1).hidden)
    del inputs  # (its file, when offloaded, goes with it)
    storage.remove()
    if rotation is None and _outside_linears(model_map, plan):
        source.materialize_outside()
    manifest.results["outside_layers"] = _quantize_outside_layers(model, model_map, plan)
    manifest.seconds["total"] = time.perf_counter() - t0
    manifest.results["peak_rss_mb"] = peak_rss_mb()
    if source.streams:
        model.llmquant_run_dir = run_dir  # type: ignore[attr-defined]
        model.llmquant_source = source.lazy  # type: ignore[attr-defined]  # tensors still on disk
    return manifest


def rss_mb() -> float:
    """The process's resident memory now, in MiB (Linux /proc; 0 where it does not exist)."""
    import os

    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

"""Smoothing and rotation patterns found from the model's function, not from a table of names.

A *smoothing group* is a producer (a norm, or a Linear) and the Linears that read its output channel
for channel, so that dividing the producer's output channel j by s_j and multiplying the readers'
input column j by s_j leaves the layer's function unchanged (SmoothQuant, Xiao et al. 2023).

Both relations are observed on one decoder layer with forward hooks, which is the traced data flow
of the layer (every tensor a module produced and every tensor a module read):

- norm -> Linears: the Linear reads the very tensor the norm returned (input norm -> q/k/v,
  post-attention norm -> gate/up, OPT's LayerNorm -> fc1);
- Linear A -> Linear B: scaling A's output channels by a random positive vector s scales B's input
  channels by s, through reshapes, the attention's value path (each query head reads the value head
  it shares under grouped-query attention) or an elementwise product (v -> o, up -> down, fc1 -> relu
  -> fc2). The check runs the layer again with A perturbed, so a path through a softmax, a RoPE or a
  non-homogeneous activation (q -> o, gate -> down) is rejected because it does not scale.

Rotation patterns (QuaRot) are observed the same way:

- `norm_form`: whether a norm computes g * x / rms(x) ("rms") or g * (x - mean) / std + b ("layer"), with the
  gain g = w + offset (offset 0, or 1 for Gemma's (1 + w) norms): the forms whose gain folds into the Linears
  reading them (and into which smoothing folds its scales);
- `residual_writers`: the Linears whose output is added unchanged to the layer's output (o_proj,
  down_proj, OPT's out_proj and fc2), and whether the layer's output is exactly its input plus their
  outputs (the residual stream R1 rotates);
- `rotation_pairs`: Linear A -> Linear B where rotating A's output head by head (an orthogonal matrix
  of head_dim on each head) rotates B's input the same way: the value path v_proj -> o_proj, which R2
  rotates (up -> down fails: the gating product does not commute with a rotation).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from llmquant.errors import LlmquantError
from llmquant.model.moe import MoEBlock, find_moe_blocks
from llmquant.nn.experts import expert_index
from llmquant.nn.online_rotation import input_rotation_of


@dataclass(frozen=True)
class SmoothGroup:
    """A producer and the Linears reading its output; ``head_repeat`` > 1 means the readers see each
    producer head ``head_repeat`` times (grouped-query attention), with heads of ``head_dim``.
    ``head_repeat = 0`` (in a hand-written family map) means: derive both from the model's shapes."""

    producer: str
    producer_kind: str  # "norm" | "linear"
    linears: tuple[str, ...]
    head_repeat: int = 1
    head_dim: int = 0
    producer_offset: float = 0.0  # a norm producer's gain is w + offset (`NormForm`)
    blocked: str = ""  # why no scale may be applied to it (`detect_smooth_groups`), said by `foldable`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SmoothGroup:
        return cls(**{**data, "linears": tuple(data["linears"])})


def resolve_heads(group: SmoothGroup, layer: nn.Module, head_dim: int | None) -> SmoothGroup:
    """A group whose ``head_repeat`` is 0 gets the repeat the model's shapes imply (1 for norms)."""
    if group.head_repeat:
        return group
    if group.producer_kind == "norm":
        return replace(group, head_repeat=1, head_dim=0)
    produced = layer.get_submodule(group.producer).out_features
    read = layer.get_submodule(group.linears[0]).in_features
    repeat = read // produced if read % produced == 0 else 0
    if repeat == 0 or (repeat > 1 and not head_dim):
        raise LlmquantError(
            f"smoothing group {group.producer} -> {list(group.linears)}: {read} inputs cannot read {produced} "
            "outputs head by head; fix the layer map"
        )
    return replace(group, head_repeat=repeat, head_dim=head_dim if repeat > 1 else 0)


def expand_channels(values: torch.Tensor, group: SmoothGroup) -> torch.Tensor:
    """Producer-channel values laid out as the readers' input channels (GQA: heads repeated)."""
    if group.head_repeat == 1:
        return values
    heads = values.reshape(-1, group.head_dim)  # [kv_heads, head_dim]
    return heads.repeat_interleave(group.head_repeat, dim=0).reshape(-1)


def reduce_channels(values: torch.Tensor, group: SmoothGroup) -> torch.Tensor:
    """Readers' input-channel values reduced (max) onto the producer channels they come from."""
    if group.head_repeat == 1:
        return values
    heads = values.reshape(-1, group.head_repeat, group.head_dim)
    return heads.amax(dim=1).reshape(-1)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (a LayerNorm, or a class named ...Norm with a weight)."""
    name = type(module).__name__.lower()
    return isinstance(module, nn.LayerNorm) or ("norm" in name and hasattr(module, "weight"))


_BLOCKS: weakref.WeakKeyDictionary[nn.Module, tuple[MoEBlock, ...]] = weakref.WeakKeyDictionary()


def _moe_blocks(layer: nn.Module) -> tuple[MoEBlock, ...]:
    """`find_moe_blocks` of a layer, found once (it runs the routers; `_record` runs for every candidate pair)."""
    if layer not in _BLOCKS:
        _BLOCKS[layer] = tuple(find_moe_blocks(layer))
    return _BLOCKS[layer]


def _routers(layer: nn.Module) -> set[str]:
    """The routers of the layer's MoE blocks: they read a norm's output through their ``weight`` as a Linear does
    (a smoothing or R1 fold must scale or rotate them too), and stay float."""
    return {block.router for block in _moe_blocks(layer)}


def _routing(layer: nn.Module) -> set[str]:
    """The modules whose outputs choose and weigh the experts: routers and gates (a shared expert's gate)."""
    return {name for block in _moe_blocks(layer) for name in (block.router, *block.gates)}


def _reads_by_weight(layer: nn.Module) -> list[str]:
    """The modules computing x W^T from their input: the Linears and the MoE routers, in module order."""
    routers = _routers(layer)
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) or n in routers]


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is ``b`` or a view of all of it (an MoE block reads its input flattened to tokens)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype)


def _scaled_copy(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is ``b`` times a constant, in a tensor of its own (Falcon-H1 multiplies the norm's output by
    ``attention_in_multiplier`` before q/k/v: a channel scale or a rotation of ``b`` reaches ``a`` the same way)."""
    if a.numel() != b.numel() or a.dtype != b.dtype or not a.is_floating_point():
        return False
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    scale = (a64 @ b64) / (b64 @ b64).clamp(min=1e-300)
    return bool(scale != 0) and float((a64 - scale * b64).norm()) <= 1e-6 * float(a64.norm())


def _expert_pair_skipped(a: str, b: str) -> bool:
    """Linear -> Linear pairs not tried: across experts or between an expert and a Linear outside it (no expert
    feeds another, or a Linear outside, channel for channel), and inside any expert but the first (the first
    one's pairs hold for every expert of the list: `replicate_expert_groups`)."""
    where_a, where_b = expert_index(a), expert_index(b)
    if where_a is None and where_b is None:
        return False
    return where_a != where_b or where_a[1] != 0  # type: ignore[index]


def replicate_expert_groups(layer: nn.Module, groups: list[SmoothGroup]) -> list[SmoothGroup]:
    """Groups found inside expert 0 of an expert list, repeated for every expert of that list."""
    out = []
    for group in groups:
        where = expert_index(group.producer)
        if group.producer_kind != "linear" or where is None:
            out.append(group)
            continue
        experts, _ = where
        first = f"{experts}.0."
        for index in range(len(layer.get_submodule(experts))):
            own = f"{experts}.{index}."
            out.append(replace(group, producer=group.producer.replace(first, own, 1),
                               linears=tuple(n.replace(first, own, 1) for n in group.linears)))
    return out


def _record(layer: nn.Module, run: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every reader's and norm's input and output on one run of the layer. A Linear that rotates its input online
    (`llmquant.nn.online_rotation`: QuaRot's R4, R5, R6) is recorded with its input before the rotation, the tensor
    its producer wrote (what a smoothing scale multiplies)."""
    inputs, outputs, handles = {}, {}, []
    readers = set(_reads_by_weight(layer))
    for name, module in layer.named_modules():
        if name in readers or is_norm(module):
            rotated = input_rotation_of(module) is not None
            # the input: at the module's own forward hook, or before its rotation (a pre-hook on the rotation)
            handles.append((module.input_rotation if rotated else module).register_forward_pre_hook(
                lambda _m, args, name=name: inputs.__setitem__(name, args[0])))
            handles.append(module.register_forward_hook(
                lambda _m, _args, out, name=name: outputs.__setitem__(name, out)))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def _passes_through(
    layer: nn.Module,
    run: Any,
    producer: nn.Linear,
    reader: str,
    change: Callable[[torch.Tensor], torch.Tensor],
    expected: Callable[[torch.Tensor], torch.Tensor],
    before: torch.Tensor,
) -> bool:
    """Whether changing the producer's output by the linear map ``change`` (on its last dimension) changes
    the reader's input exactly to ``expected(before)``: the producer's weight and bias are changed, the
    layer is run again, and everything is restored."""
    saved_w, saved_b = producer.weight.data.clone(), None if producer.bias is None else producer.bias.data.clone()
    producer.weight.data = change(producer.weight.data.T).T.contiguous()
    if producer.bias is not None:
        producer.bias.data = change(producer.bias.data)
    try:
        after, _ = _record(layer, run)
    finally:
        producer.weight.data = saved_w
        if saved_b is not None:
            producer.bias.data = saved_b
    reference = expected(before)
    return torch.allclose(after[reader], reference, rtol=1e-3, atol=1e-5 * float(reference.abs().max()))


def _scales_through(layer: nn.Module, run: Any, producer: nn.Linear, reader: str, group: SmoothGroup,
                    before: torch.Tensor) -> bool:
    scale = torch.rand(producer.out_features, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.5
    scale = scale.to(producer.weight.device)
    expanded = expand_channels(scale, group)
    return _passes_through(layer, run, producer, reader, lambda t: t * scale, lambda t: t * expanded, before)


def _norm_groups(modules: dict[str, nn.Module], inputs: dict, outputs: dict) -> list[SmoothGroup]:
    """Each norm and the Linears reading its output, with the norm's gain offset (`norm_form`; 0 when its form is
    not recognized, which `foldable` tells)."""
    routers = {n for n, m in modules.items() if not isinstance(m, nn.Linear) and not is_norm(m) and n in inputs}
    linears = [n for n, m in modules.items() if (isinstance(m, nn.Linear) or n in routers) and n in inputs]
    norms = {name: out for name, out in outputs.items() if is_norm(modules[name])}
    found = {name: [n for n in linears if _same_values(inputs[n], out)] for name, out in norms.items()}
    # then the readers of a scaled copy, among the Linears no norm's very output reaches (two norms of one input,
    # as GPT-NeoX's parallel ones, give equal outputs while their gains are equal, as they are untrained)
    claimed = {n for readers in found.values() for n in readers}
    for name, out in norms.items():
        found[name] += [n for n in linears if n not in claimed and _scaled_copy(inputs[n], out)]
    return [SmoothGroup(producer=name, producer_kind="norm", linears=tuple(n for n in linears if n in readers),
                        producer_offset=norm_offset(modules[name])) for name, readers in found.items() if readers]


def _norm_scaling_keeps_function(layer: nn.Module, run: Any, group: SmoothGroup, reference: torch.Tensor) -> bool:
    """Whether dividing the norm's output channels by a random s and multiplying its readers' inputs by s leaves the
    layer's output (``reference``, unchanged) as it was: false when the norm's output also reaches a module that is
    not one of the readers (Llama 4's experts read it scaled by their router scores), which a smoothing scale would
    change."""
    norm = layer.get_submodule(group.producer)
    if any(layer.get_submodule(name).weight.shape[-1] != norm.weight.shape[-1] for name in group.linears):
        return False  # (a reader of another width (Linears and routers: x W^T): the norm's output reshaped, per head)
    scale = torch.rand(norm.weight.shape[-1], generator=torch.Generator().manual_seed(0)) * 1.5 + 0.5
    scale = scale.to(norm.weight.device, norm.weight.dtype)
    handles = [norm.register_forward_hook(lambda _m, _a, out: out / scale)]
    for name in group.linears:
        reader = layer.get_submodule(name)
        target = reader.input_rotation if input_rotation_of(reader) is not None else reader
        handles.append(target.register_forward_pre_hook(lambda _m, args: (args[0] * scale, *args[1:])))
    try:
        changed = _layer_io(layer, run)[1]
    finally:
        for handle in handles:
            handle.remove()
    return float((changed - reference).norm() / reference.norm().clamp(min=1e-30)) < 1e-4


def foldable(layer: nn.Module, group: SmoothGroup) -> str | None:
    """Why a group's scales cannot fold into its producer, or None when they can: a norm producer must compute
    one of the `NormForm`s (its per-channel gain is what a fold scales), and the group must not be ``blocked``."""
    if group.blocked:
        return group.blocked
    if group.producer_kind != "norm":
        return None
    norm = layer.get_submodule(group.producer)
    if norm_form(norm, norm.weight.shape[0]) is None:
        return (f"{group.producer} ({type(norm).__name__}) computes neither (w + c) * x / rms(x) nor a LayerNorm "
                "with a per-channel gain, so no scale folds into it")
    return None


def split_foldable(layer: nn.Module, groups: list[SmoothGroup],
                   linears: list[str]) -> tuple[list[SmoothGroup], dict[str, str]]:
    """The groups whose scales fold (`foldable`), and, by Linear of ``linears``, why the ones no such group reads
    are not smoothed."""
    kept, unsmoothed = [], {}
    for group in groups:
        why = foldable(layer, group)
        if why is None:
            kept.append(group)
        else:
            unsmoothed.update(dict.fromkeys(group.linears, why))
    readers = {name for group in kept for name in group.linears}
    for name in linears:
        if name not in readers:
            unsmoothed.setdefault(name, "no norm or Linear feeds it channel for channel")
    return kept, unsmoothed


def norm_groups(layer: nn.Module, run: Any) -> list[SmoothGroup]:
    """Each norm of one decoder layer and the Linears reading its output (the groups R1 fuses)."""
    inputs, outputs = _record(layer, run)
    return _norm_groups(dict(layer.named_modules()), inputs, outputs)


def unread_norms(layer: nn.Module, run: Any, groups: list[SmoothGroup], hidden: int) -> list[str]:
    """The norms of the residual stream (of the hidden size, not normalizing a Linear's output as OLMoE's q_norm
    does) that ran in ``layer`` but head no group of ``groups``: no Linear (or router) was found reading their
    output, so R1 could not rotate whatever does with them."""
    inputs, outputs = _record(layer, run)
    producers = {group.producer for group in groups}
    linear_outputs = [out for name, out in outputs.items() if not is_norm(layer.get_submodule(name))]
    return [name for name in outputs if is_norm(layer.get_submodule(name)) and name not in producers
            and layer.get_submodule(name).weight.shape[-1] == hidden
            and not any(_same_values(inputs[name], out) or _scaled_copy(inputs[name], out) for out in linear_outputs)]


def detect_smooth_groups(layer: nn.Module, run: Any, head_dim: int | None, where: str) -> list[SmoothGroup]:
    """Smoothing groups of one decoder layer; ``run()`` runs the layer once on a sample input."""
    inputs, outputs = _record(layer, run)
    modules = dict(layer.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n in inputs]
    reference = _layer_io(layer, run)[1]
    groups = [group if foldable(layer, group) is not None or _norm_scaling_keeps_function(layer, run, group, reference)
              else replace(group, blocked=f"{group.producer}'s output also reaches a module other than its readers, "
                                          "which a scale of its channels would change")
              for group in _norm_groups(modules, inputs, outputs)]  # (an unfoldable group is said by `foldable`)
    for a in linears:
        producer = modules[a]
        for b in linears:
            reader = modules[b]
            if a == b or reader.in_features % producer.out_features or _expert_pair_skipped(a, b):
                continue
            repeat = reader.in_features // producer.out_features
            if repeat > 1 and (not head_dim or producer.out_features % head_dim):  # whole heads only
                continue
            group = SmoothGroup(a, "linear", (b,), repeat, head_dim if repeat > 1 else 0)
            if _scales_through(layer, run, producer, b, group, inputs[b]):
                groups.append(group)
    if not groups:
        raise LlmquantError(f"{where}: no smoothing pattern (norm -> linear or linear -> linear) was found")
    return replicate_expert_groups(layer, groups)


# --- rotation patterns ------------------------------------------------------------------------------
NormKind = str  # "rms" | "layer"
GAIN_OFFSETS = (0.0, 1.0)  # a norm's gain is w + offset: 0 for most, 1 for Gemma's (1 + w) norms


@dataclass(frozen=True)
class NormForm:
    """What a norm computes: ``(w + offset) * x / rms(x)`` (``kind`` "rms") or ``(w + offset) * (x - mean) / std
    + b`` ("layer"). The folds of smoothing and of QuaRot's R1 scale the gain ``w + offset``, not ``w``."""

    kind: NormKind
    offset: float = 0.0


def norm_form(norm: nn.Module, hidden: int) -> NormForm | None:
    """The `NormForm` a norm computes, found on random inputs (a float32 copy of it), or None when it is none of
    them (a norm whose gain is not a per-channel weight, or one that takes more than its input: Qwen3-Next's
    gated norm)."""
    norm = copy.deepcopy(norm).float()
    weight = norm.weight.detach().float()
    x = (torch.randn(8, hidden, generator=torch.Generator().manual_seed(0)) * 3.0).to(weight.device)
    bias = getattr(norm, "bias", None)
    bias = torch.zeros_like(weight) if bias is None else bias.detach().float()
    try:
        with torch.no_grad():
            y = norm(x)
    except (TypeError, RuntimeError):  # another signature, or a gain of another size than the hidden one
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    y = y.float()
    centered = x - x.mean(-1, keepdim=True)
    normalized = {
        "rms": x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)),
        "layer": centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True)),
    }
    for offset in GAIN_OFFSETS:
        for kind, n in normalized.items():
            if kind == "rms" and bias.abs().max() > 0:
                continue
            reference = (weight + offset) * n + (bias if kind == "layer" else 0.0)
            if torch.allclose(y, reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max())):
                return NormForm(kind, offset)
    return None


def describe_norms(layer: nn.Module) -> dict[str, str]:
    """Each norm of a layer and the `NormForm` it computes, in words (what `llmquant detect` prints)."""
    described = {}
    for name, module in layer.named_modules():
        weight = getattr(module, "weight", None)
        if not is_norm(module) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            continue
        form = norm_form(module, weight.shape[0])
        if form is None:
            described[name] = f"{type(module).__name__}: no fold fits (neither an RMSNorm nor a LayerNorm form)"
            continue
        gain = "w + 1" if form.offset else "w"
        bias = getattr(module, "bias", None) is not None
        described[name] = f"{'RMS' if form.kind == 'rms' else 'Layer'}Norm form, gain {gain}" + (
            ", with bias" if bias else "")
    return described


def norm_offset(norm: nn.Module) -> float:
    """The gain offset of a norm (`NormForm.offset`; 0 when its form is not recognized, which `foldable` tells)."""
    form = norm_form(norm, norm.weight.shape[0])
    return form.offset if form is not None else 0.0


def _layer_io(layer: nn.Module, run: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden-state input and output of one run of the layer."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        seen["in"] = args[0] if args else kwargs["hidden_states"]
        seen["out"] = out[0] if isinstance(out, tuple) else out

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen["in"], seen["out"]


def _with_outputs(layer: nn.Module, replace_outputs: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                  run: Any) -> torch.Tensor:
    """The layer's output when each named module's output ``out`` is replaced by ``replace(out)``."""
    handles = [
        layer.get_submodule(name).register_forward_hook(lambda _m, _a, out, fn=fn: fn(out))
        for name, fn in replace_outputs.items()
    ]
    try:
        return _layer_io(layer, run)[1]
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class ResidualWriters:
    """The Linears adding their output to the residual stream, and whether the layer is exactly
    ``output = input + sum(their outputs)``; ``blockers`` names norms reading a Linear's output."""

    linears: tuple[str, ...]
    exact: bool
    blockers: tuple[str, ...]


def residual_writers(layer: nn.Module, run: Any, hidden: int) -> ResidualWriters:
    """Find the residual writers of one decoder layer; ``run()`` runs it once on a sample input.

    A Linear L of ``hidden`` outputs writes the stream when, with every other such Linear's output held
    at its recorded value, a change of L's output appears in the layer's output unchanged up to a non-negative
    factor per token (Granite's residual multiplier; an expert's routing weight, zero for the tokens that did not
    choose it; a shared expert's gate): a per-token scalar commutes with R1. Holding the others (and the routers'
    choices) stops the change from reaching the output through a later sub-layer as well. An MoE layer is run
    with every expert on every token (`llmquant.nn.experts.all_experts`), so that held outputs keep their shape."""
    x, y = _layer_io(layer, run)
    inputs, outputs = _record(layer, run)
    modules = dict(layer.named_modules())
    candidates = [n for n in inputs if isinstance(modules[n], nn.Linear) and modules[n].out_features == hidden]
    routers = [n for n in _routing(layer) if n in outputs]  # held too: a changed stream must not re-route
    writers = []
    for name in candidates:
        delta = torch.randn(outputs[name].shape, generator=torch.Generator().manual_seed(1))
        delta = delta.to(outputs[name].device, outputs[name].dtype) * float(outputs[name].abs().mean().clamp(min=1e-3))
        held = {other: (lambda _out, kept=outputs[other]: kept) for other in (*candidates, *routers) if other != name}
        changed = _with_outputs(layer, {**held, name: lambda out, delta=delta: out + delta}, run)
        seen = changed - y
        factor = (seen * delta).sum(-1, keepdim=True) / (delta * delta).sum(-1, keepdim=True)  # least squares
        tolerance = 1e-4 * float(y.abs().max())
        if factor.max() > 0 and factor.min() > -1e-6 and torch.allclose(seen, factor * delta, rtol=1e-3,
                                                                          atol=tolerance):
            writers.append(name)
    without = _with_outputs(layer, dict.fromkeys(writers, torch.zeros_like), run) if writers else y
    exact = bool(writers) and torch.allclose(without, x, rtol=1e-4, atol=1e-5 * float(x.abs().max()))
    linear_outputs = [outputs[n] for n in inputs if isinstance(modules[n], nn.Linear)]
    blockers = tuple(
        n for n in inputs
        if is_norm(modules[n]) and any(inputs[n] is out for out in linear_outputs)
    )
    return ResidualWriters(tuple(writers), exact, blockers)


def rotation_pairs(layer: nn.Module, run: Any, head_dim: int) -> list[SmoothGroup]:
    """Linear -> Linear pairs through which a per-head rotation passes unchanged (R2's v -> o)."""
    inputs, _ = _record(layer, run)
    modules = dict(layer.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n in inputs]
    q = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=torch.Generator().manual_seed(2)))[0]

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return (t.reshape(*t.shape[:-1], -1, head_dim) @ q.to(t.device, t.dtype)).reshape(t.shape)

    pairs = []
    for a in linears:
        producer = modules[a]
        if producer.out_features % head_dim:
            continue
        for b in linears:
            reader = modules[b]
            if a == b or reader.in_features % producer.out_features or _expert_pair_skipped(a, b):
                continue
            if _passes_through(layer, run, producer, b, per_head, per_head, inputs[b]):
                repeat = reader.in_features // producer.out_features
                pairs.append(SmoothGroup(a, "linear", (b,), repeat, head_dim))
    return pairs

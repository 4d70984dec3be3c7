"""QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"; rotation names
of SpinQuant, Liu et al. 2024): orthogonal rotations that spread activation outliers over all channels
and leave the float function unchanged, because y = x W^T = (x Q)(W Q)^T for any orthogonal Q.

- R1 rotates the residual stream by Q1 (hidden x hidden), offline. First every norm's weight (and a
  LayerNorm's bias) is folded into the Linears reading it, so the norm is w = 1 and commutes with Q1
  (||x Q1|| = ||x||); a LayerNorm model first has its residual stream made zero-mean (embeddings and
  the Linears writing the stream are centered) so that its LayerNorms compute an RMSNorm, which then
  replaces them. Then E <- E Q1 for the embeddings, W <- W Q1 for the Linears reading the stream
  (q/k/v, gate/up, fc1, the head), W <- Q1^T W and b <- b Q1 for the Linears writing it (o, down, fc2).
- R2 rotates each attention head's values by Q2 (head_dim), offline: v_proj's rows of each head
  W_h <- Q2^T W_h, o_proj's columns of each head W_h <- W_h Q2 (attention mixes tokens, not channels).
- R3 rotates queries and keys by Q3 (head_dim) after RoPE, online: q k^T = (q Q3)(k Q3)^T; it makes
  the KV cache easier to quantize.
- R4 rotates the input of the Linears outside the attention that read no norm (down_proj, fc2) by Q4,
  online, with W <- W Q4 offline: their input is the hardest activation to quantize.
- R5 (QuaRot's online rotation before out_proj, which the SpinQuant names leave out) rotates the input
  of the value path's reader (o_proj) by Q5 over its whole width, online, with W <- W Q5: R2 mixes
  channels within each head only, R5 mixes the heads too.
- R6 (not in QuaRot or SpinQuant) rotates the input of the Linears reading a norm (q/k/v, gate/up, fc1) by Q6 over
  the hidden size, online, with W <- W Q6. Without R1 it leaves the residual stream in its own basis, where a
  massive channel is one channel that a smoothing scale folded into the norm can shrink before Q6 spreads it
  (SmoothRot's order, `llmquant.algorithms.smoothquant`); the place of FlatQuant's per-layer transforms P_a and
  P_ug (arXiv:2410.09426), with a fixed Hadamard in place of a learned matrix. Each reader rotates its own copy.

Every Q is a (randomized) Hadamard matrix built by `llmquant.quant.hadamard` when the size allows, else
the recipe's fallback. Maths in float64, cast back to the weights' dtype.

The structure a rotation needs is checked on the first decoder layer before any weight changes
(`plan_quarot`); what does not fit turns that rotation off with a note naming the module, and the others
still run. `rotate_layer` and `rotate_outside_layers` apply the plan; the pipeline checks every layer's
function after rotating it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from llmquant.errors import LlmquantError
from llmquant.model.patterns import (
    SmoothGroup,
    norm_form,
    norm_groups,
    residual_writers,
    rotation_pairs,
    unread_norms,
)
from llmquant.nn.kv_cache import enable_kv_quantization, restore_attention, uses_llmquant_attention
from llmquant.nn.online_rotation import OnlineRotation, RMSNorm, attach_input_rotation
from llmquant.quant.rotation import Fallback, Rotation, rotate_blocks, rotation_for

ROTATIONS = ("R1", "R2", "R3", "R4", "R5", "R6")
ONLINE_BEFORE_LINEARS = ("R4", "R5", "R6")  # online input rotations of Linears
ONLINE_ROTATIONS = ("R3", *ONLINE_BEFORE_LINEARS)  # R3 on queries and keys inside the attention
DEFAULT_ROTATIONS = ("R1", "R2", "R3", "R4")


@dataclass(frozen=True)
class QuaRotConfig:
    """Which rotations to apply, how to build them, and an optional hand-given value path (v, o)."""

    rotations: tuple[str, ...] = DEFAULT_ROTATIONS
    randomize: bool = True  # random +-1 signs on the offline Hadamards R1, R2 (seeded)
    seed: int = 0
    fallback: Fallback = "random"
    value_path: tuple[str, str] | None = None


@dataclass(frozen=True)
class RotationStep:
    """One of R1..R6: its rotation (None when it does not apply), where it acts, and why not if it doesn't."""

    name: str
    size: int
    rotation: Rotation | None
    targets: tuple[str, ...]
    online: bool
    note: str = ""

    def describe(self) -> dict[str, Any]:
        row: dict[str, Any] = {"rotation": self.name, "size": self.size, "online": self.online,
                               "applies": self.rotation is not None, "targets": list(self.targets)}
        if self.rotation is not None:
            row["construction"] = self.rotation.describe()
            if self.online:
                row["online_flops_per_token"] = self.rotation.online_flops() * self.online_vectors
        if self.note:
            row["note"] = self.note
        return row

    online_vectors: int = 1  # vectors rotated per token per layer (R3: query and key heads)


@dataclass(frozen=True)
class QuaRotPlan:
    """The rotations of one model, resolved on its first decoder layer before any weight changes."""

    steps: dict[str, RotationStep]
    norm_groups: tuple[SmoothGroup, ...] = ()
    writers: tuple[str, ...] = ()
    center: bool = False  # LayerNorm model: make the residual stream zero-mean, norms become RMSNorms
    embeddings: tuple[str, ...] = ()
    final_norm: str | None = None
    final_norm_offset: float = 0.0  # its gain is w + offset (`llmquant.model.patterns.NormForm`)
    head: str | None = None
    value_path: tuple[str, str] | None = None
    attention: str = ""
    notes: list[str] = field(default_factory=list)

    def rotation(self, name: str) -> Rotation | None:
        step = self.steps.get(name)
        return step.rotation if step is not None else None

    def describe(self) -> list[dict[str, Any]]:
        return [step.describe() for step in self.steps.values()]

    def with_rotation(self, name: str, rotation: Rotation | None) -> QuaRotPlan:
        """This plan with ``rotation`` in place of the applying step ``name``'s (unchanged for None or a step that
        does not apply)."""
        step = self.steps.get(name)
        if rotation is None or step is None or step.rotation is None:
            return self
        if rotation.n != step.size:
            raise LlmquantError(f"{name} acts on size {step.size}, not on the {rotation.n} of the rotation given")
        return replace(self, steps={**self.steps, name: replace(step, rotation=rotation)})


# --- planning ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShapes:
    hidden: int
    head_dim: int
    heads: int
    kv_heads: int


def _off(name: str, size: int, note: str, online: bool) -> RotationStep:
    return RotationStep(name, size, None, (), online, note)


def _sized(name: str, size: int, targets: tuple[str, ...], online: bool, config: QuaRotConfig,
           vectors: int = 1) -> RotationStep:
    randomize = config.randomize and not online  # online rotations are plain Hadamards: nothing to store
    rotation = rotation_for(size, randomize, config.seed, config.fallback)
    if rotation is None:
        return _off(name, size, f"no Hadamard matrix of order {size} and fallback 'skip'", online)
    note = "" if rotation.kind == "hadamard" else f"no Hadamard matrix of order {size}: fallback {rotation.kind}"
    return RotationStep(name, size, rotation, targets, online, note, vectors)


def _plan_r1(
    model: nn.Module, model_map: Any, layer: nn.Module, run: Callable[[], Any], shapes: ModelShapes,
    config: QuaRotConfig, where: str,
) -> tuple[RotationStep, dict[str, Any]]:
    """R1 and the structure it needs; a misfit turns it off with a note naming the module."""
    hidden = shapes.hidden
    # the norms of the residual stream (not one inside a sub-layer, as DeepSeek's MLA kv_a_layernorm of its rank)
    groups = [g for g in norm_groups(layer, run) if layer.get_submodule(g.producer).weight.shape[-1] == hidden]
    writers = residual_writers(layer, run, hidden)
    found: dict[str, Any] = {"norm_groups": tuple(groups), "writers": writers.linears}

    def off(note: str) -> tuple[RotationStep, dict[str, Any]]:
        return _off("R1", hidden, note, online=False), found

    if not writers.exact:
        why = f"{where}: the layer's output is not its input plus the outputs of {list(writers.linears)}"
        if writers.blockers:
            blockers = ", ".join(writers.blockers)
            why += f" ({blockers} normalize a sub-layer's output before it joins the residual stream)"
        return off(why)
    unread = unread_norms(layer, run, groups, hidden)
    if unread:
        return off(f"{where}.{unread[0]}'s output reaches no Linear found reading it, which R1 would have to rotate "
                   "with the residual stream")
    forms = {g.producer: norm_form(layer.get_submodule(g.producer), hidden) for g in groups}
    final_norm = model_map.final_norm
    if final_norm is not None:
        forms[final_norm] = norm_form(model.get_submodule(final_norm), hidden)
    odd = [n for n, form in forms.items() if form is None]
    if odd:
        return off(f"{odd[0]} computes neither (w + c) * x / rms(x) nor a LayerNorm with a per-channel gain")
    kinds = {n: form.kind for n, form in forms.items() if form is not None}
    if len(set(kinds.values())) > 1:
        return off(f"the model mixes RMSNorm and LayerNorm ({kinds}): R1 needs one kind")
    center = set(kinds.values()) == {"layer"}
    if center:
        for group in groups:
            norm = layer.get_submodule(group.producer)
            without_bias = [n for n in group.linears if layer.get_submodule(n).bias is None]
            if getattr(norm, "bias", None) is not None and without_bias:
                return off(f"the bias of {where}.{group.producer} cannot be folded: {without_bias} have no bias")
    for name in model_map.embeddings:
        dim = model.get_submodule(name).weight.shape[1]
        if dim != hidden:
            return off(f"embedding {name} has dimension {dim}, not the hidden size {hidden} "
                       "(a projection R1 does not fold)")
    head = model_map.lm_head
    if head is not None and model.get_submodule(head).in_features != hidden:
        return off(f"the head {head} does not read the hidden size {hidden}")
    found.update(center=center, embeddings=tuple(model_map.embeddings), final_norm=final_norm, head=head,
                 final_norm_offset=forms[final_norm].offset if final_norm is not None else 0.0)
    targets = tuple(n for g in groups for n in g.linears) + writers.linears
    return _sized("R1", hidden, targets, False, config), found


def _plan_r4(layer: nn.Module, groups: tuple[SmoothGroup, ...], attention: str, config: QuaRotConfig,
             where: str, hidden: int) -> dict[str, RotationStep]:
    """R4's targets: the Linears outside the attention that read no norm and not the hidden size (down_proj,
    fc2, every expert's down projection), whose input the layer computes with a non-linearity that no offline
    rotation can reach (a Linear reading the residual stream unnormalized, as OLMo 2's gate_proj and up_proj do,
    is not one). Targets of another input size than the first's (an MoE block's shared expert, wider than its
    experts) get a rotation of their own size, a step named ``R4/<size>``."""
    norm_readers = {n for g in groups for n in g.linears}
    targets = tuple(
        name for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and name not in norm_readers and not name.startswith(attention + ".")
        and module.in_features != hidden
    )
    if not targets:
        return {"R4": _off("R4", 0, f"{where}: no Linear outside the attention reads a computed input (neither a "
                           "norm's output nor the hidden stream)", True)}
    by_size: dict[int, list[str]] = {}
    for name in targets:
        by_size.setdefault(layer.get_submodule(name).in_features, []).append(name)
    steps = {}
    for i, (size, names) in enumerate(by_size.items()):
        key = "R4" if i == 0 else f"R4/{size}"
        steps[key] = replace(_sized("R4", size, tuple(names), True, config), name=key)
    return steps


def _plan_r6(layer: nn.Module, groups: tuple[SmoothGroup, ...], config: QuaRotConfig, where: str,
             hidden: int) -> RotationStep:
    """R6's targets: every reader of a norm of the residual stream, an MoE router included (it computes x W^T from
    the same input, so one smoothing scale before the rotation still reaches all of them)."""
    targets = tuple(name for g in groups for name in g.linears)
    if not targets:
        return _off("R6", hidden, f"{where}: no Linear reads a norm of the residual stream", True)
    return _sized("R6", hidden, targets, True, config, vectors=len(targets))  # each reader rotates its own copy


def plan_quarot(
    model: nn.Module, model_map: Any, layer: nn.Module, run: Callable[[], Any], shapes: ModelShapes,
    config: QuaRotConfig, stream_misfit: str | None = None,
) -> QuaRotPlan:
    """Resolve ``config`` on the first decoder ``layer`` (``run()`` runs it once on a sample input);
    ``stream_misfit``: why the residual stream does not start at the embeddings (R1 then stays off)."""
    unknown = set(config.rotations) - set(ROTATIONS)
    if unknown:
        raise LlmquantError(f"unknown rotations {sorted(unknown)}; allowed: {', '.join(ROTATIONS)}")
    where = model_map.layer_name(0)
    steps: dict[str, RotationStep] = {}
    r1, found = _plan_r1(model, model_map, layer, run, shapes, config, where)
    if stream_misfit is not None and r1.rotation is not None:
        r1 = _off("R1", shapes.hidden, stream_misfit, online=False)
    if "R1" in config.rotations:
        steps["R1"] = r1
    writers = found["writers"]

    value_path = config.value_path
    if value_path is None:
        pairs = rotation_pairs(layer, run, shapes.head_dim)
        value_path = (pairs[0].producer, pairs[0].linears[0]) if pairs else None
    if "R2" in config.rotations:
        if value_path is None:
            steps["R2"] = _off("R2", shapes.head_dim, f"{where}: no Linear -> Linear value path found", False)
        else:
            steps["R2"] = _sized("R2", shapes.head_dim, value_path, False, config)
    if "R3" in config.rotations:
        before = enable_kv_quantization(model)
        attention = model_map.attention_of(layer)
        if attention is None:
            steps["R3"] = _off("R3", shapes.head_dim, f"{where} has no attention module ({model_map.attention})", True)
        elif uses_llmquant_attention(attention, run):
            steps["R3"] = _sized("R3", shapes.head_dim, (model_map.attention,), True, config,
                                 vectors=shapes.heads + shapes.kv_heads)
        else:
            restore_attention(model, before)  # (its own code reads the name: a wrapper's would change its function)
            note = f"{where}.{model_map.attention} computes attention without transformers' attention interface"
            steps["R3"] = _off("R3", shapes.head_dim, note, True)
    if "R4" in config.rotations:
        steps.update(_plan_r4(layer, found["norm_groups"], model_map.attention, config, where, shapes.hidden))
    if "R5" in config.rotations:
        if value_path is None:
            steps["R5"] = _off("R5", 0, f"{where}: no Linear -> Linear value path found", True)
        else:
            size = layer.get_submodule(value_path[1]).in_features
            steps["R5"] = _sized("R5", size, (value_path[1],), True, config)
    if "R6" in config.rotations:
        steps["R6"] = _plan_r6(layer, found["norm_groups"], config, where, shapes.hidden)
    return QuaRotPlan(
        steps=steps,
        norm_groups=found["norm_groups"],
        writers=writers,
        center=found.get("center", False),
        embeddings=found.get("embeddings", ()),
        final_norm=found.get("final_norm"),
        final_norm_offset=found.get("final_norm_offset", 0.0),
        head=found.get("head"),
        value_path=value_path,
        attention=model_map.attention,
    )


# --- transforms: pure functions on weights (float64 inside) -------------------------------------------
def rotate_input_side(weight: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """W <- W Q on each block of ``rotation.n`` input columns (W [out, in], in = blocks * n), in float64."""
    return rotate_blocks(weight.double(), rotation.n, "input", rotation.apply).to(weight.dtype)


def rotate_output_side(weight: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """W <- Q^T W on each block of ``rotation.n`` output rows (a bias [out] is rotated the same way), in float64."""
    return rotate_blocks(weight.double(), rotation.n, "output", rotation.apply).to(weight.dtype).contiguous()


@torch.no_grad()
def fold_norm(norm: nn.Module, readers: list[nn.Linear], offset: float = 0.0) -> None:
    """Fold y = g * n(x) + b, with the gain g = w + ``offset``, into the readers: W <- W diag(g), c <- c + W b;
    then g = 1 (w = 1 - offset) and b = 0."""
    gain = norm.weight.double() + offset
    bias = getattr(norm, "bias", None)
    for linear in readers:
        w = linear.weight.double()
        if bias is not None:
            linear.bias.data = (linear.bias.double() + w @ bias.double()).to(linear.bias.dtype)
        linear.weight.data = (w * gain[None, :]).to(linear.weight.dtype)
    norm.weight.data.fill_(1.0 - offset)
    if bias is not None:
        norm.bias.data.zero_()


@torch.no_grad()
def center_writer(linear: nn.Linear) -> None:
    """Make the Linear's output zero-mean over its features: W <- W - mean_rows(W), b <- b - mean(b)."""
    linear.weight.data = (linear.weight.double() - linear.weight.double().mean(0, keepdim=True)).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.double() - linear.bias.double().mean()).to(linear.bias.dtype)


@torch.no_grad()
def rotate_writer(linear: nn.Linear, rotation: Rotation) -> None:
    linear.weight.data = rotate_output_side(linear.weight.data, rotation)
    if linear.bias is not None:
        linear.bias.data = rotate_output_side(linear.bias.data, rotation)


@torch.no_grad()
def rotate_reader(linear: nn.Linear, rotation: Rotation) -> None:
    linear.weight.data = rotate_input_side(linear.weight.data, rotation)


EPS_NAMES = ("eps", "variance_epsilon", "epsilon")  # how norms name their epsilon (torch's, Cohere's, ...)


def _eps_of(norm: nn.Module) -> float:
    for attribute in EPS_NAMES:
        value = getattr(norm, attribute, None)
        if isinstance(value, float | int):
            return float(value)
    raise LlmquantError(f"{type(norm).__name__} names its epsilon none of {', '.join(EPS_NAMES)}: QuaRot cannot "
                        "rebuild it as an RMSNorm after centering; turn R1 off (--rotations R2,R3,R4)")


def _as_rms(root: nn.Module, name: str) -> None:
    """Replace the (folded, w = 1, b = 0) LayerNorm ``name`` by an RMSNorm with its eps."""
    norm = root.get_submodule(name)
    parent, _, child = name.rpartition(".")
    rms = RMSNorm(norm.weight.shape[0], _eps_of(norm)).to(norm.weight.device, norm.weight.dtype)
    setattr(root.get_submodule(parent) if parent else root, child, rms)


# --- applying a plan -----------------------------------------------------------------------------
@torch.no_grad()
def rotate_layer(layer: nn.Module, plan: QuaRotPlan) -> None:
    """Apply R1 (with the norm folds), R2, R3, R4, R5 and R6 to one decoder layer in place."""
    r1, r2, r3 = (plan.rotation(n) for n in ("R1", "R2", "R3"))
    if r1 is not None:
        for group in plan.norm_groups:
            fold_norm(layer.get_submodule(group.producer), [layer.get_submodule(n) for n in group.linears],
                      group.producer_offset)
            if plan.center:
                _as_rms(layer, group.producer)
            for name in group.linears:
                rotate_reader(layer.get_submodule(name), r1)
        for name in plan.writers:
            if plan.center:
                center_writer(layer.get_submodule(name))
            rotate_writer(layer.get_submodule(name), r1)
    if r2 is not None and plan.value_path is not None:
        producer, reader = plan.value_path
        rotate_writer(layer.get_submodule(producer), r2)
        rotate_reader(layer.get_submodule(reader), r2)
    if r3 is not None:
        layer.get_submodule(plan.attention).qk_rotation = OnlineRotation(r3)
    for step in plan.steps.values():
        if step.rotation is not None and step.name.split("/")[0] in ONLINE_BEFORE_LINEARS:  # (R4/<size> too)
            for name in step.targets:
                linear = layer.get_submodule(name)
                rotate_reader(linear, step.rotation)
                attach_input_rotation(linear, step.rotation)


@torch.no_grad()
def rotate_embeddings(model: nn.Module, plan: QuaRotPlan) -> None:
    """R1 on the embeddings (centered first for a LayerNorm model)."""
    r1 = plan.rotation("R1")
    if r1 is None:
        return
    for name in plan.embeddings:
        emb = model.get_submodule(name)
        table = emb.weight.double()
        if plan.center:
            table = table - table.mean(-1, keepdim=True)
        emb.weight.data = r1.apply(table).to(emb.weight.dtype)


@torch.no_grad()
def rotate_head(model: nn.Module, plan: QuaRotPlan) -> None:
    """R1 on the head, the final norm folded into it (a LayerNorm's bias becomes the head's bias)."""
    r1 = plan.rotation("R1")
    if r1 is None or plan.head is None:
        return
    head = model.get_submodule(plan.head)
    if plan.final_norm is not None:
        norm = model.get_submodule(plan.final_norm)
        if getattr(norm, "bias", None) is not None and head.bias is None:
            head.bias = nn.Parameter(torch.zeros_like(head.weight[:, 0]), requires_grad=False)
        fold_norm(norm, [head], plan.final_norm_offset)
        if plan.center:
            _as_rms(model, plan.final_norm)
    rotate_reader(head, r1)


__all__ = [
    "DEFAULT_ROTATIONS",
    "ONLINE_BEFORE_LINEARS",
    "ONLINE_ROTATIONS",
    "ROTATIONS",
    "ModelShapes",
    "QuaRotConfig",
    "QuaRotPlan",
    "RotationStep",
    "center_writer",
    "fold_norm",
    "plan_quarot",
    "rotate_embeddings",
    "rotate_head",
    "rotate_input_side",
    "rotate_layer",
    "rotate_output_side",
]

"""The rotation pass of the engine (QuaRot, `llmquant.algorithms.quarot`), with its equivalence checks.

Data-free: the plan is resolved on the first decoder layer, then the embeddings are rotated before
calibration starts, each decoder layer just before it is calibrated, and the head at the end. On one
calibration sample the pass checks what each step claims, and stops naming the step if a check fails:

- the embeddings: the first layer's inputs x' == x moved into the rotated residual stream (x' = x Q1,
  centered first for a LayerNorm model; x' = x without R1);
- each layer and the head: rotated(module)(x') == (module(x))' on one sample,
each with a relative error below the `equivalence_tolerance` of the dtype the model computes in. The plan is
found on a float32 copy of the first layer (`float32_probe`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from llmquant.algorithms.quarot import (
    ModelShapes,
    QuaRotConfig,
    QuaRotPlan,
    plan_quarot,
    rotate_embeddings,
    rotate_head,
    rotate_layer,
)
from llmquant.device import device_of
from llmquant.errors import LlmquantError
from llmquant.model.model_map import ModelMap, layer_structure, untie_head
from llmquant.nn.experts import all_experts
from llmquant.parallel import SINGLE, Ranks
from llmquant.pipeline.layer_io import (
    LayerInputs,
    capture_layer_inputs,
    check_equivalence,
    compute_dtype,
    float32_probe,
    head_dim_of,
    run_layer,
)
from llmquant.quant.metrics import relative_error
from llmquant.quant.rotation import Rotation

log = logging.getLogger(__name__)


def model_shapes(model: nn.Module, model_map: ModelMap, hidden: int) -> ModelShapes:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = head_dim_of(model, model_map) or (hidden // heads if heads else 0)  # (a config without hidden_size)
    if not head_dim:
        raise LlmquantError("QuaRot needs the width of an attention head: attention.head_dim, config.head_dim, or "
                            "config.hidden_size and config.num_attention_heads")
    return ModelShapes(hidden=hidden, head_dim=head_dim, heads=heads,
                       kv_heads=getattr(config, "num_key_value_heads", None) or heads)


def plan_rotations(model: nn.Module, model_map: ModelMap, config: QuaRotConfig, sample: torch.Tensor) -> QuaRotPlan:
    """The QuaRot plan of ``model``, found on its first decoder layer with one sample ``[1, seqlen]``."""
    inputs = capture_layer_inputs(model, model_map, sample)
    layer, run = float32_probe(model_map.layers(model)[0], inputs)
    shapes = model_shapes(model, model_map, inputs.hidden[0].shape[-1])
    with all_experts(layer):
        return plan_quarot(model, model_map, layer, run, shapes, config,
                           stream_misfit=_stream_misfit(model, model_map, sample, inputs.hidden[0]))


def _stream_misfit(model: nn.Module, model_map: ModelMap, sample: torch.Tensor, first_input: torch.Tensor
                   ) -> str | None:
    """Why the first decoder layer's input is not the input embeddings' output times a constant (which R1 rotates
    by rotating the embeddings): BLOOM normalizes the embeddings before its first layer. None when it is, and
    for a model with several embeddings (OPT adds learned positions: the check after rotating them judges)."""
    if len(model_map.embeddings) != 1:
        return None
    embeddings = model.get_submodule(model_map.embeddings[0])
    with torch.no_grad():
        embedded = embeddings(sample.to(embeddings.weight.device)).to(first_input.device, torch.float64)
    received = first_input.to(torch.float64)
    scale = (received * embedded).sum() / (embedded * embedded).sum().clamp(min=1e-30)
    if float((received - scale * embedded).norm() / received.norm().clamp(min=1e-30)) < 1e-4:
        return None
    return (f"the first decoder layer's input is not the embeddings' output times a constant (a module between "
            f"them, after {type(embeddings).__name__}, changes it)")


def with_seed_map(model: nn.Module, model_map: ModelMap, backbone: str | None, decoder_layers: str | None,
                  attention: str | None) -> ModelMap:
    """The model map with seed 003's layer-map keys applied (each must name a module of the model)."""
    names = dict(model.named_modules())
    for key, value in (("backbone", backbone), ("model_decoder_layers", decoder_layers)):
        if value is not None and value not in names:
            raise LlmquantError(f"quarot layer map: {key} '{value}' is not a module of {type(model).__name__}")
    if decoder_layers is not None:
        model_map = replace(model_map, decoder_layers=decoder_layers)
    if attention is not None:
        first = model_map.layer_name(0)
        if f"{first}.{attention}" not in names:
            raise LlmquantError(f"quarot layer map: self_attn '{attention}' is not a module of {first}")
        model_map = replace(model_map, attention=attention)
    return model_map


def _check(error: float, what: str, dtype: torch.dtype) -> float:
    return check_equivalence(error, dtype, "QuaRot", what, "the model's structure does not fit the rotation plan")


def _to_stream(plan: QuaRotPlan, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hidden states of the float model moved into the rotated model's residual stream."""
    r1 = plan.rotation("R1")
    if r1 is None:
        return hidden
    moved = [h - h.mean(-1, keepdim=True) if plan.center else h for h in hidden]
    return [r1.apply(h) for h in moved]


def _from_stream(plan: QuaRotPlan, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rotated residual-stream states back in the float model's basis."""
    r1 = plan.rotation("R1")
    return hidden if r1 is None else [r1.apply(h, inverse=True) for h in hidden]


@dataclass(frozen=True)
class RotationOverrides:
    """Rotations that replace the plan's Hadamards: R1 for the whole model, R2 per decoder layer index (SpinQuant's
    learned ones, `llmquant.pipeline.learned_rotation`)."""

    r1: Rotation | None = None
    r2: dict[int, Rotation] = field(default_factory=dict)


class RotationPass:
    """QuaRot inside the engine's layer loop: `start` plans on the float first layer and rotates the
    embeddings, `rotate` rotates one decoder layer, `finish` the final norm and head; each is checked on
    one sample, comparing the rotated module on rotated inputs with the float one on the same inputs
    moved back (so it also holds for a model streamed from disk, one layer at a time)."""

    def __init__(self, model: nn.Module, model_map: ModelMap, config: QuaRotConfig, sample: torch.Tensor,
                 ranks: Ranks = SINGLE, overrides: RotationOverrides | None = None) -> None:
        """``sample``: token ids ``[1, T]`` (the same on every rank); the first decoder layer must hold its float
        weights. With several ``ranks`` the layer checks run on each rank's own first sample and are judged
        over all of them, so every rank takes the same decision. ``overrides`` replace the plan's R1 and each
        layer's R2."""
        untie_head(model, model_map)
        self.model, self.model_map, self.ranks, self.config = model, model_map, ranks, config
        self.overrides = overrides or RotationOverrides()
        self.plan = plan_rotations(model, model_map, config, sample).with_rotation("R1", self.overrides.r1)
        self.layer_plans = {layer_structure(model_map.layers(model)[0]): self.plan}
        self.index_plans: dict[int, QuaRotPlan] = {}  # the plan each rotated layer got
        for step in self.plan.steps.values():
            if step.rotation is None:
                log.warning("QuaRot %s does not apply: %s", step.name, step.note)
        before = capture_layer_inputs(model, model_map, sample)
        rotate_embeddings(model, self.plan)
        after = capture_layer_inputs(model, model_map, sample)
        self.dtype = compute_dtype(model_map.layers(model)[0])
        self.errors = {"embeddings": _check(relative_error(_to_stream(self.plan, before.hidden), after.hidden),
                                            "the embeddings", self.dtype)}
        self.layer_errors: list[float] = []

    def _float_basis(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rotated-stream states moved back to the float basis (and centered exactly for a LayerNorm model:
        a quantized stream is zero-mean only up to quantization error), as check inputs."""
        moved = _from_stream(self.plan, hidden)
        return [h - h.mean(-1, keepdim=True) for h in moved] if self.plan.center else moved

    @torch.no_grad()
    def rotate(self, layer: nn.Module, index: int, sample: LayerInputs) -> None:
        """Rotate one decoder layer; ``sample``: its inputs (in the rotated stream) for one sample."""
        where = self.model_map.layer_name(index)
        hidden = self._float_basis(sample.hidden)
        float_out = run_layer(layer, LayerInputs(hidden, sample.kwargs), where)
        rotate_layer(layer, self.plan_at(layer, index, LayerInputs(hidden, sample.kwargs)))
        rotated_out = run_layer(layer, LayerInputs(_to_stream(self.plan, hidden), sample.kwargs), where)
        error = relative_error(_to_stream(self.plan, float_out), rotated_out, self.ranks)
        self.layer_errors.append(_check(error, where, self.dtype))

    def plan_at(self, layer: nn.Module, index: int, sample: LayerInputs | None = None) -> QuaRotPlan:
        """The plan of decoder layer ``index`` (``layer``, not rotated yet), with the overrides: its structure's
        (found on ``sample`` for a structure not met before; without one, the first layer's), R1 and its R2
        replaced."""
        if sample is None:
            base = self.layer_plans.get(layer_structure(layer), self.plan)
        else:
            base = self._plan_for(layer, sample)
        plan = base.with_rotation("R1", self.overrides.r1).with_rotation("R2", self.overrides.r2.get(index))
        self.index_plans[index] = plan
        return plan

    def _plan_for(self, layer: nn.Module, sample: LayerInputs) -> QuaRotPlan:
        """The plan of a layer made as ``layer`` is: the first layer's, or, for a layer made otherwise (the MoE
        layers after DeepSeek-V3's dense ones), its own norm groups, residual writers and online rotations under
        the model's R1 (found the same way, on ``sample`` in the float basis)."""
        structure = layer_structure(layer)
        if structure not in self.layer_plans:
            probe, run = float32_probe(layer, sample)
            shapes = model_shapes(self.model, self.model_map, sample.hidden[0].shape[-1])
            with all_experts(probe):
                own = plan_quarot(self.model, self.model_map, probe, run, shapes, self.config)
            if (own.rotation("R1") is None) != (self.plan.rotation("R1") is None):
                why = own.steps["R1"].note if "R1" in own.steps else "R1 applies there only"
                raise LlmquantError(f"QuaRot R1 cannot rotate a layer made otherwise than the first: {why}")
            self.layer_plans[structure] = replace(own, center=self.plan.center)
        return self.layer_plans[structure]

    @torch.no_grad()
    def finish(self, last_outputs: list[torch.Tensor]) -> dict:
        """Rotate the head (the final norm folded into it), check it on the last layer's outputs of one
        sample, and return the manifest entry."""
        plan, model = self.plan, self.model
        if plan.rotation("R1") is not None and plan.head is not None:
            norm = model.get_submodule(plan.final_norm) if plan.final_norm else nn.Identity()
            head = model.get_submodule(plan.head)
            hidden = self._float_basis([h.to(device_of(head)) for h in last_outputs])
            reference = head(norm(hidden[0]))
            rotate_head(model, plan)
            norm = model.get_submodule(plan.final_norm) if plan.final_norm else nn.Identity()
            rotated = head(norm(_to_stream(plan, hidden)[0]))
            self.errors["head"] = _check(relative_error([reference], [rotated], self.ranks), "the head", self.dtype)
        self.errors["layers_max"] = max(self.layer_errors, default=0.0)
        entry = {"plan": plan.describe(), "center": plan.center, "equivalence_error": self.errors}
        others = [p.describe() for p in self.layer_plans.values() if p is not self.plan]
        if others:  # layers made otherwise than the first (DeepSeek-V3's MoE layers after its dense ones)
            entry["other_layer_plans"] = others
        return entry


@torch.no_grad()
def rotate_whole_model(model: nn.Module, model_map: ModelMap, config: QuaRotConfig,
                       sample: torch.Tensor) -> tuple[RotationPass, dict]:
    """Plan, apply and check QuaRot on a whole model in memory, in place (the engine runs `RotationPass` layer by
    layer instead); return the pass (its plans) and the manifest entry."""
    rotation = RotationPass(model, model_map, config, sample)
    inputs = capture_layer_inputs(model, model_map, sample)
    for index, layer in enumerate(model_map.layers(model)):
        rotation.rotate(layer, index, inputs)
        inputs = LayerInputs(run_layer(layer, inputs, model_map.layer_name(index)), inputs.kwargs)
    return rotation, rotation.finish(inputs.hidden)


__all__ = ["RotationOverrides", "RotationPass", "model_shapes", "plan_rotations", "rotate_whole_model",
           "with_seed_map"]

"""The rotation pass of the engine (QuaRot, `llmquant.algorithms.quarot`), with its equivalence checks.

Data-free and run once before calibration: the plan is resolved on the first decoder layer, then the
embeddings, every decoder layer and the head are rotated. On one calibration sample the pass checks
what each step claims, and stops naming the step if a check fails:

- each layer: rotated(layer)(x') == (layer(x))' where x' is x moved into the rotated residual stream
  (x' = x Q1, centered first for a LayerNorm model; x' = x without R1);
- the whole model: the logits before and after, relative error below `EQUIVALENCE_TOLERANCE`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

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
from llmquant.errors import LlmquantError
from llmquant.model.model_map import ModelMap, untie_head
from llmquant.pipeline.layer_io import LayerInputs, capture_layer_inputs, head_dim_of, relative_error, run_layer

log = logging.getLogger(__name__)
EQUIVALENCE_TOLERANCE = 1e-4


def model_shapes(model: nn.Module, model_map: ModelMap, hidden: int) -> ModelShapes:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = head_dim_of(model, model_map) or (hidden // heads if heads else 0)
    if not head_dim:
        raise LlmquantError("QuaRot needs the attention's head_dim (model.config.head_dim or attention.head_dim)")
    return ModelShapes(hidden=hidden, head_dim=head_dim, heads=heads,
                       kv_heads=getattr(config, "num_key_value_heads", None) or heads)


def plan_rotations(model: nn.Module, model_map: ModelMap, config: QuaRotConfig, sample: torch.Tensor) -> QuaRotPlan:
    """The QuaRot plan of ``model``, found on its first decoder layer with one sample ``[1, seqlen]``."""
    inputs = capture_layer_inputs(model, model_map, sample)
    layer = model_map.layers(model)[0]

    def run() -> Any:
        return layer(inputs.hidden[0], **inputs.kwargs[0])

    shapes = model_shapes(model, model_map, inputs.hidden[0].shape[-1])
    return plan_quarot(model, model_map, layer, run, shapes, config)


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


def _check(error: float, what: str) -> float:
    if error > EQUIVALENCE_TOLERANCE:
        raise LlmquantError(
            f"QuaRot changed the function of {what}: relative output change {error:.2e} > "
            f"{EQUIVALENCE_TOLERANCE:.0e}; the model's structure does not fit the rotation plan"
        )
    return error


def _to_stream(plan: QuaRotPlan, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hidden states of the float model moved into the rotated model's residual stream."""
    r1 = plan.rotation("R1")
    if r1 is None:
        return hidden
    moved = [h - h.mean(-1, keepdim=True) if plan.center else h for h in hidden]
    return [r1.apply(h) for h in moved]


@torch.no_grad()
def rotate_model(model: nn.Module, model_map: ModelMap, config: QuaRotConfig, sample: torch.Tensor) -> dict:
    """Plan, apply and check QuaRot on ``model`` in place; return the manifest entry."""
    untie_head(model, model_map)
    reference = model(sample, use_cache=False).logits
    plan = plan_rotations(model, model_map, config, sample)
    for step in plan.steps.values():
        if step.rotation is None:
            log.warning("QuaRot %s does not apply: %s", step.name, step.note)
    inputs = capture_layer_inputs(model, model_map, sample)
    rotate_embeddings(model, plan)
    rotated_inputs = capture_layer_inputs(model, model_map, sample)
    errors = {"embeddings": _check(relative_error(_to_stream(plan, inputs.hidden), rotated_inputs.hidden),
                                   "the embeddings")}
    layer_errors = []
    for index, layer in enumerate(model_map.layers(model)):
        where = model_map.layer_name(index)
        float_out = run_layer(layer, inputs, where)
        rotate_layer(layer, plan)
        rotated_out = run_layer(layer, LayerInputs(_to_stream(plan, inputs.hidden), inputs.kwargs), where)
        layer_errors.append(_check(relative_error(_to_stream(plan, float_out), rotated_out), where))
        inputs = LayerInputs(float_out, inputs.kwargs)
    rotate_head(model, plan)
    rotated = model(sample, use_cache=False).logits
    errors["logits"] = _check(relative_error([reference], [rotated]), "the model (logits)")
    errors["layers_max"] = max(layer_errors, default=0.0)
    return {"plan": plan.describe(), "center": plan.center, "equivalence_error": errors}


__all__ = ["EQUIVALENCE_TOLERANCE", "model_shapes", "plan_rotations", "rotate_model", "with_seed_map"]

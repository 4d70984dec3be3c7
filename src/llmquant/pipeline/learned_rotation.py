"""SpinQuant in the engine: R1 and each layer's R2 learned (`llmquant.algorithms.spinquant`) before the rotation pass,
which then folds them into the model like QuaRot's Hadamards and checks the float function as it does for those.

The learning runs on a float32 copy of the whole model on the policy's device: the copy is rotated by QuaRot's
Hadamards (`rotate_whole_model`), the learned U1 and U2 act on top of it, and the rotations handed to the pass are
Q1 = H1 U1 and Q2_l = H2_l U2_l (float64 products). The copy needs the whole model in memory once more: a model
streamed from disk or offloaded by accelerate is refused with one line.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from llmquant.algorithms.quarot import QuaRotPlan
from llmquant.algorithms.spinquant import LayerRotations, NetworkMap, RotatedNetwork, learn
from llmquant.errors import LlmquantError
from llmquant.model.model_map import ModelMap
from llmquant.parallel import SINGLE, Ranks
from llmquant.pipeline.rotation import RotationOverrides, RotationPass, rotate_whole_model
from llmquant.quant.rotation import learned_rotation
from llmquant.recipe import QuantPlan, QuaRotPreOpt, Recipe

log = logging.getLogger(__name__)


def _layer_rotations(plan: QuaRotPlan) -> LayerRotations:
    r1 = plan.rotation("R1") is not None
    readers = tuple(n for g in plan.norm_groups for n in g.linears) if r1 else ()
    return LayerRotations(readers=readers, writers=plan.writers if r1 else (),
                          value_path=plan.value_path if plan.rotation("R2") is not None else None)


def network_map(model_map: ModelMap, rotated: RotationPass, plan: QuantPlan, weights: bool) -> NetworkMap:
    """Where U1 and U2 act in the Hadamard-rotated copy, and what its loss quantizes (``weights``: the weights too)."""
    r1 = rotated.plan.rotation("R1") is not None
    layers = {model_map.layer_name(i): _layer_rotations(p) for i, p in sorted(rotated.index_plans.items())}
    return NetworkMap(
        embeddings=rotated.plan.embeddings if r1 else (), head=rotated.plan.head if r1 else None, layers=layers,
        inputs={n: s.input_activations for n, s in plan.linears.items() if s.input_activations is not None},
        weights={n: s.weights for n, s in plan.linears.items() if s.weights is not None} if weights else {},
        kv_cache={n: spec for n, spec in plan.kv_cache.items() if spec is not None})


def _refusal(model: nn.Module, streams: bool) -> str | None:
    if streams:
        return "the model is streamed from disk (--max-memory)"
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return "accelerate spreads the model over several devices"
    return None


def learn_rotations(model: nn.Module, model_map: ModelMap, recipe: Recipe, quarot: QuaRotPreOpt, calib: torch.Tensor,
                    sample: torch.Tensor, device: torch.device, streams: bool = False, ranks: Ranks = SINGLE,
                    progress: bool = True) -> tuple[RotationOverrides, dict[str, Any]]:
    """Learn R1 and the R2s for ``recipe`` on token ids ``calib`` ``[n, T]`` (the same on every rank; rank 0's
    result is the one kept); ``sample``: the rotation pass's check sample. Returns the overrides for the pass and
    the manifest entry."""
    options = quarot.learn
    assert options is not None
    why = _refusal(model, streams)
    if why is not None:
        raise LlmquantError(f"learned rotations need the whole model in memory, but {why}; drop 'learn' from the "
                            "quarot pre-optimization or load the model whole")
    loss_recipe = recipe if options.scheme is None else recipe.model_copy(update={"scheme": options.scheme})
    plan = loss_recipe.resolve(model, model_map)
    weights = options.weights if options.weights is not None else _weights_in_loss(recipe, plan)
    work = copy.deepcopy(model).to(device=device, dtype=torch.float32)
    hadamard, _ = rotate_whole_model(work, model_map, quarot.config(), sample.to(device))
    h1, h2 = hadamard.plan.rotation("R1"), hadamard.plan.rotation("R2")
    network = RotatedNetwork(work, network_map(model_map, hadamard, plan, weights), hidden=h1.n if h1 else 0,
                             head_dim=h2.n if h2 is not None and options.r2 else 0)
    if not any(True for _ in network.named_rotations()):
        raise LlmquantError("learned rotations: neither R1 nor R2 applies to this model (see the quarot plan)")
    result = learn(network, calib.to(device), options.config(), progress=progress and ranks.writes)
    del network, work
    names = {model_map.layer_name(i): i for i in hadamard.index_plans}
    label = f"{len(result.losses)} Cayley SGD steps"
    r1 = None
    if h1 is not None and result.u1 is not None:
        r1 = learned_rotation(_shared(ranks, h1.matrix() @ result.u1.cpu()), f"R1, {label} from {h1.describe()}")
    r2 = {}
    for name, u2 in result.u2.items():
        index = names[name]
        h2 = hadamard.index_plans[index].rotation("R2")
        assert h2 is not None
        r2[index] = learned_rotation(_shared(ranks, h2.matrix() @ u2.cpu()), f"R2 of layer {index}, {label}")
    entry = {**result.describe(), "weights_in_loss": weights, "scheme_in_loss": loss_recipe.scheme,
             "iterations": options.iterations, "batch": options.batch, "lr": options.lr}
    log.info("learned rotations: loss %.4f -> %.4f in %.0f s", entry["loss_first_tenth"], entry["loss_last_tenth"],
             result.seconds)
    return RotationOverrides(r1=r1, r2=r2), entry


def _weights_in_loss(recipe: Recipe, plan: QuantPlan) -> bool:
    """SpinQuant's choice: with GPTQ only the activations (and KV cache) are quantized in the loss, unless nothing
    else would be (a weight-only scheme): then the weights are, rounded to nearest."""
    quantizes_inputs = any(s.input_activations is not None for s in plan.linears.values())
    quantizes_kv = any(spec is not None for spec in plan.kv_cache.values())
    return recipe.algorithm != "gptq" or not (quantizes_inputs or quantizes_kv)


def _shared(ranks: Ranks, matrix: torch.Tensor) -> torch.Tensor:
    """Rank 0's matrix on every rank (the ranks learn the same, up to the devices' non-determinism)."""
    return ranks.broadcast(matrix.contiguous(), 0) if ranks.world > 1 else matrix


__all__ = ["learn_rotations", "network_map"]

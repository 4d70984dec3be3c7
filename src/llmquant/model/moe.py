"""Mixture-of-experts blocks: found from the module tree and checked by running them, not from a table of classes.

- `unfuse_experts(model)`: every fused experts module (transformers 5: two 3-D parameters, ``[experts, 2 * inter,
  hidden]`` gate rows then up rows, and ``[experts, hidden, inter]``; or the layout the module declares through
  transformers' experts interface: transposed, gate and up rows alternating, biases, its own gated activation, as
  gpt-oss's) becomes an `llmquant.nn.experts.Experts`, one ``gate_proj`` / ``up_proj`` / ``down_proj`` Linear per
  expert with the same numbers. The first of each class is run both ways on random tokens and routing: a layout
  that does not compute the same stays fused, and float, with a warning, as do experts without a gate projection
  or with a norm after each expert. A skeleton on ``meta`` (a model streamed
  from disk) gets meta Linears, which the lazy loader fills with each expert's tensors from the checkpoint.
- `find_moe_blocks(layer)`: each block holding an expert list, with its router (the sibling whose weight is
  ``[experts, hidden]`` and whose output scores every expert), its shared experts (the sibling MLPs reading the
  same hidden size) and its gates (a router that is a Linear, a shared expert's one-output gate): the Linears
  left float by default, as llm-compressor and vLLM expect.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from llmquant.errors import LlmquantError
from llmquant.model.targets import is_linear
from llmquant.nn.experts import ExpertMLP, Experts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoEBlock:
    """One mixture-of-experts block of a decoder layer; names relative to the layer."""

    name: str
    router: str
    experts: str
    num_experts: int
    shared: tuple[str, ...] = ()
    gates: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEBlock:
        known = set(cls.__dataclass_fields__)
        if set(data) - known or not {"name", "router", "experts", "num_experts"} <= set(data):
            raise LlmquantError(f"a layer map's moe entry needs name, router, experts, num_experts (optional: shared, "
                                f"gates); got {sorted(data)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# --- fused experts -> one Linear per matrix --------------------------------------------------------
@dataclass(frozen=True)
class FusedLayout:
    """How a fused experts module stores its matrices: ``gate_up`` ``[experts, 2 * inter, hidden]`` and ``down``
    ``[experts, hidden, inter]`` (``transposed``: ``[experts, hidden, 2 * inter]`` and ``[experts, inter, hidden]``,
    the input side first), gate rows then up rows (``concatenated``) or alternating (gate 0, up 0, gate 1, ...), and
    ``biases`` (``gate_up_proj_bias`` ``[experts, 2 * inter]``, ``down_proj_bias`` ``[experts, hidden]``)."""

    experts: int
    hidden: int
    inter: int
    transposed: bool = False
    concatenated: bool = True
    biases: bool = False


def fused_layout(module: nn.Module) -> FusedLayout | None:
    """The `FusedLayout` of ``module`` when it is a fused experts module: one that declares its layout as
    transformers' experts interface does (``is_transposed``, ``is_concatenated``, ``has_bias``, set by
    ``use_experts_implementation``, with ``gate_up_proj`` and ``down_proj``), or, without a declaration, one that
    holds exactly two 3-D parameters shaped as ``[gate; up]`` and ``down`` and an activation."""
    params = dict(module.named_parameters(recurse=False))
    if hasattr(module, "is_transposed") and {"gate_up_proj", "down_proj"} <= set(params):
        transposed, biases = bool(module.is_transposed), bool(getattr(module, "has_bias", False))
        gate_up, down = params["gate_up_proj"], params["down_proj"]
        if gate_up.dim() != 3 or down.dim() != 3:
            return None
        experts, hidden, inter = down.shape[0], down.shape[2 if transposed else 1], down.shape[1 if transposed else 2]
        expected = (experts, hidden, 2 * inter) if transposed else (experts, 2 * inter, hidden)
        if tuple(gate_up.shape) != expected or (biases and not {"gate_up_proj_bias", "down_proj_bias"} <= set(params)):
            return None
        return FusedLayout(experts, hidden, inter, transposed, bool(getattr(module, "is_concatenated", True)), biases)
    values = list(params.values())
    if len(values) != 2 or any(p.dim() != 3 for p in values) or not callable(getattr(module, "act_fn", None)):
        return None
    (e1, two_inter, hidden), (e2, hidden2, inter) = (tuple(p.shape) for p in values)
    if e1 != e2 or hidden != hidden2 or two_inter != 2 * inter:
        return None
    return FusedLayout(e1, hidden, inter)


def _unsupported(module: nn.Module) -> str | None:
    """Why a module that declares transformers' experts interface cannot become per-expert gate/up/down Linears."""
    if not getattr(module, "has_gate", True):
        return "experts without a gate projection"
    if getattr(module, "has_post_expert_norm", False):
        return "a norm after each expert"
    return None


class FusedGate:
    """What an expert computes from its gate and up outputs when it is not act(gate) * up: the experts module's own
    ``_apply_gate`` (transformers' experts interface: the gated output from the fused [gate, up] output; gpt-oss's
    clamped SwiGLU) on the two outputs put back in the module's layout. It runs on ``shell``, a copy of the module
    without its parameters, so the unfused experts do not keep the fused weights alive."""

    def __init__(self, module: nn.Module, concatenated: bool) -> None:
        self.shell = copy.copy(module)
        self.shell._parameters, self.shell._buffers = {}, {}
        self.concatenated = concatenated

    def __call__(self, gate_out: torch.Tensor, up_out: torch.Tensor) -> torch.Tensor:
        joined = (torch.cat((gate_out, up_out), -1) if self.concatenated
                  else torch.stack((gate_out, up_out), -1).flatten(-2))
        return type(self.shell)._apply_gate(self.shell, joined)


def _gate_of(module: nn.Module, layout: FusedLayout) -> FusedGate | None:
    """The module's `FusedGate`, or None where its ``_apply_gate`` is transformers' default (act(gate) * up)."""
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is None or apply_gate.__name__ == "_default_apply_gate":
        return None
    return FusedGate(module, layout.concatenated)


FUSED_NAMES = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")  # transformers' experts interface


def fused_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The fused parameters of ``module`` under `FUSED_NAMES` (an undeclared module's two, in their order)."""
    params = {name: p.detach() for name, p in module.named_parameters(recurse=False)}
    return params if "gate_up_proj" in params else dict(zip(FUSED_NAMES, params.values(), strict=False))


def expert_matrices(fused: dict[str, torch.Tensor], layout: FusedLayout, index: int
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Expert ``index``'s (weight [out, in], bias or None) per Linear (``gate_proj``, ``up_proj``, ``down_proj``),
    as views of the ``fused`` tensors (`FUSED_NAMES`) stored in ``layout``."""
    gate_up, down = fused["gate_up_proj"][index], fused["down_proj"][index]
    if layout.transposed:
        gate_up, down = gate_up.t(), down.t()
    rows = (slice(None, layout.inter), slice(layout.inter, None)) if layout.concatenated else (
        slice(0, None, 2), slice(1, None, 2))
    biases: tuple = (None, None, None)
    if layout.biases:
        gate_up_bias, down_bias = fused["gate_up_proj_bias"][index], fused["down_proj_bias"][index]
        biases = (gate_up_bias[rows[0]], gate_up_bias[rows[1]], down_bias)
    return {"gate_proj": (gate_up[rows[0]], biases[0]), "up_proj": (gate_up[rows[1]], biases[1]),
            "down_proj": (down, biases[2])}


def fused_layouts(model: nn.Module) -> dict[str, FusedLayout]:
    """Every fused experts module of ``model`` that `unfuse_experts` turns into per-expert Linears, with its layout
    (what reading its fused tensors from a checkpoint needs: `llmquant.model.lazy`)."""
    return {name: layout for name, module in model.named_modules()
            if not isinstance(module, Experts) and (layout := fused_layout(module)) is not None
            and _unsupported(module) is None}


def _unfused(module: nn.Module, layout: FusedLayout) -> Experts:
    """The experts as per-expert Linears whose weights are views of the fused parameters (no copy: a 128-expert
    layer is not held twice; a transform that changes a weight gives that Linear a tensor of its own)."""
    dtype = next(module.parameters()).dtype
    gate = _gate_of(module, layout)
    unfused = Experts(ExpertMLP(layout.hidden, layout.inter, getattr(module, "act_fn", None), dtype=dtype,
                                device="meta", bias=layout.biases, gate=gate)
                      for _ in range(layout.experts))
    fused = fused_tensors(module)
    for index, expert in enumerate(unfused):
        for name, (weight, bias) in expert_matrices(fused, layout, index).items():
            linear = expert.get_submodule(name)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias, requires_grad=False)
    return unfused


def _same_function(fused: nn.Module, unfused: Experts, layout: FusedLayout) -> bool:
    """Whether both compute the same on random tokens routed to random experts (top 2, random weights)."""
    experts, hidden = layout.experts, layout.hidden
    generator = torch.Generator().manual_seed(0)
    weight = unfused[0].down_proj.weight
    x = torch.randn(12, hidden, generator=generator).to(weight.device, weight.dtype)
    index = torch.stack([torch.randperm(experts, generator=generator)[:min(2, experts)] for _ in range(12)])
    weights = torch.rand(index.shape, generator=generator).to(weight.device, weight.dtype)
    with torch.no_grad():
        expected = fused(x, index.to(weight.device), weights)
        actual = unfused(x, index.to(weight.device), weights)
    if not (expected.isfinite().all() and actual.isfinite().all()):
        return False
    tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2
    return torch.allclose(actual.float(), expected.float(), rtol=tolerance,
                          atol=tolerance * float(expected.abs().max().clamp(min=1e-6)))


def _draw_weights(module: nn.Module) -> None:
    """Seeded random values (scale 0.02) in place of every parameter of ``module``: something to compute with."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))


def has_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds mixture-of-experts experts, fused or already one Linear per expert matrix."""
    return any(isinstance(m, Experts) or fused_layout(m) is not None for m in model.modules())


def unfuse_experts(model: nn.Module, placeholder_weights: bool = False) -> list[str]:
    """Replace every fused experts module of ``model`` by an `Experts` of per-expert Linears (in place); the names
    replaced. The first module of each class is checked to compute the same function; a class that does not stays
    fused (its experts then stay float), with a warning. ``placeholder_weights``: the fused tensors hold no values
    yet (a model built without initialisation, about to be loaded): the check first draws random ones into the
    module it runs on, which the caller's loading overwrites."""
    checked: dict[type, bool] = {}
    replaced = []
    for name, module in list(model.named_modules()):
        layout = fused_layout(module) if not isinstance(module, Experts) else None
        if layout is None:
            continue
        kind = type(module)
        if (reason := _unsupported(module)) is not None:
            if kind not in checked:
                log.warning("%s (%s): %s; its experts stay fused and float", name, kind.__name__, reason)
            checked[kind] = False
            continue
        unfused = _unfused(module, layout)
        if any(p.is_meta for p in module.parameters()):  # a skeleton (`llmquant.model.lazy`): each expert's
            checked[kind] = True  # matrices are read from the checkpoint by name or cut from its fused tensors
        if kind not in checked:
            if placeholder_weights:
                _draw_weights(module)
            checked[kind] = _same_function(module, unfused, layout)
            if not checked[kind]:
                log.warning("%s (%s): per-expert Linears do not compute what the fused experts do (a layout other "
                            "than the one it declares, or [gate; up] rows without biases); its experts stay fused "
                            "and float", name, kind.__name__)
        if not checked[kind]:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, unfused)
        replaced.append(name)
    return replaced


# --- blocks -----------------------------------------------------------------------------------------
def _expert_list(module: nn.Module) -> bool:
    """An `Experts`, or (the older layout) a ModuleList of at least two modules of one class, each holding
    Linears."""
    if isinstance(module, Experts):
        return True
    if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(m) for m in module}) != 1:
        return False
    return sum(is_linear(m) for m in module[0].modules()) >= 2


def _hidden_of(experts: nn.Module) -> int:
    return next(m for m in experts[0].modules() if is_linear(m)).in_features


def _scores_every_expert(router: nn.Module, hidden: int, experts: int) -> bool:
    """Whether ``router`` run on random tokens returns a tensor of one score per expert."""
    weight = router.weight
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            out = router(x)
    except Exception:
        return False
    outs = out if isinstance(out, tuple) else (out,)
    return any(isinstance(t, torch.Tensor) and t.shape[-1] == experts and t.is_floating_point() for t in outs)


def _router(block: nn.Module, experts_name: str, hidden: int, count: int) -> str | None:
    """The module of ``block`` (outside its experts; a child, or a Linear inside one, as HunYuan's ``gate.wg``)
    whose weight is ``[experts, hidden]`` and whose output scores every expert."""
    for name, module in block.named_modules():
        weight = getattr(module, "weight", None)
        if (not name or name.split(".")[0] == experts_name or not isinstance(weight, torch.Tensor)
                or tuple(weight.shape) != (count, hidden)):
            continue
        if _scores_every_expert(module, hidden, count):
            return name
    return None


def find_moe_blocks(layer: nn.Module) -> list[MoEBlock]:
    """The mixture-of-experts blocks of one decoder layer (none for a dense layer)."""
    blocks = []
    for block_name, block in layer.named_modules():
        for experts_name, experts in block.named_children():
            if not _expert_list(experts):
                continue
            hidden, count = _hidden_of(experts), len(experts)
            router = _router(block, experts_name, hidden, count)
            if router is None:
                continue
            prefix = f"{block_name}." if block_name else ""
            shared, gates = [], []
            for name, child in block.named_children():
                if name in (experts_name, router.split(".")[0]):  # (the child holding the router, or the router)
                    continue
                if is_linear(child) and child.out_features == 1:
                    gates.append(prefix + name)
                elif any(is_linear(m) and m.in_features == hidden for m in child.modules()):
                    shared.append(prefix + name)
            if is_linear(block.get_submodule(router)):
                gates.insert(0, prefix + router)
            blocks.append(MoEBlock(name=block_name, router=prefix + router, experts=prefix + experts_name,
                                   num_experts=count, shared=tuple(shared), gates=tuple(gates)))
    return blocks

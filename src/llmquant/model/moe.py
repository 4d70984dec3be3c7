"""Mixture-of-experts blocks: found from the module tree and checked by running them, not from a table of classes.

- `unfuse_experts(model)`: every fused experts module (transformers 5: two 3-D parameters, ``[experts, 2 * inter,
  hidden]`` gate rows then up rows, and ``[experts, hidden, inter]``) becomes an `llmquant.nn.experts.Experts`, one
  ``gate_proj`` / ``up_proj`` / ``down_proj`` Linear per expert with the same numbers. The first of each class is
  run both ways on random tokens and routing: a layout that does not compute the same (interleaved gate/up,
  biases, transposed weights) stays fused, and float, with a warning. A skeleton on ``meta`` (a model streamed
  from disk) gets meta Linears, which the lazy loader fills with each expert's tensors from the checkpoint.
- `find_moe_blocks(layer)`: each block holding an expert list, with its router (the sibling whose weight is
  ``[experts, hidden]`` and whose output scores every expert), its shared experts (the sibling MLPs reading the
  same hidden size) and its gates (a router that is a Linear, a shared expert's one-output gate): the Linears
  left float by default, as llm-compressor and vLLM expect.
"""

from __future__ import annotations

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
def _fused_shapes(module: nn.Module) -> tuple[int, int, int] | None:
    """(experts, hidden, inter) when ``module`` holds exactly two 3-D parameters shaped as fused gate/up and
    down projections, and an activation."""
    params = [p for _, p in module.named_parameters(recurse=False)]
    if len(params) != 2 or any(p.dim() != 3 for p in params) or not callable(getattr(module, "act_fn", None)):
        return None
    (e1, two_inter, hidden), (e2, hidden2, inter) = (tuple(p.shape) for p in params)
    if e1 != e2 or hidden != hidden2 or two_inter != 2 * inter:
        return None
    return e1, hidden, inter


def _unfused(module: nn.Module, shapes: tuple[int, int, int]) -> Experts:
    """The experts as per-expert Linears whose weights are views of the fused parameters (no copy: a 128-expert
    layer is not held twice; a transform that changes a weight gives that Linear a tensor of its own)."""
    experts, hidden, inter = shapes
    gate_up, down = (p.detach() for _, p in module.named_parameters(recurse=False))
    unfused = Experts(ExpertMLP(hidden, inter, module.act_fn, dtype=down.dtype, device="meta")
                      for _ in range(experts))
    for index, expert in enumerate(unfused):
        for linear, weight in ((expert.gate_proj, gate_up[index, :inter]), (expert.up_proj, gate_up[index, inter:]),
                               (expert.down_proj, down[index])):
            linear.weight = nn.Parameter(weight, requires_grad=False)
    return unfused


def _same_function(fused: nn.Module, unfused: Experts, shapes: tuple[int, int, int]) -> bool:
    """Whether both compute the same on random tokens routed to random experts (top 2, random weights)."""
    experts, hidden, _ = shapes
    generator = torch.Generator().manual_seed(0)
    weight = unfused[0].down_proj.weight
    x = torch.randn(12, hidden, generator=generator).to(weight.device, weight.dtype)
    index = torch.stack([torch.randperm(experts, generator=generator)[:min(2, experts)] for _ in range(12)])
    weights = torch.rand(index.shape, generator=generator).to(weight.device, weight.dtype)
    with torch.no_grad():
        expected = fused(x, index.to(weight.device), weights)
        actual = unfused(x, index.to(weight.device), weights)
    tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2
    return torch.allclose(actual.float(), expected.float(), rtol=tolerance,
                          atol=tolerance * float(expected.abs().max().clamp(min=1e-6)))


def has_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds mixture-of-experts experts, fused or already one Linear per expert matrix."""
    return any(isinstance(m, Experts) or _fused_shapes(m) is not None for m in model.modules())


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by an `Experts` of per-expert Linears (in place); the names
    replaced. The first module of each class is checked to compute the same function; a class that does not stays
    fused (its experts then stay float), with a warning."""
    checked: dict[type, bool] = {}
    replaced = []
    for name, module in list(model.named_modules()):
        shapes = _fused_shapes(module) if not isinstance(module, Experts) else None
        if shapes is None:
            continue
        unfused = _unfused(module, shapes)
        kind = type(module)
        if any(p.is_meta for p in module.parameters()):  # a skeleton (`llmquant.model.lazy`): each expert's
            checked[kind] = True  # matrices are read from the checkpoint by name, no fused layout to misread
        if kind not in checked:
            checked[kind] = _same_function(module, unfused, shapes)
            if not checked[kind]:
                log.warning("%s (%s): per-expert Linears do not compute what the fused experts do (a layout other "
                            "than [gate; up] rows without biases); its experts stay fused and float", name,
                            kind.__name__)
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
    for name, child in block.named_children():
        weight = getattr(child, "weight", None)
        if name == experts_name or not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (count, hidden):
            continue
        if _scores_every_expert(child, hidden, count):
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
                if name in (experts_name, router):
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

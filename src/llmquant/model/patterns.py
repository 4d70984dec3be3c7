"""Smoothing patterns found from the model's function, not from a table of names.

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from llmquant.errors import LlmquantError


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


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, nn.LayerNorm) or ("norm" in name and hasattr(module, "weight"))


def _record(layer: nn.Module, run: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    inputs, outputs, handles = {}, {}, []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear) or _is_norm(module):

            def hook(_m: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
                inputs[name] = args[0]
                outputs[name] = out

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def _scales_through(layer: nn.Module, run: Any, producer: nn.Linear, reader: str, group: SmoothGroup,
                    before: torch.Tensor) -> bool:
    scale = torch.rand(producer.out_features, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.5
    saved_w, saved_b = producer.weight.data.clone(), None if producer.bias is None else producer.bias.data.clone()
    producer.weight.data.mul_(scale[:, None])
    if producer.bias is not None:
        producer.bias.data.mul_(scale)
    try:
        after, _ = _record(layer, run)
    finally:
        producer.weight.data.copy_(saved_w)
        if saved_b is not None:
            producer.bias.data.copy_(saved_b)
    expected = before * expand_channels(scale, group)
    return torch.allclose(after[reader], expected, rtol=1e-3, atol=1e-5 * float(before.abs().max()))


def detect_smooth_groups(layer: nn.Module, run: Any, head_dim: int | None, where: str) -> list[SmoothGroup]:
    """Smoothing groups of one decoder layer; ``run()`` runs the layer once on a sample input."""
    inputs, outputs = _record(layer, run)
    modules = dict(layer.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n in inputs]
    groups: list[SmoothGroup] = []
    for name, out in outputs.items():
        if not _is_norm(modules[name]):
            continue
        readers = tuple(n for n in linears if inputs[n] is out)
        if readers:
            groups.append(SmoothGroup(producer=name, producer_kind="norm", linears=readers))
    for a in linears:
        producer = modules[a]
        for b in linears:
            reader = modules[b]
            if a == b or reader.in_features % producer.out_features:
                continue
            repeat = reader.in_features // producer.out_features
            if repeat > 1 and not head_dim:
                continue
            group = SmoothGroup(a, "linear", (b,), repeat, head_dim if repeat > 1 else 0)
            if _scales_through(layer, run, producer, b, group, inputs[b]):
                groups.append(group)
    if not groups:
        raise LlmquantError(f"{where}: no smoothing pattern (norm -> linear or linear -> linear) was found")
    return groups

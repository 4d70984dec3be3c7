"""How a family spells its module names on disk, read from transformers' own conversion mapping (data, not code).

transformers 5 renames some checkpoints' tensors when it loads them: Mixtral's ``block_sparse_moe`` becomes
``mlp``, and per-expert ``experts.<e>.w1`` / ``w3`` / ``w2`` are merged into the fused ``gate_up_proj`` /
``down_proj`` (`transformers.conversion_mapping`). A checkpoint llmquant writes stores one tensor set per expert
under the names the family's hub checkpoints use, which are what vLLM's loader and transformers' conversion read:
`CheckpointNames.to_disk` maps a name of the model in memory (`llmquant.nn.experts.Experts`: ``experts.<e>.
gate_proj``) to it, `CheckpointNames.from_disk` back. Families without a mapping keep their names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

_LEAVES = ("gate_proj", "up_proj", "down_proj")
_PLAIN = re.compile(r"^[\w.]+$")  # a renaming transformers writes as a literal substring (no regex syntax but dots)


@dataclass(frozen=True)
class CheckpointNames:
    """``renames``: (in memory, on disk) substrings; ``leaves``: an expert's Linear in memory -> on disk."""

    renames: tuple[tuple[str, str], ...] = ()
    leaves: dict[str, str] = field(default_factory=dict)

    def to_disk(self, name: str) -> str:
        for memory, disk in self.renames:
            name = name.replace(memory, disk)
        return _swap_leaves(name, self.leaves)

    def from_disk(self, name: str) -> str:
        name = _swap_leaves(name, {disk: memory for memory, disk in self.leaves.items()})
        for memory, disk in self.renames:
            name = name.replace(disk, memory)
        return name


def _swap_leaves(name: str, leaves: dict[str, str]) -> str:
    if not leaves:
        return name
    pattern = r"(\.experts\.\d+\.)(" + "|".join(map(re.escape, leaves)) + r")(?=\.|$)"
    return re.sub(pattern, lambda m: m[1] + leaves[m[2]], name)


def _leaf(pattern: str) -> str | None:
    """``w1`` of ``.experts.*.w1.weight``."""
    found = re.search(r"experts\.\*\.(\w+)\.weight$", pattern)
    return found[1] if found else None


def _conversion_mapping(model: nn.Module) -> list:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return (get_checkpoint_conversion_mapping(model_type) or []) if model_type else []
    except (KeyError, ValueError):
        return []


def experts_stored_fused(model: nn.Module) -> bool:
    """Whether ``model``'s family (one with experts) keeps them fused on disk: transformers converts no per-expert
    tensors into its fused ``gate_up_proj`` (gpt-oss: ``gate_up_proj`` [experts, hidden, 2 * inter] in its
    checkpoints), so its serving engines read them only so, not the per-expert tensors llmquant writes."""
    return not any(len(entry.target_patterns) == 1 and entry.target_patterns[0].endswith("gate_up_proj")
                   and type(entry).__name__ != "WeightRenaming" for entry in _conversion_mapping(model))


def checkpoint_names(model: nn.Module) -> CheckpointNames:
    """The `CheckpointNames` of ``model``'s family (its ``config.model_type``)."""
    renames, leaves = [], {}
    for entry in _conversion_mapping(model):
        sources, targets = list(entry.source_patterns), list(entry.target_patterns)
        if type(entry).__name__ == "WeightRenaming":
            if len(sources) == len(targets) == 1 and _PLAIN.match(sources[0]) and _PLAIN.match(targets[0]):
                renames.append((targets[0], sources[0]))
        elif len(targets) == 1 and targets[0].endswith("gate_up_proj") and len(sources) == 2:
            leaves.update({k: v for k, v in zip(("gate_proj", "up_proj"), map(_leaf, sources), strict=True) if v})
        elif len(targets) == 1 and targets[0].endswith("down_proj") and len(sources) == 1 and _leaf(sources[0]):
            leaves["down_proj"] = _leaf(sources[0])  # type: ignore[assignment]
    return CheckpointNames(tuple(renames), {k: v for k, v in leaves.items() if k in _LEAVES and k != v})

"""Matching modules against targets, with compressed-tensors' conventions.

A target is a module class name (``"Linear"``), an exact module name (``"lm_head"``,
``"model.layers.0.mlp.down_proj"``), a glob (``"*.down_proj"``) or a regular expression after ``re:``
(``"re:.*layers\\.[0-3]\\..*"``, matched from the start of the name as compressed-tensors does).
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn


def matches(name: str, module: nn.Module, target: str) -> bool:
    """Whether the module called ``name`` is selected by ``target``."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if any(ch in target for ch in "*?["):
        return fnmatch.fnmatchcase(name, target)
    return target == name or target == type(module).__name__


def matches_any(name: str, module: nn.Module, targets: list[str] | tuple[str, ...]) -> bool:
    return any(matches(name, module, t) for t in targets)


def is_linear(module: nn.Module) -> bool:
    """A Linear, or a module that replaced one (a QuantLinear keeps in_features and out_features)."""
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features"))


def has_own_forward(module: nn.Module) -> bool:
    """A Linear subclass with a forward of its own (Llama 4's router returns its scores and its logits): a
    QuantLinear, which computes x W^T + b, cannot stand in for it."""
    return isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward


def is_quantizable_linear(module: nn.Module) -> bool:
    """A Linear a QuantLinear can replace (`is_linear`, without a forward of its own)."""
    return is_linear(module) and not has_own_forward(module)

"""Matching modules against targets, with compressed-tensors' conventions.

A target is a module class name (``"Linear"``), an exact module name (``"lm_head"``,
``"model.layers.0.mlp.down_proj"``), a glob (``"*.down_proj"``) or a regular expression after ``re:``
(``"re:.*layers\\.[0-3]\\..*"``, matched from the start of the name as compressed-tensors does).
"""

from __future__ import annotations

import fnmatch
import re
import weakref

import torch
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
    """A Linear subclass whose forward computes something else than x W^T + b (Llama 4's router returns its scores
    and its logits), found by running it once on random rows: a QuantLinear cannot stand in for it. Subclasses
    computing the product their own way (Falcon's ``input @ weight.T + bias``) are Linears. Found once per module."""
    if not isinstance(module, nn.Linear) or type(module).forward is nn.Linear.forward:
        return False
    found = _OWN_FORWARD.get(module)
    if found is None:
        weight = module.weight
        x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0)).to(weight.device,
                                                                                               weight.dtype)
        try:
            with torch.no_grad():
                out = module(x)
        except Exception:  # a forward that takes more than the rows (any error here: not a plain product)
            out = None
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, weight, module.bias)
        found = not (isinstance(out, torch.Tensor) and out.shape == expected.shape and (
            weight.is_meta  # (a skeleton streamed from disk: only what it returns can be seen)
            or torch.allclose(out.float(), expected.float(), rtol=1e-3, atol=1e-5)))
        _OWN_FORWARD[module] = found
    return found


_OWN_FORWARD: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def is_quantizable_linear(module: nn.Module) -> bool:
    """A Linear a QuantLinear can replace (`is_linear`, without a forward of its own)."""
    return is_linear(module) and not has_own_forward(module)

"""Models dispatched by accelerate with offloaded weights (``disk_offload``, ``cpu_offload``, or
``from_pretrained(device_map=..., offload_folder=...)``).

Such a model's modules hold ``meta`` tensors and an accelerate ``AlignDevicesHook`` that reads the weights
from its ``weights_map`` (a folder of memory-mapped files, or CPU tensors) for each forward and drops them
after. The engine takes such a model one decoder layer at a time: `load_offloaded` puts a module's weights
in memory for good (copies, so that in-place transforms never write to the offload files) and removes its
hooks; the layers not reached yet stay offloaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _offloading_hooks(module: nn.Module) -> list[Any]:
    """The hooks of ``module`` that keep its weights offloaded (inside a SequentialHook too)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", [hook])) if hook is not None else []
    return [h for h in hooks if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]


def is_offloaded(model: nn.Module) -> bool:
    """Whether accelerate keeps some of the model's weights offloaded."""
    return any(_offloading_hooks(module) for module in model.modules())


def load_offloaded(module: nn.Module, skip: nn.Module | None = None) -> int:
    """Load into memory the weights accelerate keeps offloaded for ``module`` and its submodules (except
    ``skip`` and its submodules), and remove their hooks; the number of tensors loaded."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import named_module_tensors, set_module_tensor_to_device

    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    loaded = 0
    for sub in module.modules():
        if id(sub) in skipped or not hasattr(sub, "_hf_hook"):
            continue
        for hook in _offloading_hooks(sub):
            tensors = named_module_tensors(sub, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                                           remove_non_persistent=True)
            for name, _ in list(tensors):
                set_module_tensor_to_device(sub, name, "cpu", value=hook.weights_map[name].clone())
                loaded += 1
        remove_hook_from_module(sub)
    return loaded


__all__ = ["is_offloaded", "load_offloaded"]

"""Where a run computes, and in which dtype: one policy, decided at the entry points and carried down.

The command line (``--device``, ``--dtype``, ``--offload``, ``--max-gpu-memory``) and the Python API
(``device=``, ``dtype=`` ...) resolve their words once into a `DevicePolicy`; below them nothing decides a
device or a dtype again:

- ``device``: ``auto`` (``$LLMQUANT_DEVICE`` when set, else the current CUDA GPU when there is one, else the
  CPU), ``cpu``, ``cuda`` or ``cuda:N``; under torchrun ``auto`` and ``cuda`` mean the process's own GPU
  (``LOCAL_RANK``);
- ``dtype``: ``auto`` (the checkpoint's own: bfloat16 for most models, float32 for the default model, which
  is dequantized from GGUF), ``float32``, ``bfloat16`` or ``float16``;
- ``offload``: ``layers`` (the default): the model rests in CPU memory (or on disk under ``--max-memory``) and
  each decoder layer comes onto the device for its passes, then goes back; ``none``: the whole model stays on
  the device (when it fits);
- ``max_gpu_memory``: bytes the calibration activations may take on the device (default: what the device has
  free when the run starts, less `MARGIN`); above it they wait in pinned CPU memory, one batch moved at a time.
  It caps a layer's working tensors too: GPTQ's Hessians and sweeps take what is left under it (`working_memory`);
- ``max_memory`` (``--max-memory``): bytes of CPU memory the run aims to stay under. The model is then read from
  disk a layer at a time (`llmquant.pipeline.memory`), and on the CPU a layer's working tensors take what is
  left under it: the experts of a mixture-of-experts layer are swept a few at a time (`working_memory`).

Statistics, Hessians and the float64 folds keep their own precision whatever the model's dtype; weights go
back in the model's dtype.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from llmquant.errors import LlmquantError
from llmquant.parallel import launched_by_torchrun, local_rank

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLOADS = ("layers", "none")
MARGIN = 0.10  # share of the device's free memory left to the layer, its Hessians and the allocator
Offload = Literal["layers", "none"]


def resolve_device(text: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None, ``cpu``, ``cuda``, ``cuda:N`` (or a `torch.device`) as a device that exists here; ``auto`` is
    ``$LLMQUANT_DEVICE`` when that is set."""
    if isinstance(text, torch.device):
        text = str(text)
    if text is None or text == "auto":
        text = os.environ.get("LLMQUANT_DEVICE") or "auto"
    if text == "auto":
        return torch.device("cuda", _default_gpu()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise LlmquantError(f"unknown device '{text}'; allowed: {', '.join(DEVICES)}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise LlmquantError(f"device '{text}' is not supported; allowed: {', '.join(DEVICES)}")
    if not torch.cuda.is_available():
        raise LlmquantError(f"--device {text}: no CUDA GPU is available on this machine; use --device cpu or auto")
    index = device.index if device.index is not None else _default_gpu()
    if index >= torch.cuda.device_count():
        raise LlmquantError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered 0 to {torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def _default_gpu() -> int:
    """The GPU ``auto`` or a bare ``cuda`` means: under torchrun the process's own (``LOCAL_RANK``: one GPU per
    process), else the current one."""
    return local_rank() if launched_by_torchrun() else torch.cuda.current_device()


def resolve_dtype(text: str | torch.dtype | None = "auto") -> torch.dtype | None:
    """``auto``/None (None: the checkpoint's own), or one of `DTYPES` (or a floating `torch.dtype`)."""
    if text is None or text == "auto":
        return None
    if isinstance(text, torch.dtype):
        if text not in DTYPES.values():
            raise LlmquantError(f"dtype {text} is not supported; allowed: auto, {', '.join(DTYPES)}")
        return text
    found = DTYPES.get(str(text).removeprefix("torch."))
    if found is None:
        raise LlmquantError(f"unknown dtype '{text}'; allowed: auto, {', '.join(DTYPES)}")
    return found


@dataclass(frozen=True)
class DevicePolicy:
    """Where layers compute, the model's dtype (None: as loaded), where the model rests between layers, and
    the device memory the calibration activations may take (see the module docstring)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None
    offload: Offload = "layers"
    max_gpu_memory: int | None = None
    max_memory: int | None = None

    @classmethod
    def resolve(cls, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
                offload: str = "layers", max_gpu_memory: int | None = None,
                max_memory: int | None = None) -> DevicePolicy:
        if offload not in OFFLOADS:
            raise LlmquantError(f"unknown offload '{offload}'; allowed: {', '.join(OFFLOADS)}")
        for name, size in (("max_gpu_memory", max_gpu_memory), ("max_memory", max_memory)):
            if size is not None and size < 0:
                raise LlmquantError(f"{name} must be a size in bytes >= 0, got {size}")
        return cls(resolve_device(device), resolve_dtype(dtype), offload,  # type: ignore[arg-type]
                   max_gpu_memory, max_memory)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def activation_budget(self) -> int | None:
        """Bytes the calibration activations may take on the device (None on the CPU: no limit of its own)."""
        if not self.is_cuda:
            return None
        if self.max_gpu_memory is not None:
            return self.max_gpu_memory
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * (1 - MARGIN))

    def working_memory(self) -> int | None:
        """Bytes a layer's working tensors (GPTQ's Hessians and sweeps) may still take now, where the layer computes:
        on a GPU, its free memory less `MARGIN`, and under ``max_gpu_memory`` less what torch holds there; on the
        CPU, the system's available memory less `MARGIN`, and under ``max_memory`` less the process's resident
        memory. None where neither can be read."""
        if self.is_cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            found: int | None = int(free * (1 - MARGIN))
            if self.max_gpu_memory is not None:
                found = min(found, self.max_gpu_memory - torch.cuda.memory_allocated(self.device))
        else:
            available = available_memory_bytes()
            found = None if available is None else int(available * (1 - MARGIN))
            if self.max_memory is not None:
                left = self.max_memory - resident_bytes()
                found = left if found is None else min(found, left)
        return None if found is None else max(found, 0)

    def describe(self) -> dict[str, Any]:
        """The policy as the manifest records it."""
        described: dict[str, Any] = {"device": str(self.device), "offload": self.offload,
                                     "dtype": None if self.dtype is None else dtype_name(self.dtype)}
        if self.is_cuda:
            described["gpu"] = torch.cuda.get_device_name(self.device)
            if self.max_gpu_memory is not None:
                described["max_gpu_memory_mb"] = self.max_gpu_memory / 2**20
        if self.max_memory is not None:
            described["max_memory_mb"] = self.max_memory / 2**20
        return described


@functools.cache
def triton_installed() -> bool:
    """Whether Triton can be imported (the GPTQ sweep's and the FP8 input codes' kernels need it)."""
    return importlib.util.find_spec("triton") is not None


def resident_bytes() -> int:
    """The process's resident memory now (Linux /proc; 0 where it does not exist)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory_bytes() -> int | None:
    """The memory the system can give without swapping (Linux's MemAvailable; None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module that holds none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``function`` applied to every tensor in it (nested in tuples, lists and mappings)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, function) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, function) for v in value]
    if isinstance(value, Mapping):
        return {k: map_tensors(v, function) for k, v in value.items()}
    return value


def to_device(value: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``value`` with every tensor in it (nested in tuples, lists and dicts) moved to ``device``."""
    return map_tensors(value, lambda t: t.to(device, non_blocking=non_blocking))


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating parameters and persistent buffers of ``model`` to ``dtype`` in place. Unlike
    ``model.to(dtype)`` this leaves non-persistent buffers alone (rotary ``inv_freq``, kept in float32 as a model
    loaded in ``dtype`` keeps it), so a cast model computes what the same model loaded in ``dtype`` computes."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, buffer.to(dtype))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """The device's peak allocated memory since the last `reset_peak_memory`, in MiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


__all__ = [
    "DTYPES",
    "DevicePolicy",
    "available_memory_bytes",
    "cast_weights",
    "device_of",
    "dtype_name",
    "map_tensors",
    "peak_memory_mb",
    "reset_peak_memory",
    "resident_bytes",
    "resolve_device",
    "resolve_dtype",
    "to_device",
]

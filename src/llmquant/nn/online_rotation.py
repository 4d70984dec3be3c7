"""Online rotations (QuaRot's R3 and R4) and the RMSNorm that replaces a LayerNorm under R1.

- `OnlineRotation`: a module applying x -> x Q (a `Rotation`) in the forward (Hadamard rotations as products with
  their Kronecker factors, in float32, or in float64 with random signs; a learned one as one dense product), with
  no state-dict entries: a Hadamard is rebuilt from its description, a learned matrix from the checkpoint's
  transform tensors.
- `attach_input_rotation(linear, rotation)`: the Linear computes W (x Q) instead of W x. The rotation is
  a child module ``input_rotation`` run by a forward pre-hook registered first (``prepend``), so every
  other hook on the Linear (observers, GPTQ's Hessian, smoothing statistics) sees the input the weight
  really multiplies; the module keeps its name and its state dict, as checkpoints need. Linears that read one
  tensor with the same rotation (q/k/v, gate/up) share one product (`rotated_once`).
- R3 is applied to queries and keys inside the attention function of `llmquant.nn.kv_cache`, from the
  attention module's ``qk_rotation`` child.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from llmquant.nn.last_result import LastResult
from llmquant.quant.hadamard import hadamard_kronecker_factors, kronecker_transform, normalized_kronecker_factors
from llmquant.quant.rotation import Rotation


@lru_cache(maxsize=32)
def _signed_factors(rotation: Rotation, device: torch.device) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A randomized Hadamard's signs (`Rotation.signs`) and its +-1 Kronecker factors in float64 on ``device`` (built
    once per rotation and device)."""
    return rotation.signs().to(device), tuple(f.to(device) for f in hadamard_kronecker_factors(rotation.n))


class OnlineRotation(nn.Module):
    """x -> x Q along the last dimension, returned in x's dtype. A plain Hadamard runs in float32 as one matrix
    product per Kronecker factor (`kronecker_transform`), measured faster here than the butterfly transform at the
    sizes online rotations have (e.g. n = 1536 = 12 x 128: 128 us against 226 us for 8 rows, 48 ms against 55 ms
    for 4096 rows; n = 64: 11 us against 248 us for one decode step); a randomized one (QuaRot's) in float64 as
    `Rotation.apply` computes it, its signs and +-1 Kronecker factors as products (the same float32 values as
    `Rotation.apply`'s butterfly, tested; 2.9-5.0x faster at one row, 1.0-2.8x at 512, `scripts/runtime_profile.py
    rotation`); a learned one as one dense float32 product."""

    def __init__(self, rotation: Rotation) -> None:
        super().__init__()
        self.rotation = rotation
        if rotation.dense is not None:  # a learned matrix: one float32 product (not a state-dict entry)
            self.register_buffer("matrix", rotation.dense.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rotation
        if r.kind == "hadamard" and not r.randomize:
            return kronecker_transform(x, normalized_kronecker_factors(r.n, x.device)).to(x.dtype)
        if r.kind == "hadamard" and not x.requires_grad:
            # `Rotation.apply`'s float64 maths (x d) H^T / sqrt(n) with the +-1 factors as products, not the butterfly
            # (a decode step's 180 rotations were ~30 small operations each): sums of +-x exact in float64 while a row's
            # values span under 2^23, one multiplication by 1 / sqrt(n) after, the same float32 values
            signs, factors = _signed_factors(r, x.device)
            y = kronecker_transform(x.double() * signs, factors).mul_(1.0 / math.sqrt(r.n))
            return y.to(x.dtype)
        if r.dense is not None:
            return (x.float() @ self.matrix).to(x.dtype)
        return r.apply(x.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return self.rotation.describe()


_last_rotation = LastResult()  # the last input rotated on this thread, and its rotation


def rotated_once(online: OnlineRotation, x: torch.Tensor) -> torch.Tensor:
    """x Q, kept for the next Linear that rotates the same tensor, unchanged, by the same rotation: q, k and v (gate
    and up) rotate their shared input once, and so quantize it once (`llmquant.nn.int8_linear.shared_input_codes`
    keys its codes by the tensor). Unchanged: the same object at the same version, its result unchanged too; a
    tensor made under ``torch.inference_mode`` has no version and is not kept, nor is anything while gradients are
    recorded (learned rotations train through this), nor the result of a rotation module with hooks of its own
    (smoothing's statistics, the layer map's recorder: they must see every call)."""
    if torch.is_grad_enabled() or x.is_inference() or _hooked(online):
        return online(x)
    rotation = online.rotation
    if (y := _last_rotation.get(x, lambda key, kept: _same_rotation(key, rotation, kept))) is not None:
        return y
    y = online(x)
    _last_rotation.put(x, (rotation, y._version), y)
    return y


def _same_rotation(key: tuple[Rotation, int], rotation: Rotation, kept: torch.Tensor) -> bool:
    """The kept rotation is ``rotation`` (a learned one: the same matrix) and its result is unchanged since."""
    kept_rotation, version = key
    return kept_rotation == rotation and kept_rotation.dense is rotation.dense and kept._version == version


def _hooked(module: nn.Module) -> bool:
    """Whether a forward of ``module`` runs hooks (its own, or every module's)."""
    return bool(module._forward_pre_hooks or module._forward_hooks or nn.modules.module._global_forward_pre_hooks
                or nn.modules.module._global_forward_hooks)


def _rotate_input(module: nn.Module, args: tuple) -> tuple:
    return (rotated_once(module.input_rotation, args[0]), *args[1:])


def attach_input_rotation(linear: nn.Module, rotation: Rotation) -> None:
    """Make ``linear`` multiply its weight with x Q instead of x (see the module docstring)."""
    if getattr(linear, "input_rotation", None) is not None:
        raise ValueError(f"{type(linear).__name__} already rotates its input")
    linear.input_rotation = OnlineRotation(rotation)
    linear.register_forward_pre_hook(_rotate_input, prepend=True)


def input_rotation_of(module: nn.Module) -> Rotation | None:
    online = getattr(module, "input_rotation", None)
    return online.rotation if isinstance(online, OnlineRotation) else None


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps): what a LayerNorm computes on a zero-mean residual stream."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x.float() * torch.rsqrt(variance + self.eps))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


__all__ = ["OnlineRotation", "RMSNorm", "attach_input_rotation", "input_rotation_of", "rotated_once"]

"""`Rotation`: an orthogonal n x n matrix Q applied along the last dimension, x -> x Q, as a value.

QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs") inserts such a Q
before quantization and its inverse Q^T after it, so the float function is unchanged:
y = x W^T = (x Q) (W Q)^T for any orthogonal Q.

Kinds (one notion for every size):

- ``hadamard``: Q = diag(d) H_n^T / sqrt(n), H_n from `llmquant.quant.hadamard`, d = +-1 signs (all +1
  unless randomized, which is QuaRot's "randomized Hadamard"); applied by the fast transform, O(n log n);
- ``block_diagonal``: I_{n/b} (x) H_b / sqrt(b) with b the largest constructible divisor of n (a fallback:
  it only mixes channels within blocks of b);
- ``random``: a seeded Haar-random orthogonal matrix (a fallback: a dense n x n product);
- ``learned``: a dense orthogonal matrix given as a value (`learned_rotation`: SpinQuant's rotations, learned from a
  Hadamard start by `llmquant.algorithms.spinquant`), a dense n x n product.

Maths in float64 (`apply` computes in float64 and casts back), as QuaRot's reference does; `apply_float32` is the
float32 shortcut for scoring candidates (the smoothing searches), never for folding into weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import torch

from llmquant.errors import LlmquantError
from llmquant.quant.hadamard import (
    fast_hadamard_transform,
    hadamard_plan,
    is_constructible,
    kronecker_transform,
    largest_constructible_divisor,
    normalized_kronecker_factors,
    orthogonal_fallback,
)

RotationKind = Literal["hadamard", "block_diagonal", "random", "learned"]
ORTHOGONALITY_TOLERANCE = 1e-6  # max |Q^T Q - I| a learned rotation may have
LEARNED_STORAGE_DTYPE = torch.float32  # a learned matrix's dtype in a checkpoint (in any model dtype: see `storable`)
Fallback = Literal["random", "block_diagonal", "skip"]


@dataclass(frozen=True)
class Rotation:
    """An orthogonal Q of size ``n``; ``randomize`` draws the Hadamard's signs from ``seed``. A ``learned`` one
    carries its float64 matrix in ``dense`` and says where it came from in ``label`` (compared, the matrix not)."""

    n: int
    kind: RotationKind = "hadamard"
    randomize: bool = False
    seed: int = 0
    label: str = ""
    dense: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind == "hadamard" and not is_constructible(self.n):
            hadamard_plan(self.n)  # raises the one-line error naming the size and the fallbacks
        if (self.kind == "learned") != (self.dense is not None):
            raise LlmquantError("a rotation carries a matrix exactly when its kind is 'learned'")

    # --- description -----------------------------------------------------------------------------
    def describe(self) -> str:
        if self.kind == "hadamard":
            signs = ", random signs" if self.randomize else ""
            return f"hadamard({self.n} = {hadamard_plan(self.n).describe()}{signs})"
        if self.kind == "block_diagonal":
            b = largest_constructible_divisor(self.n)
            return f"block_diagonal({self.n // b} x hadamard({b}))"
        if self.kind == "learned":
            return f"learned({self.n}{', ' + self.label if self.label else ''})"
        return f"random_orthogonal({self.n}, seed={self.seed})"

    def online_flops(self) -> int:
        """Multiply-adds to apply Q to one vector online."""
        if self.kind == "hadamard":
            return hadamard_plan(self.n).online_flops_per_vector
        if self.kind == "block_diagonal":
            return self.n * largest_constructible_divisor(self.n)
        return self.n * self.n

    # --- the matrix ---------------------------------------------------------------------------------
    def signs(self) -> torch.Tensor:
        if not self.randomize:
            return torch.ones(self.n, dtype=torch.float64)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, 2, (self.n,), generator=generator).double() * 2 - 1

    def matrix(self) -> torch.Tensor:
        """Q as a dense float64 matrix (for tests and the fallbacks)."""
        return self.apply(torch.eye(self.n, dtype=torch.float64))

    def apply(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x Q (or x Q^T with ``inverse``) along the last dimension, computed in float64, in x's dtype."""
        if x.shape[-1] != self.n:
            raise LlmquantError(f"rotation of size {self.n} applied to a last dimension of {x.shape[-1]}")
        y = x.double()
        if self.kind == "hadamard":
            signs = self.signs().to(y.device)
            if inverse:  # Q^T = H diag(d) / sqrt(n)
                return (fast_hadamard_transform(y, transpose=True) * signs).to(x.dtype)
            return fast_hadamard_transform(y * signs).to(x.dtype)
        q = self.dense if self.dense is not None else _dense(self.n, self.kind, self.seed)
        q = q.to(y.device)
        return (y @ (q.T if inverse else q)).to(x.dtype)

    def apply_float32(self, x: torch.Tensor) -> torch.Tensor:
        """x Q in float32, to score candidates (never to fold): a Hadamard as one float32 product per Kronecker factor
        (`kronecker_transform`), within float32 rounding of `apply` (2e-7 to 1.5e-6 of the largest value at n = 576 and
        1536, tested) and 2-8x faster on a CPU (one thread: 0.95 against 7.3 ms for 1024 x 576, 2.9 against 6.2 ms
        for 576 x 1536; BENCHMARKS.md); the other kinds as `apply` computes them."""
        if self.kind != "hadamard":
            return self.apply(x.float())
        x = x.float()
        if self.randomize:
            x = x * self.signs().to(device=x.device, dtype=torch.float32)
        return kronecker_transform(x, normalized_kronecker_factors(self.n, x.device))


@lru_cache(maxsize=16)
def _dense(n: int, kind: str, seed: int) -> torch.Tensor:
    return orthogonal_fallback(n, kind, seed=seed)  # type: ignore[arg-type]


def storable(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` (float64) as a checkpoint gives it back: stored as sqrt(n) Q in `LEARNED_STORAGE_DTYPE` (the
    transform tensors vLLM reads, `llmquant.export.transforms`), read back divided by sqrt(n). An online learned
    rotation is made from this value, so the model in memory and the one loaded from its checkpoint compute the same."""
    root = math.sqrt(matrix.shape[0])
    return (matrix.double() * root).to(LEARNED_STORAGE_DTYPE).double() / root


def learned_rotation(matrix: torch.Tensor, label: str) -> Rotation:
    """A `Rotation` of kind ``learned`` for the orthogonal ``matrix`` (x -> x Q), checked to
    `ORTHOGONALITY_TOLERANCE`."""
    q = matrix.detach().double().cpu().contiguous().clone()
    n = q.shape[0]
    if q.shape != (n, n):
        raise LlmquantError(f"a learned rotation must be a square matrix, got shape {tuple(q.shape)}")
    error = (q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max().item()
    if error > ORTHOGONALITY_TOLERANCE:
        raise LlmquantError(f"learned rotation {label or n} is not orthogonal: max |Q^T Q - I| = {error:.2e} "
                            f"(allowed {ORTHOGONALITY_TOLERANCE})")
    return Rotation(n, "learned", label=label, dense=q)


def rotate_blocks(weight: torch.Tensor, n: int, side: str,
                  apply: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``apply`` (x -> x Q on rows of ``n`` values) on each block of ``n`` input columns of ``weight`` [out, in]
    (``side="input"``: W <- W Q) or of ``n`` output rows (``"output"``: W <- Q^T W); a vector (a bias [out]) is
    rotated in blocks of ``n`` on either side. The result has ``weight``'s shape (a transposed view for the output
    side)."""
    if weight.dim() == 1:
        return apply(weight.reshape(-1, n)).reshape(weight.shape)
    if side == "output":
        return rotate_blocks(weight.T, n, "input", apply).T
    return apply(weight.reshape(weight.shape[0], -1, n)).reshape(weight.shape)


def rotation_for(n: int, randomize: bool, seed: int, fallback: Fallback) -> Rotation | None:
    """A Hadamard rotation of size n when one can be built, else the fallback (None for ``skip``)."""
    if is_constructible(n):
        return Rotation(n, "hadamard", randomize, seed)
    if fallback == "skip":
        return None
    return Rotation(n, fallback, seed=seed)


__all__ = ["LEARNED_STORAGE_DTYPE", "Fallback", "Rotation", "RotationKind", "learned_rotation", "rotate_blocks",
           "rotation_for", "storable"]

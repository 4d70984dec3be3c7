"""GPTAQ (Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration", ICML 2025,
first released as "GPTQv2"): GPTQ aimed at the float model's output instead of the float layer's output on the
quantized model's inputs.

GPTQ minimises ||W X - Q X||^2, X the inputs the already quantized layers give; the float model computes W X~ on
its own inputs X~ (the reference stream). GPTAQ minimises ||W X~ - Q X||^2, which also corrects the error the
layers before left:

    H = 2/N X X^T,   D = 2/N (X~ - X) X^T          (`AsymmetricAccumulator`, N tokens, float64 running means)
    ||W X~ - Q X||^2 = ||(W* - Q) X||^2 + const,   W* = W + W D H^-1

so GPTQ on H, started from W* instead of W, minimises the asymmetric objective column by column. ``alpha`` in
[0, 1] takes a share of the correction, W* = W + alpha W D H^-1 (the paper's alpha, 0.25 in its code: the whole
correction fits the accumulated error of the few calibration samples too closely); H^-1 is read from GPTQ's own
factor of the dampened H.

Deliberate deviation: the paper folds the correction into the sweep, column by column (P = alpha triu(D U^T, 1) U,
U = chol(H^-1) upper): each column's own asymmetry is compensated by the columns after it. Here the whole
correction is applied before the sweep, which starts GPTQ at the minimiser of the asymmetric objective (with no
rounding the sweep returns W* itself; tests/test_gptaq.py checks it against least squares); the sweep is GPTQ's,
unchanged (reference loop, Triton kernel, rows split over ranks).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

from llmquant.algorithms.hessian import HessianAccumulator
from llmquant.errors import LlmquantError
from llmquant.parallel import Ranks


class AsymmetricAccumulator(HessianAccumulator):
    """GPTQ's Hessian H of the inputs X `add_batch` sees, and D = 2/N (X~ - X) X^T with X~ the float model's inputs
    of the same Linear (``targets``: one tensor a batch, in the order `add_batch` receives the batches)."""

    def __init__(self, in_features: int, targets: Sequence[torch.Tensor], device: torch.device | str | None = None,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(in_features, device, prepare)
        self.targets = deque(targets)
        self._cross = torch.zeros_like(self._hessian)

    @torch.no_grad()
    def _add(self, x: torch.Tensor) -> None:
        if not self.targets:
            raise LlmquantError("GPTAQ: more batches of quantized inputs than of float inputs; the two passes "
                                "must batch the calibration samples alike")
        target = self.targets.popleft()
        if target.shape != x.shape:
            raise LlmquantError(f"GPTAQ: float inputs of shape {tuple(target.shape)} against quantized inputs of "
                                f"shape {tuple(x.shape)}; the two passes must batch the samples alike")
        rows = self._rows(x)  # (once, for both terms)
        before = self.tokens
        self._accumulate(rows, x.dtype)
        if self.tokens == before:
            return
        shift = target.detach().reshape(-1, self.in_features).to(rows.device, rows.dtype) - rows
        self._cross *= before / self.tokens
        self._cross += (shift.T @ rows).double().mul_(2.0 / self.tokens)

    def reduce(self, ranks: Ranks) -> None:
        if ranks.world == 1:
            return
        mine = float(self.tokens)
        cross = ranks.sum(self._cross * mine)
        super().reduce(ranks)
        self._cross = cross / max(float(self.tokens), 1.0)

    @property
    def cross(self) -> torch.Tensor:
        """D = 2/N (X~ - X) X^T, [in, in], float64."""
        return self._cross


@torch.no_grad()
def asymmetric_correction(cross: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor, hinv: torch.Tensor
                          ) -> torch.Tensor:
    """M = D H^-1, [in, in] float64, from GPTQ's own factor of H (`llmquant.algorithms.gptq.inverse_factor`: the
    column order ``perm``, the ``dead`` inputs and ``hinv`` = U, U^T U = (P^T H P)^-1 with H dampened as the sweep
    dampens it): M P = (D P) U^T U, so H is factored once for the sweep and the correction alike. W* = W + alpha W M
    for every weight reading the input H is of (module docstring); dead inputs (H_ii = 0, all-zero in X) get no
    correction (GPTQ zeroes their weights)."""
    hinv = hinv.to(torch.float64)
    permuted = cross.to(hinv.device, torch.float64).index_select(1, perm.to(hinv.device))
    correction = (permuted @ hinv.T @ hinv).index_select(1, torch.argsort(perm).to(hinv.device))
    correction[:, dead.to(hinv.device)] = 0.0
    return correction


@torch.no_grad()
def asymmetric_start(weight: torch.Tensor, correction: torch.Tensor, alpha: float) -> torch.Tensor:
    """W* = W + alpha W M for ``weight`` W [out, in] and M = `asymmetric_correction`: the weight from which GPTQ's
    sweep minimises ||W X~ - Q X||^2 (alpha = 1). In float32 at least (GPTQ sweeps in float32)."""
    w = weight.detach().to(correction.device, torch.float64)
    shifted = w + alpha * (w @ correction)
    return shifted.to(torch.promote_types(weight.dtype, torch.float32))


__all__ = ["AsymmetricAccumulator", "asymmetric_correction", "asymmetric_start"]

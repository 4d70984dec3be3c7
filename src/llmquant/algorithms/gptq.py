"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a Linear's weight column by column, each rounding error compensated on the
columns not yet quantized through the inverse Hessian of the layer's reconstruction loss.

    H = 2 X X^T / N  (X: the Linear's calibration inputs, N tokens),  H += damp * mean(diag H) * I
    U = chol(H^-1)^T (upper);  for column j:  q_j = Q(w_j),  e = (w_j - q_j) / U_jj,
    w_{j+1:} -= e U_{j, j+1:}   (lazily, per block of `block_size` columns)

Quantization parameters: per tensor or channel, from the whole weight before any update; per group,
from each group's current (already updated) weights when the sweep reaches its first column, or, with
activation order, from the original weights up front ("static groups"), so that the groups stay the
contiguous input slices a checkpoint stores. Maths in float32 (the Hessian in float64).
"""

from __future__ import annotations

import torch

from llmquant.errors import LlmquantError
from llmquant.quant import QuantSpec, qparams_for
from llmquant.quant.primitives import quantize_blocks


class GPTQ:
    """The GPTQ state of one Linear: `add_batch` its inputs, then `quantize` its weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()
        self.columns = weight.shape[1]
        self.hessian = torch.zeros(self.columns, self.columns, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate H = 2 X X^T / N over the tokens of ``x`` ``[..., in_features]`` (running mean)."""
        rows = x.detach().reshape(-1, self.columns).double()
        total = self.tokens + rows.shape[0]
        self.hessian *= self.tokens / total
        rows = rows * (2.0 / total) ** 0.5
        self.hessian += rows.T @ rows
        self.tokens = total

    def quantize(
        self, spec: QuantSpec, block_size: int = 128, damp_ratio: float = 0.01, act_order: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The quantized weight (dequantized values, on the grid) and its block-view qparams."""
        if self.tokens == 0:
            raise LlmquantError("GPTQ saw no calibration inputs for this Linear")
        weight = self.weight.float().clone()
        hessian = self.hessian.clone()
        dead = torch.diag(hessian) == 0
        hessian[dead, dead] = 1.0
        weight[:, dead] = 0.0
        group = spec.group_size if spec.granularity == "group" else None
        if group is not None and self.columns % group:
            raise LlmquantError(f"group_size {group} does not divide in_features {self.columns}")
        static = _group_qparams(weight, spec) if group is not None and act_order else None
        whole = qparams_for(weight, spec) if group is None else None
        order = torch.argsort(torch.diag(hessian), descending=True) if act_order else torch.arange(self.columns)
        weight, hessian = weight[:, order], hessian[order][:, order]
        upper = _inverse_cholesky(hessian, damp_ratio)
        quantized = torch.zeros_like(weight)
        scales = torch.zeros(weight.shape[0], self.columns // group if group else 1)
        zeros = torch.zeros_like(scales)
        for start in range(0, self.columns, block_size):
            end = min(start + block_size, self.columns)
            block, errors = weight[:, start:end].clone(), torch.zeros(weight.shape[0], end - start)
            inverse = upper[start:end, start:end]
            for i in range(end - start):
                column = start + i
                if group is not None:
                    g = int(order[column]) // group
                    if static is not None:
                        scales[:, g], zeros[:, g] = static[0][:, g], static[1][:, g]
                    elif column % group == 0:
                        current = torch.cat([block[:, i:], weight[:, end:]], dim=1)[:, :group]
                        scale, zero = qparams_for(current, spec.model_copy(update={"granularity": "channel",
                                                                                 "group_size": None}))
                        scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
                    scale, zero = scales[:, g : g + 1], zeros[:, g : g + 1]
                else:
                    scale, zero = _row_qparams(whole, weight.shape[0])
                w = block[:, i : i + 1]
                q = (quantize_blocks(w, scale, zero, spec) - zero) * scale
                quantized[:, column] = q[:, 0]
                error = (w - q) / inverse[i, i]
                block[:, i:] -= error @ inverse[i : i + 1, i:]
                errors[:, i] = error[:, 0]
            weight[:, end:] -= errors @ upper[start:end, end:]
        quantized = quantized[:, torch.argsort(order)]
        if group is None:
            return quantized.to(self.weight.dtype), whole  # type: ignore[return-value]
        return quantized.to(self.weight.dtype), (scales.reshape(-1, 1), zeros.reshape(-1, 1))


def _group_qparams(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero = qparams_for(weight, spec)
    rows = weight.shape[0]
    return scale.reshape(rows, -1), zero.reshape(rows, -1)


def _row_qparams(whole: tuple[torch.Tensor, torch.Tensor] | None, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    assert whole is not None
    scale, zero = whole
    return scale.expand(rows, 1), zero.expand(rows, 1)


def _inverse_cholesky(hessian: torch.Tensor, damp_ratio: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened H^-1; retries with 10x dampening, three times."""
    mean_diag = float(torch.diag(hessian).mean())
    for attempt in range(4):
        damped = hessian + torch.eye(hessian.shape[0], dtype=hessian.dtype) * damp_ratio * 10**attempt * mean_diag
        try:
            lower = torch.linalg.cholesky(damped)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise LlmquantError("GPTQ: the Hessian is not positive definite even with 1000x dampening")

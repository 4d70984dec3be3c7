"""Least-squares scales for GPTQ's codes (an llmquant addition, not in the GPTQ paper; ``gptq: {refit_scales: true}``).

GPTQ fixes a weight's scales before its sweep (from the weights, by the spec's observer) and then chooses the codes
q against them. With the codes fixed, the scales that minimise GPTQ's own objective for a row w,

    f(s) = (w - sum_g s_g q_g)^T H (w - sum_g s_g q_g)        (q_g: the row's codes in scale group g, zero elsewhere)

solve the normal equations  A s = b,  A_gh = q_g^T H q_h,  b_g = q_g^T H w;  per channel (one group)
s = q^T H w / q^T H q. ``w`` is the row the sweep started from (GPTAQ's W* too) and H the Hessian it used, undamped.

Symmetric specs only (an asymmetric grid's zero point is an integer that least squares would move off it). A row
keeps its scales where the new ones are not all positive and finite or do not lower f. Computed in float64
(rows x in^2 multiply-adds, as one product W H), the scales cast back to their dtype.
"""

from __future__ import annotations

import torch

from llmquant.errors import LlmquantError
from llmquant.quant.primitives import MIN_SCALE
from llmquant.quant.spec import QuantSpec


def refit_refusal(spec: QuantSpec) -> str | None:
    """Why the scales of ``spec`` are not refitted, or None."""
    if not spec.symmetric:
        return "an asymmetric grid (its integer zero point would move)"
    if spec.granularity not in ("channel", "group"):
        return f"{spec.granularity} scales (refitted per channel or per group only)"
    return None


CHUNK_VALUES = 1 << 23  # weight values refitted at once (float64 temporaries of 64 MiB each)


@torch.no_grad()
def refit_scales(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 spec: QuantSpec) -> torch.Tensor:
    """The least-squares scales (module docstring) of ``weight`` ``[out, in]`` for its ``codes`` ``[out, in]`` under
    ``hessian`` ``[in, in]``; ``scale`` the current ones in GPTQ's block view (``[out, 1]`` per channel, ``[out * in
    / g, 1]`` per group); returned in the same shape and dtype. Rows a chunk at a time (`CHUNK_VALUES`)."""
    if (refusal := refit_refusal(spec)) is not None:
        raise LlmquantError(f"refit_scales: not for {refusal}")
    rows, columns = weight.shape
    size = spec.group_size if spec.granularity == "group" and spec.group_size else columns
    h = hessian.to(device=weight.device, dtype=torch.float64)
    old = scale.reshape(rows, columns // size)
    step = max(1, CHUNK_VALUES // columns)
    refitted = [_refit_rows(weight[i:i + step], codes[i:i + step], old[i:i + step].double(), h, size)
                for i in range(0, rows, step)]
    return torch.cat(refitted).reshape(scale.shape).to(scale.dtype)


def _refit_rows(weight: torch.Tensor, codes: torch.Tensor, old: torch.Tensor, h: torch.Tensor, size: int
                ) -> torch.Tensor:
    """`refit_scales` of a few rows: their scales ``[rows, groups]`` (float64) from ``old``."""
    rows, groups = old.shape
    q = codes.to(torch.float64)
    b = (q * (weight.to(torch.float64) @ h)).reshape(rows, groups, size).sum(-1)
    a = torch.stack([(q * (q[:, g * size:(g + 1) * size] @ h[g * size:(g + 1) * size])).reshape(rows, groups, size)
                     .sum(-1) for g in range(groups)], dim=-1)  # [rows, g, h] = q_g^T H q_h
    empty = a.diagonal(dim1=-2, dim2=-1) <= 0  # a group of zero codes: its scale multiplies nothing, kept
    a = a.masked_fill(empty.unsqueeze(-1) | empty.unsqueeze(-2), 0.0)
    a.diagonal(dim1=-2, dim2=-1).masked_fill_(empty, 1.0)
    b = torch.where(empty, old, b)
    new, info = torch.linalg.solve_ex(a, b.unsqueeze(-1))
    new = new.squeeze(-1)

    def objective(s: torch.Tensor) -> torch.Tensor:  # f(s) - w^T H w
        return (s.unsqueeze(-2) @ a @ s.unsqueeze(-1)).reshape(rows) - 2 * (b * s).sum(-1)

    valid = (info == 0) & torch.isfinite(new).all(-1) & (new >= MIN_SCALE).all(-1)
    better = valid & (objective(torch.where(valid.unsqueeze(-1), new, old)) < objective(old))
    return torch.where(better.unsqueeze(-1), new, old)

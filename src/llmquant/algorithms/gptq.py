"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a Linear's weight column by column, each rounding error compensated on the
columns not yet quantized through the inverse Hessian of the layer's reconstruction loss ||X W^T - X Q^T||^2.

    H = 2/N sum_t x_t x_t^T       (N calibration tokens; `HessianAccumulator`)
    dead inputs (H_ii = 0): H_ii = 1, W[:, i] = 0
    H += damp_ratio * mean(diag H) * I
    optional activation order: sweep the columns by descending diag H
    U = chol(H^-1), upper;  for column j:  q_j = Q(w_j),  e_j = (w_j - q_j) / U_jj,  w_{j+1:} -= e_j U_{j, j+1:}
    loss = sum_j (w_j - q_j)^2 / (2 U_jj^2)

The update of the columns after the current block of ``block_size`` columns is applied lazily, once per
block (the paper's "lazy batch updates"), which is exact: it only regroups the same sums.

Quantization parameters (from the spec's observer, `observe_once`):

- per tensor or per channel: once, from the whole weight before the sweep;
- per group, plain order: each group's from its current weights (those already corrected by the
  columns quantized before it) when the sweep reaches the group's first column;
- per group, ``static_groups=True``: every group's from the original weights, up front. With activation
  order this keeps each group a contiguous slice of the inputs with one scale, which is what a
  checkpoint stores and a kernel serves; activation order with non-static groups (the reference's
  permuted groups, which need a ``g_idx``) is refused;
- per ``r x c`` block (FP8_BLOCK's 128 x 128 tiles): as per group, the c columns of a tile column sharing a
  scale in each of its tiles of r rows (a partial tile at the edges).

Precision: the Hessian, its dampening and the Cholesky factorizations in float64; the column sweep in
float32 (as in the reference implementation), or float64 for a float64 weight; the result is cast back to
the weight's dtype. On a GPU, a sweep whose scales are known before it starts (per tensor, per channel, static
groups) runs each block of columns as one Triton kernel (`llmquant.algorithms.gptq_kernel`, the same formulas).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from llmquant.algorithms.gptaq import AsymmetricAccumulator, asymmetric_correction, asymmetric_start
from llmquant.algorithms.hessian import HessianAccumulator
from llmquant.algorithms.lifecycle import LayerContext, LayerStep
from llmquant.algorithms.scale_refit import refit_refusal, refit_scales
from llmquant.device import triton_installed
from llmquant.errors import LlmquantError
from llmquant.nn.experts import Experts, down_input_feed, expert_index, only_experts
from llmquant.nn.quant_linear import QuantLinear
from llmquant.parallel import Ranks
from llmquant.quant.observers import observe_once
from llmquant.quant.primitives import block_grid_shape, dequantize, quantize_blocks
from llmquant.quant.spec import QuantSpec

log = logging.getLogger(__name__)
MAX_SWEEP_ROWS = 16384  # rows of Linears sharing a Hessian swept at once (float32: 16384 x 4096 = 256 MiB)
ROUND_HESSIAN_BYTES = 512 * 2**20  # float64 Hessians gathered in one pass over parallel experts
HESSIAN_SHARE = 0.5  # of the working memory left when a layer's sweeps begin: a round's Hessians at most
SWEEP_SHARE = 0.25  # ... and a sweep's working copies at most (`sweep_rows`)
SWEEP_BYTES_PER_WEIGHT = 24  # a bound on a sweep's float32 [rows, columns] tensors alive at once: the stacked rows,
# the sweep's copy and its permutation, the codes and their reordering, the dequantized result (counted, not measured)

DAMP_RETRIES = 3  # on a failed Cholesky, retry with 10x, 100x, 1000x the dampening


@dataclass(frozen=True)
class GPTQResult:
    """The quantized weight: ``weight == dequantize(codes, scale, zero, spec)`` (cast to the input dtype).

    ``scale`` and ``zero`` have the block-view shape of `to_blocks`: ``[1, 1]`` per tensor, ``[out, 1]``
    per channel, ``[out * in / g, 1]`` per group (row r, group j at index ``r * in / g + j``), one per tile
    per block (row-major over the tiles).
    ``codes`` is ``[out, in]`` int8 (uint8 for unsigned 8 bits); ``error`` is the summed GPTQ loss.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    codes: torch.Tensor
    error: float


@dataclass(frozen=True)
class InverseFactor:
    """What a sweep needs of H, the same for every weight that reads the input H is of (the gate/up rows of 128
    experts, swept a few experts at a time, factor H once): the column order ``perm`` (activation order: by
    descending diag H), the ``dead`` inputs (H_ii = 0) and ``hinv``, the upper Cholesky factor of the dampened
    H^-1 in that order (float64)."""

    perm: torch.Tensor
    dead: torch.Tensor
    hinv: torch.Tensor


@torch.no_grad()
def inverse_factor(hessian: torch.Tensor, damp_ratio: float = 0.01, act_order: bool = False) -> InverseFactor:
    """`InverseFactor` of ``hessian`` [in, in] (read only), in float64 on its device."""
    h = hessian.detach().to(torch.float64)
    diagonal = torch.diag(h)
    dead = diagonal == 0
    perm = torch.arange(h.shape[0], device=h.device)
    if act_order:
        perm = torch.argsort(torch.where(dead, 1.0, diagonal), descending=True, stable=True)
    backwards = perm.flip(0)  # J P^T H P J in one gather, as the factorization wants it (one copy of H at a time)
    reversed_h = h.index_select(0, backwards).index_select(1, backwards)
    del h
    reversed_h.diagonal()[dead[backwards]] = 1.0  # a dead input: H_ii = 1 (its weights are zero)
    handed = [reversed_h]  # (handed over: the factorization frees it as soon as it is factored)
    del reversed_h
    return InverseFactor(perm, dead, _inverse_hessian_cholesky(handed, damp_ratio))


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damp_ratio: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    factor: InverseFactor | None = None,
    refit: bool = False,
) -> GPTQResult:
    """Quantize ``weight`` ``[out, in]`` with GPTQ given the Hessian ``[in, in]`` of its inputs (``factor``: its
    `inverse_factor` with the same ``damp_ratio`` and ``act_order``, when the caller keeps it for several weights;
    ``refit``: the scales refitted to the codes by least squares, `llmquant.algorithms.scale_refit`)."""
    rows, columns = _check(weight, hessian, spec, block_size, act_order, static_groups)
    group = _scale_columns(spec)

    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32  # the sweep's precision
    w = weight.detach().to(compute).clone()
    factor = factor or inverse_factor(hessian.to(w.device), damp_ratio, act_order)
    perm, dead = factor.perm.to(w.device), factor.dead.to(w.device)
    w[:, dead] = 0.0

    if group is None:  # one scale per tensor or per row, from the whole weight
        scale, zero = observe_once(w, spec)
    elif static_groups:  # every group's scale from the original weights
        scales, zeros = (_per_row(t, spec, rows, columns) for t in observe_once(w, spec))
    else:  # filled in as the sweep reaches each group
        scales = torch.zeros(rows, -(-columns // group), device=w.device, dtype=compute)
        zeros = torch.zeros_like(scales)

    if act_order:
        w = w[:, perm]
    hinv = factor.hinv.to(w.device, compute).contiguous()  # upper factor of H^-1

    column_groups = perm // group if group is not None else torch.zeros_like(perm)  # scale column of each column
    fused = (compute == torch.float32 and (group is None or static_groups) and spec.type == "int"
             and spec.granularity != "block" and fused_sweep_available(w))  # (the kernel rounds to integers only;
    # blocks are left to the reference loop: their per-row scales would fit the kernel, untested there)
    groups_on_host = column_groups.tolist()  # read once: no device synchronisation per column
    codes = torch.zeros_like(w)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)  # (summed as it goes: no [out, in] of losses)
    qparams = (scales, zeros) if group is not None else (scale, zero)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        if fused:  # one kernel for the block's columns (`llmquant.algorithms.gptq_kernel`)
            grid = qparams if group is not None else (scale.expand(rows, 1), zero.expand(rows, 1))
            codes[:, i1:i2], err1 = _fused_sweep(w[:, i1:i2], hinv[i1:i2, i1:i2], *grid, column_groups[i1:i2], spec)
        else:
            codes[:, i1:i2], err1 = _sweep_block(w, hinv, i1, i2, spec, qparams, groups_on_host, static_groups)
        loss += err1.pow(2).sum(dtype=torch.float64) / 2  # sum of (w - q)^2 / d^2 over the block's columns
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the lazy batch update of the remaining columns

    codes = codes[:, torch.argsort(perm)]
    if group is not None:
        scale, zero = _block_view(scales, spec), _block_view(zeros, spec)
    if refit:  # (from ``weight``: a dead input's Hessian row and column are zero, so its weights add nothing)
        scale = refit_scales(weight, hessian, codes, scale, spec)
    codes = codes.to(spec.code_dtype)
    dequantized = dequantize(codes, scale, zero, spec)
    return GPTQResult(dequantized.to(weight.dtype), scale, zero, codes, float(loss))


def _sweep_block(w: torch.Tensor, hinv: torch.Tensor, i1: int, i2: int, spec: QuantSpec,
                 qparams: tuple[torch.Tensor, torch.Tensor], groups_on_host: list[int], static_groups: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's reference loop over the columns ``i1:i2`` of ``w`` (already updated for the columns before them): each
    column rounded, its error e = (w_i - q_i) / U_ii spread over the block's later columns. Returns the block's codes
    and errors ``[rows, i2 - i1]``. ``qparams``: per group, ``[rows, groups]`` scales and zero points (filled in here
    as each group begins, unless ``static_groups``), else the weight's own (per row or per tensor).

    The block is transposed so that a column is a contiguous row: the same arithmetic in the same order as on
    ``[rows, block]`` (the same codes bit for bit), with no column striding over the rows
    (`scripts/gptq_sweep_time.py`)."""
    group, rows = _scale_columns(spec), w.shape[0]
    scales, zeros = qparams
    hinv1 = hinv[i1:i2, i1:i2]
    w1 = w[:, i1:i2].t().contiguous()
    err1, codes1 = torch.zeros_like(w1), torch.zeros_like(w1)
    for i in range(i2 - i1):
        j = i1 + i
        if group is not None:
            g = groups_on_host[j]
            if not static_groups and j % group == 0:
                current = _current_columns(w, w1.t(), err1.t(), hinv, i1, i, group)
                s, z = (_per_row(t, spec, rows, current.shape[1]) for t in observe_once(current, spec))
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            scale_j, zero_j = scales[:, g], zeros[:, g]
        else:
            scale_j, zero_j = scales.reshape(-1), zeros.reshape(-1)  # per row, or one for the tensor
        col = w1[i]
        c = quantize_blocks(col, scale_j, zero_j, spec)
        q = (c - zero_j) * scale_j
        codes1[i] = c
        err = torch.div(col - q, hinv1[i, i], out=err1[i])
        w1[i:] -= torch.outer(hinv1[i, i:], err)
    return codes1.t(), err1.t().contiguous()


def _scale_columns(spec: QuantSpec) -> int | None:
    """How many consecutive columns share a scale column: the group size, a tile's width; None when one scale
    column serves them all (per tensor, per channel)."""
    if spec.granularity == "group":
        return spec.group_size
    if spec.granularity == "block":
        assert spec.block_shape is not None
        return spec.block_shape[1]
    return None


def _per_row(qparam: torch.Tensor, spec: QuantSpec, rows: int, columns: int) -> torch.Tensor:
    """A block-view scale or zero point of a ``[rows, columns]`` weight as ``[rows, scale columns]`` (a tile's
    value repeated on each of its rows)."""
    if spec.granularity == "block":
        assert spec.block_shape is not None
        grid = qparam.reshape(block_grid_shape(torch.Size((rows, columns)), spec))
        return grid.repeat_interleave(spec.block_shape[0], dim=0)[:rows]
    return qparam.reshape(rows, -1)


def _block_view(per_row: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`_per_row` undone: ``[n_blocks, 1]``."""
    if spec.granularity == "block":
        assert spec.block_shape is not None
        per_row = per_row[:: spec.block_shape[0]]
    return per_row.reshape(-1, 1)


def fused_sweep_available(tensor: torch.Tensor) -> bool:
    """Whether the sweep of ``tensor`` can run block by block as one Triton kernel: Triton installed, and the tensor
    on a CUDA device (or Triton's interpreter on, TRITON_INTERPRET=1). ``LLMQUANT_GPTQ_KERNEL=torch`` turns the
    kernel off (the reference loop then runs everywhere, for comparison)."""
    if os.environ.get("LLMQUANT_GPTQ_KERNEL", "triton") == "torch":
        return False
    if not (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return triton_installed()


def _fused_sweep(w: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 groups: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    from llmquant.algorithms.gptq_kernel import sweep_block  # imports Triton

    return sweep_block(w, hinv, scales, zeros, groups, spec.qmin, spec.qmax)


def _check(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int, act_order: bool, static_groups: bool
) -> tuple[int, int]:
    if weight.dim() != 2:
        raise LlmquantError(f"GPTQ quantizes a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise LlmquantError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match in_features {columns}")
    if spec.granularity in ("token", "attn_head"):
        raise LlmquantError(f"GPTQ quantizes weights: granularity must be tensor, channel, group or block, not "
                            f"{spec.granularity}")
    if block_size < 1:
        raise LlmquantError(f"GPTQ: block_size must be >= 1, got {block_size}")
    if spec.granularity == "group":
        assert spec.group_size is not None  # guaranteed by QuantSpec validation
        if columns % spec.group_size:
            raise LlmquantError(f"GPTQ: group_size {spec.group_size} does not divide in_features {columns}")
    if spec.granularity in ("group", "block") and act_order and not static_groups:
        raise LlmquantError(f"GPTQ: act_order with {spec.granularity} granularity needs static_groups=True")
    return rows, columns


def _current_columns(
    w: torch.Tensor, w1: torch.Tensor, err1: torch.Tensor, hinv: torch.Tensor, i1: int, i: int, count: int
) -> torch.Tensor:
    """Columns ``i1 + i ..`` (``count`` of them) with every update from the columns quantized so far.

    Inside the current block they are ``w1``; after it, ``w`` still lacks this block's pending update.
    """
    j, i2 = i1 + i, i1 + w1.shape[1]
    inside = w1[:, i : i + count]
    if j + count <= i2:
        return inside
    outside = w[:, i2 : j + count] - err1[:, :i] @ hinv[i1:j, i2 : j + count]
    return torch.cat([inside, outside], dim=1)


def _inverse_hessian_cholesky(handed: list[torch.Tensor], damp_ratio: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, U^T U = that inverse, from ``handed`` = [J H J]
    (J the exchange matrix: H with rows and columns reversed), which it takes out of the list and consumes (the damp
    goes onto its diagonal; freed once factored); on failure it retries with 10x the damp.

    Without forming the inverse: with J H J = M M^T (M lower, its Cholesky factor), H = R R^T with R = J M J upper,
    so H^-1 = R^-T R^-1 and U = R^-1 = J M^-1 J: upper triangular with a positive diagonal, hence the Cholesky factor
    (it is unique). One Cholesky and one triangular inverse (about 4/3 n^3 flops, against 5/3 n^3 for the
    reference's Cholesky, inverse, Cholesky) and at most two n x n matrices at a time besides the caller's H (J H J
    and M, then M and M^-1, written over the identity it solves for, then M^-1 and its flip; on a Llama-3-8B
    down_proj, n = 14,336: 1.6 GB each in float64); the same factor to float64 rounding (tests/test_gptq.py)."""
    reversed_h = handed.pop()
    mean_diag = reversed_h.diagonal().mean()
    added = damp = 0.0
    for attempt in range(DAMP_RETRIES + 1):
        damp = damp_ratio * 10**attempt
        reversed_h.diagonal().add_((damp - added) * mean_diag)
        added = damp
        lower, info = torch.linalg.cholesky_ex(reversed_h)
        if info == 0 and torch.isfinite(lower).all():
            del reversed_h
            inverse = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
            torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)  # M^-1, written over I
            del lower
            upper = inverse.flip(0, 1)
            if torch.isfinite(upper).all():
                return upper
            break
    raise LlmquantError(
        f"GPTQ: the Hessian is not positive definite even with dampening {damp:g} x mean(diag H) "
        f"(non-finite or degenerate calibration inputs?)"
    )


def stacks_rows(spec: QuantSpec) -> bool:
    """Whether Linears that share a Hessian can be quantized as one weight with their rows stacked: each
    row's sweep depends only on that row and H, so stacking is exact unless a scale spans several rows (per
    tensor; per block, whose tiles of rows would straddle two weights)."""
    return spec.granularity in ("channel", "group")


class GPTQ:
    """Adapter for `llmquant.pipeline`: ``GPTQ(weights, accumulator)``, ``add_batch(x)``, then
    ``quantize(spec, ...)`` returns each weight quantized with its block-view ``(scale, zero)``. Several
    weights (Linears that read one input: q/k/v, gate/up) are swept once, rows stacked (`stacks_rows`);
    activation order uses static groups."""

    def __init__(self, weights: list[torch.Tensor], accumulator: HessianAccumulator | None = None) -> None:
        """``accumulator``: the Hessian of the input the weights share."""
        self.weights = [w.detach() for w in weights]
        self.accumulator = accumulator or HessianAccumulator(weights[0].shape[1], device=weights[0].device)

    def add_batch(self, x: torch.Tensor) -> None:
        self.accumulator.add_batch(x)

    def quantize(
        self, spec: QuantSpec, block_size: int = 128, damp_ratio: float = 0.01, act_order: bool = False,
        factor: InverseFactor | None = None, refit: bool = False,
    ) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        """``factor``: the Hessian's `inverse_factor` (same ``damp_ratio`` and ``act_order``), when the caller keeps
        it for other weights that read the same input; ``refit``: `gptq_quantize`'s."""
        if self.accumulator.tokens == 0:
            raise LlmquantError("GPTQ saw no calibration inputs for this Linear")
        if len(self.weights) > 1 and not stacks_rows(spec):
            raise LlmquantError("GPTQ: weights quantized per tensor cannot be stacked (one scale spans all rows)")
        # in float32 (at least): the weights go back re-quantized with their qparams, which a bf16 copy of the
        # dequantized values could round across a code boundary (|q - z| up to 255 for 8 bits)
        stacked = torch.cat(self.weights)
        stacked = stacked if stacked.dtype == torch.float64 else stacked.float()
        result = gptq_quantize(stacked, self.accumulator.hessian, spec, block_size, damp_ratio,
                               act_order, static_groups=act_order, factor=factor, refit=refit)
        if len(self.weights) == 1:  # (per tensor too: one scale for all rows)
            return [(result.weight, (result.scale, result.zero))]
        return split_rows(self.weights, result.weight, result.scale, result.zero)


def split_rows(weights: list[torch.Tensor], stacked: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """The quantized rows of ``weights`` stacked (``stacked``, with block-view ``scale`` and ``zero``: the same
    number of blocks in every row) back as each weight with its own ``(scale, zero)``."""
    per_row = scale.shape[0] // stacked.shape[0]  # 1 per channel, in / g per group
    rows = [w.shape[0] for w in weights]
    blocks = [r * per_row for r in rows]
    return list(zip(stacked.split(rows), zip(scale.split(blocks), zero.split(blocks), strict=True), strict=True))


# --- the per-layer lifecycle (`llmquant.algorithms.lifecycle`) -------------------------------------------
class GPTQOptions(BaseModel):
    """GPTQ's knobs: columns per lazy-update block, dampening (share of the mean Hessian diagonal),
    activation order (quantize the columns with the largest Hessian diagonal first; groups stay static).
    Activation order is on by default: on the default model it took W4 g64 asymmetric from x1.184 to x1.133
    (BENCHMARKS.md), at no cost at run time since the groups stay contiguous.

    ``true_sequential`` (default): each group of Linears sharing an input (q/k/v, o, gate/up, down) gets
    its Hessian from inputs recomputed through the layer's already quantized Linears. False: every Hessian
    of a layer from its float pass (one pass over the calibration inputs instead of one per group; what
    llm-compressor does). Neither wins everywhere on the default model: false is better on W4 g64 asymmetric
    (x1.119 vs x1.133) and with QuaRot R1+R2 + MSE ranges (x1.054 vs x1.064), worse on W4 g64 symmetric
    (x1.168 vs x1.153) and with MSE ranges alone (x1.102 vs x1.100); the best recipes set it where it wins.

    ``asymmetric`` (GPTAQ's alpha, `llmquant.algorithms.gptaq`; 0: off): each Linear aims at the float model's
    output W X~ (its own inputs X~, carried by the engine as a reference stream) instead of the float
    layer's output on the quantized model's inputs; GPTQ's sweep starts from W + alpha W D H^-1. It costs one more
    float pass a layer, a second set of calibration activations (the reference stream, stored as the first is) and
    the float inputs of the layer's Linears, kept in CPU memory until they are swept (one batch at a time goes to the
    device). The experts of an MoE layer keep plain GPTQ
    but for the stage of all the experts' gate/up when every expert is calibrated on every token.

    ``quantized_inputs``: the Hessians (and GPTAQ's cross term) from each stage's inputs as its Linears' input
    quantizer leaves them (W4A8, W4A4, FP8: dynamic activations, and static scales once calibrated), so that the
    sweep also compensates the activations' rounding, as QuaRot's reference collects them (its Hessian hooks sit
    behind the activation quantizer); llm-compressor collects them unquantized, as the default does. With Hessians
    from the float layer (``true_sequential: false``) a static input scale is not calibrated yet when they are taken:
    those inputs stay unquantized.

    ``min_tokens``: a Linear whose input saw fewer calibration tokens (a routed expert few tokens chose, with
    ``moe_calibrate: routed``) keeps round to nearest, with a warning and its count in the manifest
    (``gptq_rtn_fallback``): a Hessian of a handful of tokens fits them, not the expert's inputs.

    ``refit_scales``: after each sweep, the scales refitted to the codes by least squares under the same Hessian
    (`llmquant.algorithms.scale_refit`; symmetric per-channel and per-group weights, others keep theirs)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    block_size: int = Field(128, ge=1)
    damp_ratio: float = Field(0.01, gt=0.0, le=1.0)
    act_order: bool = True
    true_sequential: bool = True
    asymmetric: float = Field(0.0, ge=0.0, le=1.0)
    quantized_inputs: bool = False
    min_tokens: int = Field(16, ge=1)
    refit_scales: bool = False


def layer_stages(ctx: LayerContext, names: list[str]) -> list[list[str]]:
    """The Linears ``names`` grouped by the input tensor they share (q/k/v, gate/up; with every expert calibrated
    on every token, the gate/up of all the experts and of the shared expert), in the order their input first
    appears, seen on one calibration sample; those the sample did not reach (routed experts) follow, one a stage."""
    seen: list[tuple[str, torch.Tensor]] = []  # the inputs themselves: a freed tensor's id() can be reused
    handles = [ctx.layer.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen.append((name, args[0]))) for name in names]
    try:
        ctx.run_sample(1)
    finally:
        for handle in handles:
            handle.remove()
    stages: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in seen:
        stage = next((names for first, names in stages if first is tensor), None)
        if stage is None:
            stages.append((tensor, [name]))
        elif name not in stage:
            stage.append(name)
    called = {name for name, _ in seen}  # a routed expert the sample chose none of its tokens for: each alone
    return [names for _, names in stages] + [[name] for name in names if name not in called]


def parallel_rounds(layer: nn.Module, stages: list[list[str]],
                    budget: int = ROUND_HESSIAN_BYTES) -> list[list[list[str]]]:
    """Consecutive stages in different experts of one `Experts` list, as rounds whose inputs one pass gives: an
    expert's input does not depend on how another expert is quantized (the down projections of all experts). A
    round holds as many experts as their float64 Hessians fit in ``budget`` bytes (a few at a time for 128
    experts), and at least one."""
    rounds: list[list[list[str]]] = []
    held = 0  # the Hessian bytes of the last round
    previous: tuple[str, int] | None = None
    for stage in stages:
        where = _expert_of(layer, stage)
        size = _hessian_bytes(layer, stage)
        joins = (rounds and where is not None and previous is not None and where[0] == previous[0]
                 and where[1] not in {_expert_of(layer, s)[1] for s in rounds[-1]}  # type: ignore[index]
                 and held + size <= budget)
        if joins:
            rounds[-1].append(stage)
            held += size
        else:
            rounds.append([stage])
            held = size
        previous = where
    return rounds


def _hessian_bytes(layer: nn.Module, stage: list[str]) -> int:
    columns = layer.get_submodule(stage[0]).in_features
    return columns * columns * 8


def _down_projections(layer: nn.Module, stages: list[list[str]]) -> tuple[Experts, list[int]] | None:
    """(the `Experts` list, its experts) when each of ``stages`` is one expert's down projection, all of one list that
    sends every token through every expert (`all_experts`): their inputs then come from the list's input alone
    (`down_input_feed`: the same inputs as a pass of the whole layer gives, a third of the experts' work less, and
    nothing after the experts). Else None."""
    found = [_expert_of(layer, stage) if len(stage) == 1 else None for stage in stages]
    lists = {where[0] for where in found if where is not None}
    if not found or None in found or len(lists) != 1:
        return None
    experts = layer.get_submodule(lists.pop())
    indices = [where[1] for where in found if where is not None]
    if not isinstance(experts, Experts) or not experts.calibrate_all:
        return None
    if any(layer.get_submodule(stage[0]) is not experts[e].down_proj for stage, e in zip(stages, indices, strict=True)):
        return None
    return experts, indices


def _expert_of(layer: nn.Module, stage: list[str]) -> tuple[str, int] | None:
    """(the `Experts` list, the expert) holding every Linear of ``stage``, or None."""
    found = {expert_index(name) for name in stage}
    if len(found) != 1 or None in found:
        return None
    where = found.pop()
    return where if isinstance(layer.get_submodule(where[0]), Experts) else None


def stacked_sweeps(stage: list[str], specs: dict[str, QuantSpec | None], rows: dict[str, int] | None = None,
                   limit: int = MAX_SWEEP_ROWS) -> list[list[str]]:
    """The Linears of a stage in runs swept together: same weight spec, a spec whose rows stack, and at most
    ``limit`` rows (``rows``: each Linear's) in a run, so that the gate/up of 128 experts sharing one Hessian are
    swept a few experts at a time (each row's sweep is the same either way)."""
    sweeps: list[list[str]] = []
    stacked = 0
    for name in stage:
        spec, count = specs[name], (rows or {}).get(name, 0)
        previous = specs[sweeps[-1][0]] if sweeps else None
        if sweeps and spec == previous and spec is not None and stacks_rows(spec) and stacked + count <= limit:
            sweeps[-1].append(name)
            stacked += count
        else:
            sweeps.append([name])
            stacked = count
    return sweeps


def hessian_budget(working: int | None) -> int:
    """Bytes a round's float64 Hessians may take: `HESSIAN_SHARE` of the ``working`` memory (None: unknown), at most
    `ROUND_HESSIAN_BYTES`; `parallel_rounds` still puts one expert in a round whatever its Hessian takes."""
    return ROUND_HESSIAN_BYTES if working is None else min(ROUND_HESSIAN_BYTES, int(HESSIAN_SHARE * working))


def sweep_rows(columns: int, working: int | None) -> int:
    """Rows of Linears sharing a Hessian swept at once: as many as `SWEEP_SHARE` of the ``working`` memory holds
    (`SWEEP_BYTES_PER_WEIGHT` a weight), at most `MAX_SWEEP_ROWS`; `stacked_sweeps` still sweeps one Linear whole
    however many rows it has."""
    if working is None:
        return MAX_SWEEP_ROWS
    return max(1, min(MAX_SWEEP_ROWS, int(SWEEP_SHARE * working) // (columns * SWEEP_BYTES_PER_WEIGHT)))


class GPTQStep(LayerStep):
    """GPTQ in the engine, stage by stage: the Linears of a stage read one input, so they share one Hessian
    (and, with the same spec, one sweep of their stacked rows). With ``true_sequential`` each stage's Hessian
    comes from its input behind the already quantized stages (the layer runs only as far as the stage's
    first Linear); without it, from the float pass of the transformed layer.

    In several processes (`llmquant.parallel`) each Hessian is the sum over ranks. A sweep whose rows are
    quantized independently is split by rows: each rank sweeps its share and the rows are gathered. The others
    (one scale for the whole weight) among the sweeps that do not wait for one another (a stage's, or with
    Hessians from the float pass the whole layer's) go whole to owner ranks by their cost, and each owner
    broadcasts its codes, scales and zero points. Every rank goes on with the same quantized layer."""

    name = "gptq"

    def __init__(self, options: GPTQOptions | None = None) -> None:
        self.options = options or GPTQOptions()
        self.stages: list[list[str]] = []
        self.hessians: dict[str, HessianAccumulator] = {}
        self.targets: dict[str, list[torch.Tensor]] = {}  # GPTAQ: a stage's float-model inputs, batch by batch
        self.shifts: dict[str, float] = {}  # GPTAQ: ||W* - W|| / ||W|| of each swept Linear

    @property
    def wants_reference(self) -> bool:  # type: ignore[override]
        return self.options.asymmetric > 0

    def observe_reference(self, ctx: LayerContext) -> list[RemovableHandle]:
        """GPTAQ: keep the float model's inputs of each stage, batch by batch, but those of one expert's Linears (a
        routed expert sees other tokens in the two streams; each expert's down projection has its own input, too
        large to keep for 128 experts): with every expert calibrated on every token, the stage of all the experts'
        gate/up (one input) takes part."""
        self.stages = layer_stages(ctx, ctx.quantized_names())  # (before any observer starts: one sample)
        handles = []
        for stage in self.stages:
            if _expert_of(ctx.layer, stage) is not None:
                continue
            kept = self.targets[stage[0]] = []
            handles.append(ctx.layer.get_submodule(stage[0]).register_forward_pre_hook(
                lambda _m, args, kept=kept: kept.append(args[0].detach().to("cpu", copy=True))))  # (off the GPU)
        return handles

    def observe_transformed(self, ctx: LayerContext) -> list[RemovableHandle]:
        if not self.stages:
            self.stages = layer_stages(ctx, ctx.quantized_names())  # (before any observer starts: one sample)
        if self.options.true_sequential:
            return []
        handles = []
        for stage in self.stages:
            module = ctx.layer.get_submodule(stage[0])
            accumulator = self.hessians[stage[0]] = self._accumulator(ctx, stage)
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, accumulator=accumulator: accumulator.add_batch(args[0])))
        return handles

    @torch.no_grad()
    def quantize(self, ctx: LayerContext) -> dict[str, Any]:
        specs = {name: quantized.weight_spec for name, (_, quantized) in ctx.linears.items()}
        rows = {name: linear.out_features for name, (linear, _) in ctx.linears.items()}
        working = ctx.ranks.least(ctx.working_memory())  # what its Hessians and sweeps may take, under the caps
        rounds = (parallel_rounds(ctx.layer, self.stages, hessian_budget(working)) if self.options.true_sequential
                  else [self.stages])
        fallback: dict[str, int] = {}
        for stages in rounds:  # the sweeps of a round do not depend on one another
            self._quantize_round(ctx, stages, specs, rows, working, fallback)
        row: dict[str, Any] = {"gptq_stages": self.stages}
        if len(rounds) > 1 or any(len(stages) > 1 for stages in rounds):  # parallel experts: how many a pass
            row["gptq_expert_rounds"] = [len(stages) for stages in rounds]
            log.info("%s: GPTQ's Hessians in %d passes (stages a pass: %s), %s MiB of working memory", ctx.where,
                     len(rounds), ", ".join(str(len(stages)) for stages in rounds),
                     "unknown" if working is None else f"{working / 2**20:.0f}")
        if working is not None:
            row["gptq_working_memory_mb"] = round(working / 2**20, 1)
        if self.shifts:  # GPTAQ: how far the float-model target moved each Linear's start
            row["gptaq"] = {"alpha": self.options.asymmetric, "relative_shift": self.shifts}
        if fallback:
            log.warning("%s: %d Linears saw fewer than %d calibration tokens and keep round to nearest (%s, ...)",
                        ctx.where, len(fallback), self.options.min_tokens, next(iter(fallback)))
            row["gptq_rtn_fallback"] = fallback  # Linear -> the tokens it saw
        return row

    def _quantize_round(self, ctx: LayerContext, stages: list[list[str]], specs: dict[str, QuantSpec | None],
                        rows: dict[str, int], working: int | None, fallback: dict[str, int]) -> None:
        """One round: its stages' Hessians (one pass), then their sweeps; a stage of an expert too few tokens chose
        goes to ``fallback`` (round to nearest). Its Hessians and factors are released on return, before the next
        round's pass."""
        jobs: list[tuple[list[str], HessianAccumulator]] = []
        for stage, hessian in zip(stages, self._hessians_of(ctx, stages), strict=True):
            if hessian.tokens < self.options.min_tokens:  # (an expert few tokens chose): round to nearest
                fallback.update(dict.fromkeys(stage, hessian.tokens))
                continue
            limit = sweep_rows(ctx.linears[stage[0]][0].in_features, working)
            jobs += [(sweep, hessian) for sweep in stacked_sweeps(stage, specs, rows, limit)]
        split = [(sweep, hessian) for sweep, hessian in jobs if self._splits(ctx, sweep, specs[sweep[0]])]
        whole = [job for job in jobs if job not in split]
        owners = ctx.ranks.owners([_cost(ctx, sweep) for sweep, _ in whole])
        mine = [job for job, owner in zip(whole, owners, strict=True) if owner == ctx.ranks.rank]
        factors = _Factors([hessian for _, hessian in split + mine], self.options)
        for sweep, hessian in split:  # every rank sweeps its share of the rows
            self._solve(ctx, sweep, hessian, specs[sweep[0]], *factors.take(hessian), rows_of=ctx.ranks)
        for sweep, hessian in mine:
            self._solve(ctx, sweep, hessian, specs[sweep[0]], *factors.take(hessian))
        for (sweep, _), owner in zip(whole, owners, strict=True):
            for name in sweep:
                ctx.linears[name][1].broadcast_weight(ctx.ranks, owner)

    @staticmethod
    def _splits(ctx: LayerContext, sweep: list[str], spec: QuantSpec) -> bool:
        """Whether the sweep is split by rows over several ranks: rows quantized independently (not one scale
        for the whole weight), at least one row a rank."""
        rows = sum(ctx.linears[name][0].out_features for name in sweep)
        return ctx.ranks.world > 1 and stacks_rows(spec) and rows >= ctx.ranks.world

    def _hessians_of(self, ctx: LayerContext, stages: list[list[str]]) -> list[HessianAccumulator]:
        """Each stage's Hessian over every rank's samples: from the float pass, or (true sequential) from its input
        behind the stages quantized so far (one stage: the layer runs only as far as it; parallel stages: one
        pass feeds them all)."""
        hessians = [self.hessians.pop(stage[0], None) for stage in stages]  # (released once swept)
        missing = {ctx.layer.get_submodule(stage[0]): self._accumulator(ctx, stage)
                   for stage, hessian in zip(stages, hessians, strict=True) if hessian is None}
        downs = _down_projections(ctx.layer, [s for s, h in zip(stages, hessians, strict=True) if h is None])
        if len(missing) == 1 and _expert_of(ctx.layer, stages[0]) is None:  # (a routed expert may not be called)
            [(module, hessian)] = missing.items()
            ctx.feed(module, hessian.add_batch)
        elif downs is not None:  # experts' down projections, every token through every expert: from the experts' input
            experts, indices = downs
            ctx.feed(experts, down_input_feed(experts, {e: missing[experts[e].down_proj].add_batch for e in indices}))
        elif missing:  # parallel experts: only theirs run on every token (`only_experts`)
            where = [_expert_of(ctx.layer, stage) for stage in stages]
            lists = {w[0] for w in where if w is not None}
            with contextlib.ExitStack() as stack:
                for name in lists:
                    chosen = {w[1] for w in where if w is not None and w[0] == name}
                    stack.enter_context(only_experts(ctx.layer.get_submodule(name), chosen))
                ctx.feed_each({module: hessian.add_batch for module, hessian in missing.items()})
        found = iter(missing.values())
        hessians = [hessian if hessian is not None else next(found) for hessian in hessians]
        for hessian in hessians:
            hessian.reduce(ctx.ranks)
        return hessians

    def _solve(self, ctx: LayerContext, sweep: list[str], hessian: HessianAccumulator, spec: QuantSpec,
               factor: InverseFactor, correction: torch.Tensor | None, rows_of: Ranks | None = None) -> None:
        """GPTQ the sweep's stacked rows (``factor``: their Hessian's) and set its Linears' weights, from W* = W + alpha
        W M with GPTAQ's ``correction`` M (None: plain GPTQ); with ``rows_of``, this rank's share of the rows only,
        then every rank's rows gathered (the rows of a sweep are independent given H^-1)."""
        options = self.options
        refit = options.refit_scales and refit_refusal(spec) is None
        weights = [ctx.linears[name][0].weight for name in sweep]
        if correction is not None:  # GPTAQ: start from W* = W + alpha W D H^-1
            shifted = [asymmetric_start(w, correction, options.asymmetric) for w in weights]
            self.shifts.update({name: float((s - w).norm() / w.norm().clamp_min(1e-30))
                                for name, w, s in zip(sweep, weights, shifted, strict=True)})
            weights = shifted
        if rows_of is None:
            results = GPTQ(weights, hessian).quantize(spec, options.block_size, options.damp_ratio, options.act_order,
                                                      factor, refit)
        else:
            stacked = torch.cat(weights)
            [(part, (scale, zero))] = GPTQ([stacked[rows_of.share(stacked.shape[0])]], hessian).quantize(
                spec, options.block_size, options.damp_ratio, options.act_order, factor, refit)
            per_row = scale.shape[0] // part.shape[0]  # scales a row: 1 per channel, in / g per group
            scale, zero = (rows_of.all_rows(t.reshape(part.shape[0], per_row), stacked.shape[0]).reshape(-1, 1)
                           for t in (scale, zero))
            results = split_rows(weights, rows_of.all_rows(part, stacked.shape[0]), scale, zero)
        for name, (weight, qparams) in zip(sweep, results, strict=True):
            ctx.linears[name][1].set_weight(weight, qparams)

    def _accumulator(self, ctx: LayerContext, stage: list[str]) -> HessianAccumulator:
        """The Hessian of the stage's input, kept on the device its first weight is on (with ``quantized_inputs``, of
        the input as the first Linear's input quantizer leaves it; one still observing its static scale gives it
        unquantized); with GPTAQ's float-model inputs of the stage (`observe_reference`), also their cross term with
        the quantized model's."""
        linear, quantized = ctx.linears[stage[0]]
        prepare = _as_quantized(quantized) if self.options.quantized_inputs and quantized.input_spec else None
        targets = self.targets.pop(stage[0], None)
        if targets is None:
            return HessianAccumulator(linear.in_features, device=linear.weight.device, prepare=prepare)
        return AsymmetricAccumulator(linear.in_features, targets, device=linear.weight.device, prepare=prepare)

    def release(self, ctx: LayerContext) -> None:
        self.stages, self.hessians, self.targets, self.shifts = [], {}, {}, {}


class _Factors:
    """Each Hessian's `inverse_factor` and, for GPTAQ, its `asymmetric_correction` (from that factor), computed for
    its first sweep and kept until its last (the gate/up of 128 experts read one Hessian and are swept a few experts
    at a time: one factorization and one correction for all of them)."""

    def __init__(self, hessians: list[HessianAccumulator], options: GPTQOptions) -> None:
        self.options = options
        self.sweeps_left = Counter(id(hessian) for hessian in hessians)
        self.kept: dict[int, tuple[InverseFactor, torch.Tensor | None]] = {}

    def take(self, hessian: HessianAccumulator) -> tuple[InverseFactor, torch.Tensor | None]:
        key = id(hessian)
        found = self.kept.pop(key, None)
        if found is None:
            factor = inverse_factor(hessian.hessian, self.options.damp_ratio, self.options.act_order)
            correction = (asymmetric_correction(hessian.cross, factor.perm, factor.dead, factor.hinv)
                          if isinstance(hessian, AsymmetricAccumulator) else None)
            found = factor, correction
        self.sweeps_left[key] -= 1
        if self.sweeps_left[key] > 0:
            self.kept[key] = found
        return found


def _as_quantized(quantized: QuantLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    """An input as ``quantized``'s input quantizer leaves it (unchanged while it still observes its static scale)."""
    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x if quantized.observer is not None else quantized.quantize_input(x)

    return prepare


def _cost(ctx: LayerContext, sweep: list[str]) -> float:
    """A sweep's work, for the partition over ranks: its column updates (rows x columns^2) and its factorization
    (columns^3)."""
    linears = [ctx.linears[name][0] for name in sweep]
    rows, columns = sum(linear.out_features for linear in linears), linears[0].in_features
    return float(rows * columns**2 + columns**3)


__all__ = ["GPTQ", "GPTQOptions", "GPTQResult", "GPTQStep", "HessianAccumulator", "InverseFactor", "gptq_quantize",
           "inverse_factor", "stacks_rows"]

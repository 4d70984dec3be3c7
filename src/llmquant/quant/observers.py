"""Observers: turn the values a tensor took into quantization parameters.

- ``minmax``: the running per-block minimum and maximum (absolute maximum when symmetric).
- ``percentile``: the ``p``-th and ``(100 - p)``-th percentiles of the observed values instead of the
  extremes, so that a few outliers do not stretch the grid.
- ``mse``: a grid search over clipping ratios r in [0.05, 1] (step 0.01) of the min-max range, keeping per block the
  r that minimises the squared error of fake-quantized values (as in the clipping searches of
  AWQ, Lin et al. 2023, and of most PTQ toolkits).

For percentile and mse over many calibration batches the observer keeps a bounded random sample of
the values of each block (``sample_size`` per block), seeded, so the result does not depend on memory.
"""

from __future__ import annotations

import torch

from llmquant.parallel import Ranks
from llmquant.quant.primitives import qparams_from_min_max, quantize_blocks, to_blocks
from llmquant.quant.spec import QuantSpec

MSE_GRID = torch.linspace(0.05, 1.0, 96)


class Observer:
    """Accumulates statistics of the tensors passed to `update`, then gives `qparams()`."""

    def __init__(self, spec: QuantSpec, sample_size: int = 1 << 16, seed: int = 0) -> None:
        self.spec = spec
        self.sample_size = sample_size
        self.min_vals: torch.Tensor | None = None
        self.max_vals: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        blocks = to_blocks(x.detach().float(), self.spec)
        lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
        if self.min_vals is None or self.max_vals is None:
            self.min_vals, self.max_vals = lo, hi
        else:
            self.min_vals, self.max_vals = torch.minimum(self.min_vals, lo), torch.maximum(self.max_vals, hi)
        self.count += 1
        if self.spec.observer != "minmax":
            self.samples.append(self._sample(blocks))

    def _sample(self, blocks: torch.Tensor) -> torch.Tensor:
        if blocks.shape[1] <= self.sample_size:
            return blocks.clone()
        idx = torch.randint(blocks.shape[1], (self.sample_size,), generator=self.generator)
        return blocks[:, idx]

    def reduce(self, ranks: Ranks) -> None:
        """Combine what every rank observed (`llmquant.parallel`): the minima and maxima, and the value samples of
        percentile and mse, in rank order; with one process, nothing changes."""
        if ranks.world == 1:
            return
        if self.min_vals is None or self.max_vals is None:
            raise RuntimeError("observer saw no data on one of the ranks")
        ranks.min(self.min_vals)
        ranks.max(self.max_vals)
        if self.spec.observer != "minmax":
            local = torch.cat(self.samples, dim=1).cpu()
            self.samples = [t.to(self.min_vals.device) for t in ranks.gather(local)]

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_vals is None or self.max_vals is None:
            raise RuntimeError("observer saw no data")
        if self.spec.observer == "minmax":
            return qparams_from_min_max(self.min_vals, self.max_vals, self.spec)
        values = torch.cat(self.samples, dim=1)
        if self.spec.observer == "percentile":
            return percentile_qparams(values, self.spec)
        return mse_qparams(values, self.min_vals, self.max_vals, self.spec)


def percentile_qparams(blocks: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization parameters from the spec's percentiles of each block."""
    n = blocks.shape[1]
    k_hi = max(1, min(n, round(n * spec.percentile / 100.0)))
    k_lo = max(1, min(n, n - k_hi + 1))
    hi = blocks.kthvalue(k_hi, dim=1, keepdim=True).values
    lo = blocks.kthvalue(k_lo, dim=1, keepdim=True).values
    return qparams_from_min_max(lo, hi, spec)


def mse_qparams(
    blocks: torch.Tensor, min_vals: torch.Tensor, max_vals: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the clipped range (ratio from `MSE_GRID`) with the least squared fake-quant error."""
    best_err = torch.full_like(min_vals, float("inf"))
    best_scale, best_zero = qparams_from_min_max(min_vals, max_vals, spec)
    for ratio in MSE_GRID.tolist():
        scale, zero = qparams_from_min_max(min_vals * ratio, max_vals * ratio, spec)
        deq = (quantize_blocks(blocks, scale, zero, spec) - zero) * scale
        err = (deq - blocks).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def observe_once(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization parameters of a tensor seen whole, such as a weight."""
    observer = Observer(spec, sample_size=1 << 30)
    observer.update(x)
    return observer.qparams()


__all__ = ["Observer", "mse_qparams", "observe_once", "percentile_qparams"]

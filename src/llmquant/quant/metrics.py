"""Layer 1, numerics: how far a quantized computation is from its float reference, over calibration samples that may
be shared by several processes."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llmquant.parallel import SINGLE, Ranks


def relative_error(reference: Iterable[torch.Tensor], actual: Iterable[torch.Tensor], ranks: Ranks = SINGLE) -> float:
    """||actual - reference|| / ||reference|| over the samples both hold (of every rank of ``ranks``), in float32 on
    each reference's device: a pass over the first samples only (a check, an error figure) is compared with the same
    samples of a pass over all of them, which are read one at a time (never sliced into memory when they wait on
    disk)."""
    num = den = 0.0
    for r, a in zip(reference, actual, strict=False):
        r, a = r.float(), a.to(r.device).float()
        num += float((a - r).pow(2).sum())
        den += float(r.pow(2).sum())
    if ranks.world > 1:
        num, den = ranks.sum(torch.tensor([num, den], dtype=torch.float64)).tolist()
    return (num / max(den, 1e-30)) ** 0.5


__all__ = ["relative_error"]

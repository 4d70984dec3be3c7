"""GPTQ's Hessian of a Linear's inputs, H = 2/N sum_t x_t x_t^T over N calibration tokens (Frantar et al. 2022),
accumulated batch by batch as a float64 running mean and summed over ranks (`llmquant.parallel`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from llmquant.errors import LlmquantError
from llmquant.parallel import Ranks


class HessianAccumulator:
    """H = 2/N sum x x^T over the N tokens seen by `add_batch`, as a float64 running mean. Each batch's
    X^T X is computed in x's precision (float32 for float32 inputs, as the reference implementation does
    throughout: about twice as fast as float64 here; bfloat16 inputs on a GPU as TF32 products, which are exact
    for them) and added to the float64 mean."""

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``prepare``: what each batch goes through first (the Linear's input quantizer, for a Hessian of the inputs
        as the quantized Linear sees them)."""
        self.in_features = in_features
        self.tokens = 0
        self.prepare = prepare
        self._hessian = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x`` ``[..., in_features]`` (``prepare``d): rescale the old mean, add the new terms."""
        self._add(x if self.prepare is None else self.prepare(x))

    def _add(self, x: torch.Tensor) -> None:
        self._accumulate(self._rows(x), x.dtype)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[tokens, in_features]`` on the Hessian's device, in the products' precision."""
        if x.shape[-1] != self.in_features:
            raise LlmquantError(f"GPTQ: input has {x.shape[-1]} features, the Linear has {self.in_features}")
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.detach().reshape(-1, self.in_features).to(self._hessian.device, compute)

    def _accumulate(self, rows: torch.Tensor, given: torch.dtype) -> None:
        """Add the ``rows`` of `_rows` (made from inputs of dtype ``given``) to the running mean."""
        if rows.shape[0] == 0:
            return
        self._hessian *= self.tokens / (self.tokens + rows.shape[0])
        self.tokens += rows.shape[0]
        with _tf32(rows.is_cuda and given == torch.bfloat16):
            product = rows.T @ rows
        self._hessian += product.double().mul_(2.0 / self.tokens)  # (scaled in place: one n x n float64 temporary)

    def reduce(self, ranks: Ranks) -> None:
        """The Hessian of every rank's tokens (`llmquant.parallel`): the sum of the ranks' N_r H_r over their N."""
        if ranks.world == 1:
            return
        total = ranks.total(float(self.tokens))
        summed = ranks.sum(self._hessian * self.tokens)
        self._hessian, self.tokens = summed / max(total, 1.0), int(total)

    @property
    def hessian(self) -> torch.Tensor:
        return self._hessian


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """TF32 matrix products inside, when ``allowed``: for bfloat16 inputs (8 mantissa bits, within TF32's 10) the
    products are exact and accumulate in float32, the same sums as float32 products, several times faster on a GPU."""
    if not allowed:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


__all__ = ["HessianAccumulator"]

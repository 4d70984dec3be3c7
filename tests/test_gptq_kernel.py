"""The fused GPTQ block sweep (`llmquant.algorithms.gptq_kernel`, Triton) against the reference loop: on a GPU,
or on the CPU through Triton's interpreter (conftest turns it on there); skipped where Triton is not installed
(CI)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llmquant.algorithms.gptq import HessianAccumulator, fused_sweep_available, gptq_quantize
from llmquant.quant import QuantSpec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPECS = [  # (spec, activation order): the scales of each are known before the sweep
    (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16), True),
    (QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32), False),
    (QuantSpec(bits=4, symmetric=True, granularity="channel"), True),
    (QuantSpec(bits=8, symmetric=True, granularity="tensor"), False),
]


def layer(rows: int = 40, columns: int = 96) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    x = torch.randn(1024, columns, generator=generator) @ mixing
    x[:, :3] *= 10.0
    accumulator = HessianAccumulator(columns)
    accumulator.add_batch(x)
    return torch.randn(rows, columns, generator=generator), x, accumulator.hessian


@pytest.mark.parametrize(("spec", "act_order"), SPECS, ids=lambda v: v.describe() if isinstance(v, QuantSpec) else "")
def test_the_fused_sweep_reconstructs_as_well_as_the_loop(spec: QuantSpec, act_order: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 48 columns (the last one narrower than the kernel's 64) and a row count that is not a multiple of
    the kernel's tile: the same codes (to a rounding-boundary flip on a GPU) and the same error ||X (W - Q)^T||."""
    weight, x, hessian = layer()
    weight, hessian = weight.to(DEVICE), hessian.to(DEVICE)
    assert fused_sweep_available(weight)
    fused = gptq_quantize(weight, hessian, spec, block_size=48, act_order=act_order,
                          static_groups=spec.granularity == "group")
    monkeypatch.setenv("LLMQUANT_GPTQ_KERNEL", "torch")
    assert not fused_sweep_available(weight)
    loop = gptq_quantize(weight, hessian, spec, block_size=48, act_order=act_order,
                         static_groups=spec.granularity == "group")
    assert (fused.codes == loop.codes).float().mean() > 0.99
    assert torch.equal(fused.scale, loop.scale) and torch.equal(fused.zero, loop.zero)

    def error(q: torch.Tensor) -> float:
        return float((x @ (q.cpu() - weight.cpu()).T).norm())

    assert error(fused.weight) == pytest.approx(error(loop.weight), rel=1e-3)
    assert fused.error == pytest.approx(loop.error, rel=1e-3)


def test_dynamic_groups_keep_the_loop() -> None:
    """Plain-order groups take each group's scale from the columns as the sweep reaches them: no fused path."""
    weight, _, hessian = layer()
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    result = gptq_quantize(weight.to(DEVICE), hessian.to(DEVICE), spec, block_size=48)
    assert result.codes.shape == weight.shape

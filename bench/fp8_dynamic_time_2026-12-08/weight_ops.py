"""One FP8 weight (1536 x 576, per channel, per tensor, in groups of 64), one thread: the float8 codes and the
relative weight error by the primitives (`quantize`; `dequantize`, then two norms) and by the E4M3 op
(`quantized_codes`, `fused_code_error`); medians of 30 calls after a warm-up, in milliseconds, and whether the
codes are the same bytes.

    PYTHONPATH=src .venv/bin/python bench/fp8_dynamic_time_2026-12-08/weight_ops.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmquant.evaluation.bench import median_seconds
from llmquant.nn.e4m3_simulation import fused_code_error, quantized_codes
from llmquant.quant import QuantSpec, dequantize, quantize
from llmquant.quant.observers import observe_once


def median_ms(call: Callable[[], object]) -> float:
    return median_seconds(call, repeats=30) * 1e3


def row(weight: torch.Tensor, spec: QuantSpec) -> str:
    """One granularity's line of the table."""
    scale, zero = observe_once(weight, spec)
    codes = quantize(weight, scale, zero, spec)
    same = torch.equal(codes.view(torch.uint8), quantized_codes(weight, spec, scale, zero).view(torch.uint8))

    def plain() -> float:
        return float((dequantize(codes, scale, zero, spec) - weight).norm() / weight.norm())

    def fused() -> float:
        return fused_code_error(codes, spec, scale, weight)

    codes_ms = (median_ms(lambda: quantize(weight, scale, zero, spec)),
                median_ms(lambda: quantized_codes(weight, spec, scale, zero)))
    return (f"| {spec.granularity} | {codes_ms[0]:.2f} / {codes_ms[1]:.2f} | {same} | {median_ms(plain):.2f} / "
            f"{median_ms(fused):.2f} | {plain():.6f} / {fused():.6f} |")


def main() -> None:
    torch.set_num_threads(1)
    weight = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    print("| granularity | codes: primitives / op ms | same bytes | error: primitives / op ms | errors |")
    print("|---|---|---|---|---|")
    for spec in (QuantSpec(type="float", granularity="channel"), QuantSpec(type="float", granularity="tensor"),
                 QuantSpec(type="float", granularity="group", group_size=64)):
        print(row(weight, spec))


if __name__ == "__main__":
    main()

"""The weight-error figures of an FP8_DYNAMIC model (`engine._weight_errors`, its 210 Linears) timed after a first
run, when the allocator reuses its memory, medians of 5; and the same with `dequantize` skipping ``- zero`` for
symmetric specs (the same figures, checked). One thread:

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/fp8_time_2026-12-07c/weight_errors_warm.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch

import llmquant
from llmquant.nn.quant_linear import QuantLinear
from llmquant.pipeline import engine
from llmquant.quant import primitives


def symmetric_without_zero(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec) -> torch.Tensor:
    blocks = primitives.to_blocks(primitives.codes_to_float(q), spec)
    return primitives.from_blocks(blocks * scale if spec.symmetric else (blocks - zero) * scale, q.shape, spec)


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = llmquant.load(None)
    llmquant.quantize(model, {"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic"}, tokenizer, progress=False)
    pairs = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.weight_spec is not None:
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data = module.dequantized_weight(keep=False) + 0.01  # (some error to measure)
            pairs[name] = (linear, module)
    ways = {"dequantize": primitives.dequantize, "symmetric_without_zero": symmetric_without_zero}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    figures = {}
    try:
        for _ in range(5):
            for way, function in ways.items():
                primitives.dequantize = function
                start = time.perf_counter()
                figures[way] = engine._weight_errors(pairs)
                seconds[way].append(time.perf_counter() - start)
    finally:
        primitives.dequantize = ways["dequantize"]
    print(json.dumps({"linears": len(pairs), **{way: round(statistics.median(s), 3) for way, s in seconds.items()},
                      "same_figures": figures["dequantize"] == figures["symmetric_without_zero"]}))


if __name__ == "__main__":
    main()

"""One Linear's product on this CPU by each way torch offers for FP8 codes, beside float32 and bfloat16: 4096 rows of
576 inputs by a 1536 x 576 weight (gate_proj's shape over 8 samples of 512 tokens), one thread. Medians of 10 calls
after one warm-up; `torch._scaled_mm` once (over a minute a call here). The FP8 codes' exact product in float32 is
the reference of the `qlinear_pointwise` row.

    PYTHONPATH=src .venv/bin/python bench/fp8_time_2026-12-07b/fp8_products.py
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmquant.evaluation.bench import median_seconds


def milliseconds(product: Callable[[], torch.Tensor], calls: int) -> float:
    return round(median_seconds(product, calls, warmups=1 if calls > 1 else 0) * 1e3, 1)


def main() -> None:
    torch.set_num_threads(1)
    rows, inputs, outputs = 4096, 576, 1536
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, inputs, generator=generator), torch.randn(outputs, inputs, generator=generator)
    x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    xb, wb = x.bfloat16(), w.bfloat16()
    packed = torch.ops.onednn.qlinear_prepack(w8, [rows, inputs])
    ones, zeros = torch.ones(outputs), torch.zeros(outputs, dtype=torch.long)

    def onednn_fp8() -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(x8, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                                  "none", [], "")

    one = torch.tensor(1.0)
    figures = {
        "float32 F.linear": milliseconds(lambda: F.linear(x, w), 10),
        "bfloat16 F.linear (bfloat16 output)": milliseconds(lambda: F.linear(xb, wb), 10),
        "onednn qlinear_pointwise, FP8 codes, float32 output": milliseconds(onednn_fp8, 10),
        "torch._scaled_mm, FP8 codes, float32 output (one call)": milliseconds(
            lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32), 1),
    }
    exact = F.linear(x8.float(), w8.float())
    print(json.dumps({"shape": [rows, inputs, outputs], "threads": 1, "median_ms": figures,
                      "qlinear_pointwise_max_abs_difference": float((onednn_fp8() - exact).abs().max()),
                      "exact_max_abs": float(exact.abs().max())}))


if __name__ == "__main__":
    main()

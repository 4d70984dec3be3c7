"""The E4M3 op against the primitives on one tensor: 8 samples of 512 tokens by 576 features (a q/k/v input over a
batch), FP8 per token, one thread, medians of 20 calls; a copy of the tensor for scale.

    PYTHONPATH=src .venv/bin/python bench/fp8_time_2026-12-07b/op_alone.py
"""

from __future__ import annotations

import json

import torch
from fp8_products import milliseconds  # (this folder's: medians after one warm-up)

from llmquant.nn.e4m3_simulation import fused_fake_quantize
from llmquant.quant import QuantSpec, fake_quantize


def main() -> None:
    torch.set_num_threads(1)
    spec = QuantSpec(bits=8, type="float", granularity="token", dynamic=True)
    x = torch.randn(8 * 512, 576, generator=torch.Generator().manual_seed(0))
    assert fused_fake_quantize(x, spec) is not None, "the op does not run here"
    print(json.dumps({"shape": list(x.shape), "threads": 1, "median_ms": {
        "fake_quantize (primitives)": milliseconds(lambda: fake_quantize(x, spec), 20),
        "fused_fake_quantize (the op)": milliseconds(lambda: fused_fake_quantize(x, spec), 20),
        "x.clone()": milliseconds(x.clone, 20)}}))


if __name__ == "__main__":
    main()

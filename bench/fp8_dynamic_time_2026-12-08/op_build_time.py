"""The E4M3 op's one-time build: the seconds of the first `e4m3_op` call in an empty ``TORCH_EXTENSIONS_DIR`` (a
machine where it was never built), then of a second call (built: nothing to do).

    TORCH_EXTENSIONS_DIR=$(mktemp -d) PYTHONPATH=src .venv/bin/python bench/fp8_dynamic_time_2026-12-08/op_build_time.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from llmquant.nn.e4m3_simulation import e4m3_op
from llmquant.quant import QuantSpec


def main() -> None:
    where = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not where or any(Path(where).iterdir()):
        sys.exit("set TORCH_EXTENSIONS_DIR to an empty directory (a machine where the op was never built)")
    spec, x = QuantSpec(type="float", granularity="channel"), torch.zeros(2, 8)
    for call in ("first (builds)", "second"):
        start = time.perf_counter()
        built = e4m3_op(x, spec) is not None
        print(f"{call}: {time.perf_counter() - start:.2f} s, op {'ready' if built else 'not built'}")


if __name__ == "__main__":
    main()

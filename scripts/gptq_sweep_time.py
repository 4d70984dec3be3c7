"""Seconds of one GPTQ sweep (`llmquant.algorithms.gptq.gptq_quantize`, W4 symmetric groups of 64 with activation
order, its inverse factor computed beforehand) at the weight shapes of the default model and of a Qwen3-30B-A3B
layer, medians of 3; and of reading float8 codes as float32 (torch's conversion against `codes_to_float`'s table).
To compare two commits: `git worktree add /tmp/old REV`, then the same command with `PYTHONPATH=/tmp/old/src` (the
script is this checkout's; the package imported is the one PYTHONPATH names).

    PYTHONPATH=src .venv/bin/python scripts/gptq_sweep_time.py [--threads 2]
"""

from __future__ import annotations

import argparse
import functools

import torch

from llmquant.algorithms.gptq import gptq_quantize, inverse_factor
from llmquant.evaluation.bench import median_seconds
from llmquant.quant import QuantSpec

SHAPES = [(960, 576), (3072, 576), (576, 1536), (2048, 768), (16384, 2048)]  # [rows, columns]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=True, granularity="group", group_size=64)
    for rows, columns in SHAPES:
        x = torch.randn(4096, columns)
        hessian = (x.T @ x).double() * 2 / 4096
        weight = torch.randn(rows, columns) * 0.02
        factor = inverse_factor(hessian, 0.01, True)
        sweep = functools.partial(gptq_quantize, weight, hessian, spec, act_order=True, static_groups=True,
                                  factor=factor)
        seconds = median_seconds(sweep, 3)
        print(f"sweep {rows} x {columns}: {seconds * 1e3:.1f} ms")
    codes = (torch.randn(1536, 576) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    print(f"float8 -> float32, 1536 x 576, torch: {median_seconds(codes.float, 20) * 1e3:.2f} ms")
    try:
        from llmquant.quant.primitives import codes_to_float
    except ImportError:  # (before the table)
        return
    print(f"float8 -> float32, 1536 x 576, table: {median_seconds(lambda: codes_to_float(codes), 20) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

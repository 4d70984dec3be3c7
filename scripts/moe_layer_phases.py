"""`scripts/moe_layer_bench.py` with GPTQ's time split by phase: the Hessian passes, the inverse factors, and the
column sweeps of the attention, of the experts' gate/up rows and of their down projections (seconds and counts,
printed after the bench's JSON). Same arguments as the bench:

    .venv/bin/python scripts/moe_layer_phases.py --samples 8 --seqlen 512
"""

from __future__ import annotations

import collections
import runpy
import sys
import time
from pathlib import Path

from llmquant.algorithms import gptq

seconds: collections.Counter[str] = collections.Counter()
counts: collections.Counter[str] = collections.Counter()


def timed(kind_of, function):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            kind = kind_of(*args)
            seconds[kind] += time.perf_counter() - start
            counts[kind] += 1
    return run


def _sweep_kind(_step, _ctx, sweep, *_rest) -> str:
    return "sweep down" if "down" in sweep[0] else ("sweep gate/up" if ".experts." in sweep[0] else "sweep attention")


gptq.GPTQStep._solve = timed(_sweep_kind, gptq.GPTQStep._solve)
gptq.GPTQStep._hessians_of = timed(lambda *_: "Hessian passes", gptq.GPTQStep._hessians_of)
gptq.inverse_factor = timed(lambda *_: "inverse factors", gptq.inverse_factor)

if __name__ == "__main__":
    sys.argv[0] = str(Path(__file__).with_name("moe_layer_bench.py"))
    start = time.perf_counter()
    runpy.run_path(sys.argv[0], run_name="__main__")
    print(f"total {time.perf_counter() - start:.1f} s")
    for kind, spent in seconds.most_common():
        print(f"{kind}: {spent:.1f} s over {counts[kind]}")

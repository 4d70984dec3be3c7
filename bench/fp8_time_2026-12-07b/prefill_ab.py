"""An FP8 checkpoint's prefill on the CPU (the simulation) with the one-pass E4M3 op (`llmquant.nn.e4m3_simulation`)
and without it, beside the float32 model, in one process, alternating: one forward of BATCH x 512 tokens, medians of
REPEATS, one thread. Also checks that both ways give the same logits.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/fp8_time_2026-12-07b/prefill_ab.py CHECKPOINT_DIR \
        [--batch 1] [--repeats 5]

CHECKPOINT_DIR: e.g. `llmquant quantize --scheme w_fp8_per_channel_a_fp8_per_token_dynamic --output DIR`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import llmquant
from llmquant.nn import e4m3_simulation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quantized, _ = llmquant.load(args.checkpoint)
    reference, _ = llmquant.load(None)
    ids = torch.randint(0, reference.config.vocab_size, (args.batch, 512), generator=torch.Generator().manual_seed(0))
    real_op = e4m3_simulation.e4m3_op
    ways = {"float32": (reference, real_op), "fp8_primitives": (quantized, lambda *_args: None),
            "fp8_op": (quantized, real_op)}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    logits = {}
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # (the first round warms up)
            for way, (model, op) in ways.items():
                e4m3_simulation.e4m3_op = op
                start = time.perf_counter()
                logits[way] = model(ids, use_cache=False).logits
                seconds[way].append(time.perf_counter() - start)
    e4m3_simulation.e4m3_op = real_op
    medians = {way: round(statistics.median(times[1:]) * 1e3, 1) for way, times in seconds.items()}
    print(json.dumps({"batch": args.batch, "tokens": 512, "median_ms": medians,
                      "op_over_primitives": round(medians["fp8_op"] / medians["fp8_primitives"], 3),
                      "float32_over_op": round(medians["float32"] / medians["fp8_op"], 3),
                      "same_logits": bool(torch.equal(logits["fp8_op"], logits["fp8_primitives"]))}))


if __name__ == "__main__":
    main()

"""Prefill speed of the int8 runtime against float32 and the simulation, as ratios measured in one run.

    .venv/bin/python scripts/benchmark_speed.py [--scheme NAME] [--batch 1] [--seqlen 512] [--repeats 5]

The three models are timed in turn, round after round, and the medians compared, so that a load on
the machine affects all three alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import llmquant
from llmquant.nn.quant_linear import set_runtime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheme", default="w_int8_per_channel_a_int8_per_token_dynamic")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    float_model, tokenizer = llmquant.load(None)
    quantized, _ = llmquant.load(None)
    llmquant.quantize(quantized, {"scheme": args.scheme, "calib": {"samples": 4}}, tokenizer, progress=False)
    ids = torch.randint(0, float_model.config.vocab_size, (args.batch, args.seqlen),
                        generator=torch.Generator().manual_seed(0))

    def simulated(x: torch.Tensor) -> torch.Tensor:
        set_runtime(quantized, "fake")
        return quantized(x, use_cache=False).logits

    def integer(x: torch.Tensor) -> torch.Tensor:
        set_runtime(quantized, "int8")
        return quantized(x, use_cache=False).logits

    runs = {"float32": lambda x: float_model(x, use_cache=False).logits, "fake": simulated, "int8": integer}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run(ids)  # warm-up
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run(ids)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.seqlen
    print(f"prefill, batch {args.batch} x {args.seqlen} tokens, median of {args.repeats} ({args.scheme}):")
    print("| model | seconds | tokens/s | speed vs float32 |\n|---|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {tokens / seconds:.0f} | x{medians['float32'] / seconds:.2f} |")


if __name__ == "__main__":
    main()

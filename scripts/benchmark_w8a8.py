"""Benchmark: schemes on the default model (perplexity and wall time); by default the eight W8A8 rows
of seed 000, and any other preset with --schemes (e.g. w_uint4_per_group_asym --group-size 64 --algo awq).

    .venv/bin/python scripts/benchmark_w8a8.py [--schemes NAME ...] [--pre-opt smoothquant --alpha 0.5|auto]
        [--calib-samples 32] [--out bench/w8a8.json]

Prints a Markdown table (scheme, ppl, ratio to float, quantization seconds) and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import llmquant
from llmquant import data
from llmquant.evaluation.perplexity import perplexity
from llmquant.quant.scheme import W8A8_SCHEMES


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemes", nargs="+", default=list(W8A8_SCHEMES))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--pre-opt", action="append", default=[], help="smoothquant | smooth_fc_fc")
    parser.add_argument("--alpha", default="0.5", help="a float in [0, 1] or auto")
    parser.add_argument("--algo", default="rtn", help="rtn | awq")
    parser.add_argument("--group-size", type=int, default=None, help="for the grouped weight-only schemes")
    parser.add_argument("--out", default="bench/w8a8.json")
    args = parser.parse_args()

    model, tokenizer = llmquant.load(None)
    windows = data.corpus_windows(tokenizer, "pydoc", args.seqlen, args.max_windows)
    float_ppl = perplexity(model, windows)
    rows = []
    for scheme in args.schemes:
        model, tokenizer = llmquant.load(None)
        alpha = args.alpha if args.alpha == "auto" else float(args.alpha)
        recipe = llmquant.Recipe.build(
            scheme=scheme,
            algorithm=args.algo,
            group_size=args.group_size,
            pre_opts=[{"name": name, "alpha": alpha} for name in args.pre_opt],
            calib={"samples": args.calib_samples, "seqlen": args.seqlen},
        )
        start = time.perf_counter()
        llmquant.quantize(model, recipe, tokenizer, progress=False)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, windows)
        rows.append({"scheme": scheme, "ppl": ppl, "ratio": ppl / float_ppl, "seconds": seconds})
        print(f"| {scheme} | {ppl:.3f} | x{ppl / float_ppl:.3f} | {seconds:.1f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "float_ppl": float_ppl,
        "pre_opts": args.pre_opt,
        "algorithm": args.algo,
        "group_size": args.group_size,
        "alpha": args.alpha,
        "calib_samples": args.calib_samples,
        "seqlen": args.seqlen,
        "windows": len(windows),
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"float ppl {float_ppl:.3f}; figures in {out}")


if __name__ == "__main__":
    main()

"""The int8 runtime (int8 GEMMs, packed W4 weights) and the simulation give the same perplexity: the four W8A8
strategies of seed 000 and W4 group 64 (the KV-cache variants differ only in the cache, which both runtimes
quantize alike without a cache object: perplexity runs without one), round to nearest, each model
quantized once and evaluated on both runtimes (DESIGN.md's protocol: pydoc eval half, 40 windows of 512).
One JSON line per scheme is appended to --out; a scheme already there is skipped.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/runtime_agreement.py [--out bench/runtime_agreement.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import llmquant
from llmquant import data
from llmquant.evaluation.perplexity import perplexity
from llmquant.nn.quant_linear import set_runtime
from llmquant.quant.scheme import W8A8_SCHEMES

RECIPES = [{"scheme": s} for s in W8A8_SCHEMES if "kv_cache" not in s] + [  # a KV cache runs alike on both
    {"scheme": "w_uint4_per_group_asym", "group_size": 64}]


def done_schemes(out: Path) -> set[str]:
    if not out.is_file():
        return set()
    return {json.dumps(json.loads(line)["recipe"]) for line in out.read_text().splitlines() if line.strip()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/runtime_agreement.jsonl")
    args = parser.parse_args()
    out = Path(args.out)
    for recipe in RECIPES:
        if json.dumps(recipe) in done_schemes(out):
            continue
        model, tokenizer = llmquant.load(None)
        windows = data.corpus_windows(tokenizer, "pydoc", 512, 40)
        llmquant.quantize(model, recipe, tokenizer, progress=False)
        figures = {}
        for runtime in ("fake", "int8"):
            set_runtime(model, runtime)
            start = time.perf_counter()
            figures[runtime] = (perplexity(model, windows), time.perf_counter() - start)
        row = {"recipe": recipe, "ppl_fake": figures["fake"][0], "ppl_int8": figures["int8"][0],
               "relative_difference": figures["int8"][0] / figures["fake"][0] - 1,
               "eval_seconds_fake": figures["fake"][1], "eval_seconds_int8": figures["int8"][1],
               "date": time.strftime("%Y-%m-%d")}
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

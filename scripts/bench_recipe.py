"""Benchmark one recipe on the default model, in its own process (so its peak memory is its own):
quantization wall time, perplexity (DESIGN.md's protocol) and its ratio to the float model's on the same
windows (evaluated first, in the same process: a ratio taken against another window count's float figure is wrong,
13.605 on pydoc's 40 windows against 12.704 on its first 20), peak resident memory; appended as one JSON line to --out.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_recipe.py NAME 'RECIPE_JSON' [--out bench/results.jsonl]
        [--runtime int8|fake] [--threads 1] [--offload DIR] [--corpora pydoc stdlib] [--set FIELD=VALUE ...]

RECIPE_JSON is a recipe as `llmquant.Recipe` takes it, e.g.
'{"scheme": "w_int4_per_group_sym", "group_size": 64, "algorithm": "gptq"}', or a recipe file
(configs/recipes/best_w4_g64.yaml), with fields changed by --set as `llmquant quantize --set` does
(scale_training.samples=512). The evaluation uses the int8
kernels where a layer has them (--runtime int8, the same function as the simulation up to float rounding).
scripts/bench_all.sh lists every recipe of BENCHMARKS.md; scripts/bench_tables.py renders the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import llmquant
from llmquant import data
from llmquant.api import as_recipe
from llmquant.evaluation.perplexity import perplexity
from llmquant.nn.quant_linear import set_runtime
from llmquant.pipeline.activations import ActivationStorage
from llmquant.pipeline.engine import peak_rss_mb
from llmquant.recipe import set_fields


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("recipe", help="the recipe as JSON, or a recipe file (.yaml, .json)")
    parser.add_argument("--out", default="bench/results.jsonl")
    parser.add_argument("--runtime", default="int8", choices=["int8", "fake"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: two runs can share 2 cores)")
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--corpora", nargs="+", default=["pydoc"], help="evaluation corpora (the first is 'ppl')")
    parser.add_argument("--offload", default=None, help="keep the calibration activations on disk in this directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (layers done, time left) on stderr")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="set a recipe field (repeatable; llmquant quantize --set)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = as_recipe(json.loads(args.recipe) if args.recipe.lstrip().startswith("{") else args.recipe)
    recipe = as_recipe(set_fields(recipe.model_dump(), args.set)) if args.set else recipe
    model, tokenizer = llmquant.load(None)
    windows = {name: data.corpus_windows(tokenizer, name, recipe.calib.seqlen, args.max_windows)
               for name in args.corpora}
    float_ppls = {name: perplexity(model, w) for name, w in windows.items()}
    start = time.perf_counter()
    llmquant.quantize(model, recipe, tokenizer, progress=not args.quiet, activations=ActivationStorage(args.offload))
    seconds = time.perf_counter() - start
    set_runtime(model, args.runtime)
    ppls = {name: perplexity(model, w) for name, w in windows.items()}
    ppl = ppls[args.corpora[0]]
    ratios = {name: ppls[name] / float_ppls[name] for name in ppls}
    manifest = model.llmquant_manifest
    row = {
        "name": args.name, "recipe": recipe.model_dump(mode="json", exclude_defaults=True), "set": args.set, "ppl": ppl,
        "quantize_seconds": seconds, "peak_rss_mb": peak_rss_mb(), "threads": args.threads,
        "runtime": args.runtime, "windows": len(windows[args.corpora[0]]), "ppl_by_corpus": ppls,
        "float_ppl_by_corpus": float_ppls, "ratio_by_corpus": ratios,
        "date": time.strftime("%Y-%m-%d"),
        "stage_seconds": manifest.seconds, "versions": manifest.versions,
        "activations": manifest.results["activations"],
        "learned_rotations": manifest.results.get("learned_rotations"),
        "clip_search": manifest.results.get("clip_search"),
        "scale_training": manifest.results.get("scale_training"),  # (kept or turned back, the held-out losses)
        "learned_online_rotations": [{"layer": row["layer"], **row["learned_online_rotations"]}
                                     for row in manifest.layers if "learned_online_rotations" in row] or None,
        "output_errors": [round(row["output_error"], 5) for row in manifest.layers if "output_error" in row],
        "block_training": [{"layer": row["layer"], **row["block_training"]}
                           for row in manifest.layers if "block_training" in row] or None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    shown = ", ".join(f"{name} {ppls[name]:.3f} (x{ratios[name]:.4f})" for name in ppls)
    print(f"{args.name}: ppl {shown}, quantization {seconds:.1f} s, peak {row['peak_rss_mb']:.0f} MiB")


if __name__ == "__main__":
    main()

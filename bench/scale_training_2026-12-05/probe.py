"""Scale training (EfficientQAT's E2E-QP, `llmquant.algorithms.scale_training`) on a saved checkpoint: the recipe's
calibration samples (the float model's targets on them for the kl loss), each config trained from the checkpoint's
scales, perplexity (int8 runtime) on pydoc and stdlib
before and after, against the float model on the same windows. One JSON line a config to --out.

    OMP_NUM_THREADS=2 .venv/bin/python bench/scale_training_2026-12-05/probe.py CHECKPOINT \
        --configs '{"epochs": 1, "lr": 1e-3}' ... [--samples 256] --out bench/scale_training_2026-12-05/probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import llmquant
from llmquant import data
from llmquant.algorithms.scale_training import ScaleTrainingConfig, teacher_targets, train_scales
from llmquant.api import as_recipe, calibration_ids
from llmquant.evaluation.perplexity import perplexity
from llmquant.nn.quant_linear import set_runtime
from llmquant.pipeline.engine import peak_rss_mb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--configs", nargs="+", required=True, help="ScaleTrainingConfig fields as JSON, one a run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--samples", type=int, default=None,
                        help="calibration samples to train on (drawn as the recipe draws its own, which are the first "
                             "ones; default: the recipe's)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    float_model, tokenizer = llmquant.load(None)
    windows = {name: data.corpus_windows(tokenizer, name, 512, args.max_windows) for name in ("pydoc", "stdlib")}
    float_ppl = {name: perplexity(float_model, w) for name, w in windows.items()}
    manifest = json.loads(Path(args.checkpoint, "llmquant.json").read_text())
    recipe = manifest["recipe"]
    if args.samples is not None:
        recipe = {**recipe, "calib": {**recipe.get("calib", {}), "samples": args.samples}}
    ids = calibration_ids(as_recipe(recipe), tokenizer)
    top_k = {json.loads(text).get("top_k", 64) for text in args.configs if json.loads(text).get("loss", "kl") == "kl"}
    teachers = {k: teacher_targets(float_model, ids, k) for k in top_k}
    del float_model
    for text in [None, *args.configs]:
        model, _ = llmquant.load(args.checkpoint, runtime="fake")
        entry: dict = {"checkpoint": args.checkpoint, "config": json.loads(text) if text else None,
                       "threads": args.threads, "samples": list(ids.shape)}
        if text is not None:
            start = time.perf_counter()
            config = ScaleTrainingConfig(**json.loads(text))
            result = train_scales(model, ids, config, teachers.get(config.top_k) if config.loss == "kl" else None)
            entry.update(training=result.describe(), seconds=round(time.perf_counter() - start, 1))
        set_runtime(model, "int8")
        ppl = {name: perplexity(model, w) for name, w in windows.items()}
        entry.update(ppl={k: round(v, 4) for k, v in ppl.items()},
                     ratio={k: round(ppl[k] / float_ppl[k], 4) for k in ppl}, peak_rss_mb=round(peak_rss_mb()))
        print(json.dumps(entry), flush=True)
        with open(args.out, "a") as out:
            out.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    main()

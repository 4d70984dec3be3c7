"""The FP8 simulation's one-pass op (`llmquant.nn.e4m3_simulation`) against the primitives it replaces, in one process
so that both see the same machine: the first LAYERS decoder layers of the default model quantized by each FP8 recipe
of `scripts/time_vs_llmcompressor.sh`, with the op and without it (`e4m3_op` returning None), alternating, REPEATS
times; one thread, the 32 calibration samples of 512 tokens. Prints one JSON line per run and the median of each, and
checks that both give the same weights and scales.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/fp8_time_2026-12-07b/op_ab.py [--layers 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import llmquant
from llmquant import data
from llmquant.api import as_recipe, calibration_ids
from llmquant.nn import e4m3_simulation

RECIPES = {
    "fp8_token_kv_tensor": {"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "kv_cache": "fp8_per_tensor"},
    "fp8_static": {"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static"},
    "fp8_static_float_calib": {"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static", "calib": {"propagate": "float"}},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = llmquant.load(None)
    model.model.layers = model.model.layers[: args.layers]
    model.config.num_hidden_layers = args.layers
    real_op = e4m3_simulation.e4m3_op
    seconds: dict[tuple[str, str], list[float]] = {}
    for name, recipe in RECIPES.items():
        recipe = as_recipe(recipe)
        ids = calibration_ids(recipe, tokenizer, data.corpus_parts("pydoc", "calib"))
        states = {}
        for repeat in range(args.repeats):
            for way in ("primitives", "op"):
                e4m3_simulation.e4m3_op = real_op if way == "op" else (lambda *_args: None)
                quantized = copy.deepcopy(model)
                start = time.perf_counter()
                llmquant.quantize(quantized, recipe, tokenizer, calib=ids, progress=False)
                elapsed = time.perf_counter() - start
                seconds.setdefault((name, way), []).append(elapsed)
                states[way] = quantized.state_dict()
                print(json.dumps({"recipe": name, "way": way, "repeat": repeat, "seconds": round(elapsed, 2)}),
                      flush=True)
        same = states["op"].keys() == states["primitives"].keys() and all(
            torch.equal(states["op"][k], states["primitives"][k]) for k in states["op"])
        op, primitives = (statistics.median(seconds[(name, way)]) for way in ("op", "primitives"))
        print(json.dumps({"recipe": name, "layers": args.layers, "median_op": round(op, 2),
                          "median_primitives": round(primitives, 2), "ratio": round(op / primitives, 3),
                          "same_weights_and_scales": same}), flush=True)
    e4m3_simulation.e4m3_op = real_op


if __name__ == "__main__":
    main()

"""Two ways of quantizing against each other in one process, so that both see the same machine: the first ``layers``
decoder layers of the default model quantized by each recipe, one way then the other, ``repeats`` times; one thread,
the recipe's calibration samples. Prints one JSON line per run and, per recipe, the medians, their ratio (second way /
first) and whether both ways gave the same weights and scales. Used by the dated A/B scripts of bench/
(`bench/fp8_time_2026-12-07b/op_ab.py`, `bench/fp8_time_2026-12-07c/error_samples_ab.py`)."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch

import llmquant
from llmquant import data
from llmquant.api import as_recipe, calibration_ids


def alternate(recipes: dict[str, dict], ways: dict[str, Callable[[], None]], layers: int, repeats: int) -> None:
    """Quantize as each of ``recipes`` says, calling ``ways[name]()`` before each run of that way (two ways)."""
    first, second = ways
    torch.set_num_threads(1)
    model, tokenizer = llmquant.load(None)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    for name, recipe in recipes.items():
        recipe = as_recipe(recipe)
        ids = calibration_ids(recipe, tokenizer, data.corpus_parts(recipe.calib.dataset, "calib"))
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        states = {}
        for repeat in range(repeats):
            for way, set_up in ways.items():
                set_up()
                quantized = copy.deepcopy(model)
                start = time.perf_counter()
                llmquant.quantize(quantized, recipe, tokenizer, calib=ids, progress=False)
                seconds[way].append(time.perf_counter() - start)
                states[way] = quantized.state_dict()
                print(json.dumps({"recipe": name, "way": way, "repeat": repeat, "seconds": round(seconds[way][-1], 2)}),
                      flush=True)
        same = states[first].keys() == states[second].keys() and all(
            torch.equal(states[first][k], states[second][k]) for k in states[first])
        medians = {way: statistics.median(values) for way, values in seconds.items()}
        print(json.dumps({"recipe": name, "layers": layers, **{f"median_{w}": round(m, 2) for w, m in medians.items()},
                          "ratio": round(medians[second] / medians[first], 3), "same_weights_and_scales": same}),
              flush=True)


def layer_args() -> argparse.Namespace:
    """The A/B scripts' options: --layers (default 6) and --repeats (default 3)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()

"""Quantization wall time of one recipe on the default model (no evaluation), one thread; the code is the one on
PYTHONPATH (`whole_runs.sh`). Prints one JSON line: the seconds and each layer's seconds.

    PYTHONPATH=src .venv/bin/python bench/fp8_time_2026-12-07b/whole_runs.py LABEL NAME RECIPE_JSON
"""

from __future__ import annotations

import json
import sys
import time

import torch

import llmquant
from llmquant.api import as_recipe
from llmquant.pipeline.activations import ActivationStorage


def main() -> None:
    torch.set_num_threads(1)
    label, name, recipe = sys.argv[1], sys.argv[2], as_recipe(json.loads(sys.argv[3]))
    model, tokenizer = llmquant.load(None)
    start = time.perf_counter()
    llmquant.quantize(model, recipe, tokenizer, progress=False, activations=ActivationStorage(None))
    print(json.dumps({"code": label, "name": name, "seconds": round(time.perf_counter() - start, 2),
                      "layer_seconds": [round(r["seconds"], 3) for r in model.llmquant_manifest.layers]}), flush=True)


if __name__ == "__main__":
    main()

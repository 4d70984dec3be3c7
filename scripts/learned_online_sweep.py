"""Settings of the learned online rotations (`learn_online`) compared on the first decoder layers of the default model.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/learned_online_sweep.py '[{"iterations": 32, "lr": 0.001}, ...]'
        [--layers 4] [--samples 16] [--out bench/learned_online_2026-12-01/sweep.jsonl]

Each setting quantizes a copy of the model cut to its first ``--layers`` decoder layers (W4A4 with the 4-bit KV cache,
R2 offline, R3, R4 and R6 online, smoothquant alpha auto, activations clipped at 0.8, round to nearest, ``--samples``
calibration samples; ``null`` for no learning) and prints one JSON line: the setting, the seconds, each layer's
quantized output error and its loss at the start and after learning. Round to nearest, so the output error of each
layer is what the learning optimised (the loss is its square).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import llmquant


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("settings", help="a JSON list of learn_online entries (null: no learning)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append the rows to this JSON-lines file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for setting in json.loads(args.settings):
        model, tokenizer = llmquant.load(None)
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
        quarot = {"name": "quarot", "rotations": ["R2", "R3", "R4", "R6"],
                  **({"learn_online": setting} if setting is not None else {})}
        recipe = {"scheme": "w_int4_per_channel_sym_a_int4_per_token_dynamic", "kv_cache": "int4_per_token_asym",
                  "pre_opts": [quarot, {"name": "smoothquant", "alpha": "auto"}],
                  "calib": {"samples": args.samples}, "activation_clip": 0.8}
        start = time.perf_counter()
        llmquant.quantize(model, recipe, tokenizer, progress=False)
        rows = model.llmquant_manifest.layers
        row = {"setting": setting, "layers": args.layers, "samples": args.samples,
               "seconds": round(time.perf_counter() - start, 1),
               "output_error": [round(r["output_error"], 4) for r in rows],
               "loss": [(round(r["learned_online_rotations"]["loss_start"], 5),
                         round(r["learned_online_rotations"]["loss_learned"], 5))
                        for r in rows if "learned_online_rotations" in r]}
        print(json.dumps(row), flush=True)
        if args.out:
            with Path(args.out).open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""Where an FP8 layer's quantization time goes (BENCHMARKS.md, "Time against llm-compressor, one run at a time"): one
thread, layer 3 of the default model, the 32 calibration samples of 512 tokens; the float pass over 32 and 8 samples,
the pass of the quantized layer (FP8 per channel / per token + FP8 KV cache per tensor, the runtime the engine
propagates with) over 32, and torch.profiler's top entries for that pass over 8.

    PYTHONPATH=src .venv/bin/python bench/fp8_kv_2026-12-07/layer_passes.py
"""

from __future__ import annotations

import copy
import time

import torch
import torch.profiler

import llmquant
from llmquant import data
from llmquant.api import as_recipe, calibration_ids
from llmquant.nn.quant_linear import set_runtime
from llmquant.pipeline import engine
from llmquant.pipeline.layer_io import capture_layer_inputs, run_layer

LAYER = 3


def timed(label: str, run) -> None:
    start = time.perf_counter()
    run()
    print(f"{label}: {time.perf_counter() - start:.3f} s")


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = llmquant.load(None, attention="model")  # (as `llmquant quantize` runs it)
    recipe = as_recipe({"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "kv_cache": "fp8_per_tensor"})
    ids = calibration_ids(recipe, tokenizer, data.corpus_parts("pydoc", "calib"))
    model_map = engine.detect_model_map(model)
    inputs = capture_layer_inputs(model, model_map, ids)
    layer = model_map.layers(model)[LAYER]
    timed("float pass, 32 samples", lambda: run_layer(layer, inputs, "layer"))
    timed("float pass, 8 samples", lambda: run_layer(layer, inputs.head(8), "layer"))
    quantized = llmquant.quantize(copy.deepcopy(model), recipe, tokenizer, calib=ids[:2], progress=False)
    quantized_layer = model_map.layers(quantized)[LAYER]
    set_runtime(quantized_layer, "int8", exact_only=True)  # (FP8: the simulation, as the engine propagates)
    timed("quantized pass, 32 samples", lambda: run_layer(quantized_layer, inputs, "layer"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run_layer(quantized_layer, inputs.head(8), "layer")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()

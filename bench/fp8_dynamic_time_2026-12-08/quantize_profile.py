"""Where FP8_DYNAMIC's quantization time goes: `llmquant.quantize` of the default model with
`w_fp8_per_channel_a_fp8_per_token_dynamic` (no calibration pass), three times in one process on one thread, each
on a freshly loaded float model; the seconds of each call, then cProfile's top entries of the third by own time.

    PYTHONPATH=src .venv/bin/python bench/fp8_dynamic_time_2026-12-08/quantize_profile.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

import llmquant
from llmquant.model.loading import load_float

SCHEME = "w_fp8_per_channel_a_fp8_per_token_dynamic"


def main() -> None:
    torch.set_num_threads(1)
    profile = cProfile.Profile()
    for call in range(3):
        model, tokenizer = load_float()
        start = time.perf_counter()
        if call == 2:
            profile.enable()
        llmquant.quantize(model, {"scheme": SCHEME}, tokenizer, progress=False)
        if call == 2:
            profile.disable()
        print(f"call {call}: {time.perf_counter() - start:.3f} s, manifest seconds {model.llmquant_manifest.seconds}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()

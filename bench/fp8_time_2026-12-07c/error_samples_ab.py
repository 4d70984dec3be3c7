"""The passes that only serve the error figures on the first sample (`engine.ERROR_SAMPLES` 1) against the first
batch (8, before), in one process (`scripts/quantize_ab.py`): the first LAYERS decoder layers of the default model
quantized by each FP8 recipe that has such a pass, alternating, REPEATS times; one thread, the 32 calibration samples
of 512 tokens. Prints one JSON line per run and the medians, and checks that both give the same weights and scales
(the error figures differ: they are measured on other samples). `error_samples_ab.txt` was printed before the harness
moved to `scripts/quantize_ab.py`: the same runs, with the keys ``error_samples`` and ``median_1``/``median_8``.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/fp8_time_2026-12-07c/error_samples_ab.py [--layers 6]
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmquant.pipeline import engine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from quantize_ab import alternate, layer_args

RECIPES = {  # (the KV-cache recipe's reference pass with quantized propagation, the quantized pass with float's)
    "fp8_token_kv_tensor_quantized_calib": {"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic",
                                            "kv_cache": "fp8_per_tensor", "calib": {"propagate": "quantized"}},
    "fp8_token_kv_tensor_float_calib": {"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic",
                                        "kv_cache": "fp8_per_tensor", "calib": {"propagate": "float"}},
    "fp8_static_float_calib": {"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static", "calib": {"propagate": "float"}},
}


def error_samples(count: int):
    def set_up() -> None:
        engine.ERROR_SAMPLES = count

    return set_up


def main() -> None:
    args = layer_args()
    alternate(RECIPES, {"8": error_samples(8), "1": error_samples(1)}, args.layers, args.repeats)


if __name__ == "__main__":
    main()

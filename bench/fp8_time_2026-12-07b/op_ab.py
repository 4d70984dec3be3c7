"""The FP8 simulation's one-pass op (`llmquant.nn.e4m3_simulation`) against the primitives it replaces, in one process
so that both see the same machine (`scripts/quantize_ab.py`): the first LAYERS decoder layers of the default model
quantized by each FP8 recipe of `scripts/time_vs_llmcompressor.sh`, with the op and without it (`e4m3_op` returning
None), alternating, REPEATS times; one thread, the 32 calibration samples of 512 tokens. Prints one JSON line per run
and the median of each, and checks that both give the same weights and scales. (`op_ab.txt` was printed before the
harness moved to `scripts/quantize_ab.py`, in the same form but with the keys ``median_op``/``median_primitives``.)
Since 2026-12-07 (a ninth session) the recipes name their calibration as they ran then.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/fp8_time_2026-12-07b/op_ab.py [--layers 6] [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmquant.nn import e4m3_simulation

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from quantize_ab import alternate, layer_args

RECIPES = {
    "fp8_token_kv_tensor": {"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "kv_cache": "fp8_per_tensor",
                            "calib": {"propagate": "quantized"}},
    "fp8_static": {"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static", "calib": {"propagate": "quantized"}},
    "fp8_static_float_calib": {"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static", "calib": {"propagate": "float"}},
}
REAL_OP = e4m3_simulation.e4m3_op


def with_op(real: bool):
    def set_up() -> None:
        e4m3_simulation.e4m3_op = REAL_OP if real else (lambda *_args: None)

    return set_up


def main() -> None:
    args = layer_args()
    try:
        alternate(RECIPES, {"primitives": with_op(False), "op": with_op(True)}, args.layers, args.repeats)
    finally:
        e4m3_simulation.e4m3_op = REAL_OP


if __name__ == "__main__":
    main()

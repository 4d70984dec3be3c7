#!/usr/bin/env bash
# Int8 per-tensor weights with per-tensor static inputs (seed 000's worst row), three smoothing methods, calibrated on
# the quantized model's activations and on the float model's (`calib.propagate`), one thread, one run at a time:
#     bash bench/propagation_2026-12-08/run.sh          (resumable: finished cells are kept)
# Tables: bench/propagation_2026-12-08/{quantized,float}/sweep.md
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for propagate in quantized float; do
    .venv/bin/llmquant sweep --quiet --output "bench/propagation_2026-12-08/$propagate" \
        --set "calib.propagate=$propagate" --schemes w_int8_per_tensor_a_int8_per_tensor_static \
        --methods smooth_0.5 smooth_fc_fc_0.5+rotation smooth_0.85
done

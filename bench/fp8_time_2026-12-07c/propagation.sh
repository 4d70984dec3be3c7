#!/usr/bin/env bash
# Round-to-nearest recipes with static scales calibrated on the quantized model's activations (the default before
# this folder's change) and on the float model's (`calib: {propagate: float}`), one thread each:
#     bash bench/fp8_time_2026-12-07c/propagation.sh OUT.jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=$1
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
run() {  # NAME RECIPE_JSON
    if [ -f "$OUT" ] && grep -q "\"name\": \"$1\"" "$OUT"; then return; fi
    echo "$(date +%T) $1"
    .venv/bin/python scripts/bench_recipe.py "$1" "$2" --quiet --out "$OUT"
}
STATIC=w_int8_per_channel_a_int8_per_tensor_static
SQ='"pre_opts": [{"name": "smoothquant", "alpha": 0.85}]'
KV='"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "kv_cache": "int8_per_tensor"'
for propagate in quantized float; do
    run "int8_static_sq085_$propagate" "{\"scheme\": \"$STATIC\", $SQ, \"calib\": {\"propagate\": \"$propagate\"}}"
    run "int8_token_kv_int8_$propagate" "{$KV, \"calib\": {\"propagate\": \"$propagate\"}}"
done

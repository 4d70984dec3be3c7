#!/usr/bin/env bash
# llm-compressor's FP8 presets against llmquant's defaults for the same schemes, over several draws of the 32
# calibration windows (`calib.seed`, compare_llmcompressor.py's --calib-seed), one run at a time, one thread each:
#     bash bench/fp8_seeds_2026-12-08/seeds.sh OUT_DIR [SEEDS...]        (default seeds 0 1 2 3)
# Static FP8 scales move with the windows drawn and with float rounding; the mean over draws says whether one tool's
# perplexity is lower, which one draw cannot. A name already in OUT_DIR is skipped, so a rerun resumes.
# Table: .venv/bin/python bench/fp8_seeds_2026-12-08/table.py OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=$1
shift
SEEDS=${*:-0 1 2 3}
LLMC=${LLMC:-/tmp/llmc/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT_DIR"
TOKEN=w_fp8_per_channel_a_fp8_per_token_dynamic
STATIC=w_fp8_per_tensor_a_fp8_per_tensor_static
theirs() {  # NAME ARGS...
    local name=$1; shift
    [ -f "$OUT_DIR/llmc_$name.json" ] && return
    echo "$(date +%T) llm-compressor $name"
    PYTHONPATH=src "$LLMC" scripts/compare_llmcompressor.py "$@" --out "$OUT_DIR/llmc_$name.json"
}
ours() {  # NAME RECIPE_JSON
    if [ -f "$OUT_DIR/ours.jsonl" ] && grep -q "\"name\": \"$1\"" "$OUT_DIR/ours.jsonl"; then return; fi
    echo "$(date +%T) llmquant $1"
    PYTHONPATH=src .venv/bin/python scripts/bench_recipe.py "$1" "$2" --quiet --out "$OUT_DIR/ours.jsonl"
}
for seed in $SEEDS; do
    theirs "fp8_static_seed$seed" --schemes $STATIC --calib-seed "$seed"
    ours "fp8_static_seed$seed" "{\"scheme\": \"$STATIC\", \"calib\": {\"seed\": $seed}}"
    theirs "fp8_token_kv_tensor_seed$seed" --schemes $TOKEN --kv-cache-fp8 --calib-seed "$seed"
    ours "fp8_token_kv_tensor_seed$seed" \
        "{\"scheme\": \"$TOKEN\", \"kv_cache\": \"fp8_per_tensor\", \"calib\": {\"seed\": $seed}}"
done

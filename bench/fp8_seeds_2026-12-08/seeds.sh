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
source scripts/llmc_pair_runs.sh
TOKEN=w_fp8_per_channel_a_fp8_per_token_dynamic
STATIC=w_fp8_per_tensor_a_fp8_per_tensor_static
for seed in $SEEDS; do
    theirs "fp8_static_seed$seed" --schemes $STATIC --calib-seed "$seed"
    ours "fp8_static_seed$seed" "{\"scheme\": \"$STATIC\", \"calib\": {\"seed\": $seed}}"
    theirs "fp8_token_kv_tensor_seed$seed" --schemes $TOKEN --kv-cache-fp8 --calib-seed "$seed"
    ours "fp8_token_kv_tensor_seed$seed" \
        "{\"scheme\": \"$TOKEN\", \"kv_cache\": \"fp8_per_tensor\", \"calib\": {\"seed\": $seed}}"
done

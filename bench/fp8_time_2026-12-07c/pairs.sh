#!/usr/bin/env bash
# llm-compressor's FP8 presets against llmquant's FP8 recipes, one run at a time, alternating, one thread each
# (LLMC: the environment of scripts/llmcompressor_env.sh; SRC: the llmquant source to time, default this checkout's):
#     bash bench/fp8_time_2026-12-07c/pairs.sh OUT_DIR [SRC]
# Each recipe with the default calibration (the quantized model's activations) and calibrated as llm-compressor
# calibrates (`calib: {propagate: float}`). A name already in OUT_DIR is skipped, so a rerun resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=$1
SRC=${2:-src}
source scripts/llmc_pair_runs.sh
TOKEN=w_fp8_per_channel_a_fp8_per_token_dynamic
STATIC=w_fp8_per_tensor_a_fp8_per_tensor_static
theirs fp8_static --schemes $STATIC
ours fp8_static "{\"scheme\": \"$STATIC\"}"
ours fp8_static_float_calib "{\"scheme\": \"$STATIC\", \"calib\": {\"propagate\": \"float\"}}"
theirs fp8_token_kv_tensor --schemes $TOKEN --kv-cache-fp8
ours fp8_token_kv_tensor "{\"scheme\": \"$TOKEN\", \"kv_cache\": \"fp8_per_tensor\"}"
ours fp8_token_kv_tensor_float_calib \
    "{\"scheme\": \"$TOKEN\", \"kv_cache\": \"fp8_per_tensor\", \"calib\": {\"propagate\": \"float\"}}"

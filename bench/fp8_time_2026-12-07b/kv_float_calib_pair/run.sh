#!/usr/bin/env bash
# The pair of BENCHMARKS.md ("FP8 again, later on 12-07"), llm-compressor first, then llmquant, one thread each
# (LLMC: the environment of scripts/llmcompressor_env.sh): bash bench/fp8_time_2026-12-07b/kv_float_calib_pair/run.sh
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
D=bench/fp8_time_2026-12-07b/kv_float_calib_pair
PYTHONPATH=src "${LLMC:-/tmp/llmc/bin/python}" scripts/compare_llmcompressor.py \
    --schemes w_fp8_per_channel_a_fp8_per_token_dynamic --kv-cache-fp8 --out $D/llmc_fp8_token_kv_tensor.json
.venv/bin/python scripts/bench_recipe.py fp8_token_kv_tensor_float_calib \
    '{"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "kv_cache": "fp8_per_tensor", "calib": {"propagate": "float"}}' \
    --quiet --out $D/ours.jsonl

#!/usr/bin/env bash
# Wall time against llm-compressor, one run at a time on an otherwise idle machine, one thread each:
# the same recipe by llmquant (scripts/bench_recipe.py -> bench/timing_alone.jsonl) and by llm-compressor
# (scripts/compare_llmcompressor.py -> bench/llmc_timing_alone_<name>.json), alternating, so that both see
# the same machine. Needs the throw-away environment of scripts/llmcompressor_env.sh (/tmp/llmc).
#
#     bash scripts/time_vs_llmcompressor.sh        then: .venv/bin/python scripts/bench_tables.py
set -euo pipefail
cd "$(dirname "$0")/.."
LLMC=${LLMC:-/tmp/llmc/bin/python}
OUT=bench/timing_alone.jsonl
source scripts/bench_lib.sh  # run NAME RECIPE_JSON (ours)

theirs() {  # NAME ARGS...
    local name=$1; shift
    if [ -f "bench/llmc_timing_alone_$name.json" ]; then echo "skip llm-compressor $name"; return; fi
    echo "$(date +%T) llm-compressor $name"
    PYTHONPATH=src "$LLMC" scripts/compare_llmcompressor.py "$@" --out "bench/llmc_timing_alone_$name.json"
}

TOKEN=w_int8_per_channel_a_int8_per_token_dynamic
STATIC=w_int8_per_channel_a_int8_per_tensor_static
run sq05_token "{\"scheme\": \"$TOKEN\", \"pre_opts\": [{\"name\": \"smoothquant\", \"alpha\": 0.5}]}"
theirs sq05_token --alpha 0.5 --schemes $TOKEN
run sq05_static "{\"scheme\": \"$STATIC\", \"pre_opts\": [{\"name\": \"smoothquant\", \"alpha\": 0.5}]}"
theirs sq05_static --alpha 0.5 --schemes $STATIC
run w4_g64_asym_gptq '{"scheme": "w_uint4_per_group_asym", "group_size": 64, "algorithm": "gptq"}'
theirs w4_g64_asym_gptq --algorithm gptq --group-size 64 --schemes w_uint4_per_group_asym
# GPTQ with every Hessian of a layer from its float pass, as llm-compressor takes them
run w4_g64_asym_gptq_float_hessians '{"scheme": "w_uint4_per_group_asym", "group_size": 64, "algorithm": "gptq", "gptq": {"true_sequential": false}}'
# the cost of keeping the calibration activations on disk (--activations disk), on the same recipe
run w4_g64_asym_gptq_offloaded '{"scheme": "w_uint4_per_group_asym", "group_size": 64, "algorithm": "gptq"}' \
    --offload "${TMPDIR:-/tmp}/llmquant-offload"
# FP8 (issue 18): FP8_DYNAMIC with the FP8 KV cache per tensor, and the preset FP8 (per tensor static), each also
# calibrated as llm-compressor calibrates (every layer on the float model's activations: `calib: {propagate: float}`)
FP8_TOKEN=w_fp8_per_channel_a_fp8_per_token_dynamic
FP8_STATIC=w_fp8_per_tensor_a_fp8_per_tensor_static
run fp8_token_kv_tensor "{\"scheme\": \"$FP8_TOKEN\", \"kv_cache\": \"fp8_per_tensor\"}"
run fp8_token_kv_tensor_float_calib \
    "{\"scheme\": \"$FP8_TOKEN\", \"kv_cache\": \"fp8_per_tensor\", \"calib\": {\"propagate\": \"float\"}}"
theirs fp8_token_kv_tensor --schemes $FP8_TOKEN --kv-cache-fp8
run fp8_static "{\"scheme\": \"$FP8_STATIC\"}"
run fp8_static_float_calib "{\"scheme\": \"$FP8_STATIC\", \"calib\": {\"propagate\": \"float\"}}"
theirs fp8_static --schemes $FP8_STATIC

#!/usr/bin/env bash
# Wall time against llm-compressor, one run at a time on an otherwise idle machine, one thread each:
# the same recipe by llmquant (scripts/bench_recipe.py -> bench/timing_alone.jsonl) and by llm-compressor
# (scripts/compare_llmcompressor.py -> bench/llmc_timing_alone_<name>.json), alternating, so that both see
# the same machine. Needs the throw-away environment of scripts/llmcompressor_env.sh (/tmp/llmc).
#
#     bash scripts/time_vs_llmcompressor.sh        then: .venv/bin/python scripts/bench_tables.py
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
LLMC=${LLMC:-/tmp/llmc/bin/python}
OUT=bench/timing_alone.jsonl

ours() {  # NAME RECIPE_JSON
    if [ -f "$OUT" ] && grep -q "\"name\": \"$1\"" "$OUT"; then echo "skip llmquant $1"; return; fi
    echo "$(date +%T) llmquant $1"
    .venv/bin/python scripts/bench_recipe.py "$1" "$2" --out "$OUT"
}

theirs() {  # NAME ARGS...
    local name=$1; shift
    if [ -f "bench/llmc_timing_alone_$name.json" ]; then echo "skip llm-compressor $name"; return; fi
    echo "$(date +%T) llm-compressor $name"
    PYTHONPATH=src "$LLMC" scripts/compare_llmcompressor.py "$@" --out "bench/llmc_timing_alone_$name.json"
}

TOKEN=w_int8_per_channel_a_int8_per_token_dynamic
STATIC=w_int8_per_channel_a_int8_per_tensor_static
ours sq05_token "{\"scheme\": \"$TOKEN\", \"pre_opts\": [{\"name\": \"smoothquant\", \"alpha\": 0.5}]}"
theirs sq05_token --alpha 0.5 --schemes $TOKEN
ours sq05_static "{\"scheme\": \"$STATIC\", \"pre_opts\": [{\"name\": \"smoothquant\", \"alpha\": 0.5}]}"
theirs sq05_static --alpha 0.5 --schemes $STATIC
ours w4_g64_asym_gptq '{"scheme": "w_uint4_per_group_asym", "group_size": 64, "algorithm": "gptq"}'
theirs w4_g64_asym_gptq --algorithm gptq --group-size 64 --schemes w_uint4_per_group_asym

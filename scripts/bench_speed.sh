#!/usr/bin/env bash
# Size and speed figures of BENCHMARKS.md: round-to-nearest checkpoints of the default model, each measured by
# `llmquant bench` against the float32 model in the same run (bench/speed_<name>.json; a name already there is
# skipped). The checkpoints stay in $CK for scripts/benchmark_vllm.py.
#
#     bash scripts/bench_speed.sh            CK=/tmp/ck by default
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
CK=${CK:-/tmp/ck}
L=.venv/bin/llmquant

speed() {  # NAME QUANTIZE_FLAGS...
    local name=$1; shift
    [ -f "$CK/$name/config.json" ] || $L quantize --quiet --no-eval "$@" --output "$CK/$name"
    [ -f "bench/speed_$name.json" ] || $L bench --model "$CK/$name" --batch 1 8 --prompt 512 --decode 32 \
        --repeats 3 --json | tail -1 > "bench/speed_$name.json"
}

speed none_quarot --scheme none --pre-opt quarot          # the cost of the online rotations R3 + R4
speed w8a8_token --scheme w_int8_per_channel_a_int8_per_token_dynamic
speed w8a8_static --scheme w_int8_per_channel_a_int8_per_tensor_static
speed w4_g64 --scheme w_uint4_per_group_asym --group-size 64

#!/usr/bin/env bash
# Size and speed figures of BENCHMARKS.md: round-to-nearest checkpoints of the default model, each measured by
# `llmquant bench` against the float32 model in the same run ($OUT/speed_<name>.json; a name already there is
# skipped). The checkpoints stay in $CK for scripts/benchmark_vllm.py. On another machine, give it its own OUT
# (OUT=bench/speed_<date>_<cpu>): the machine's line is kept there as machine.txt.
#
#     bash scripts/bench_speed.sh            CK=/tmp/ck, OUT=bench by default
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-1}  # THREADS=2 bash scripts/bench_speed.sh: the same on two threads (bench/speed_<name>_t2.json)
ONLY=${ONLY:-}  # ONLY="w8a8_token w4_g64": only these names' figures (and no KV decode profile unless w8a8_token_kv8)
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
CK=${CK:-/tmp/ck}
OUT=${OUT:-bench}
mkdir -p "$OUT"
L=.venv/bin/llmquant
SUFFIX=$([ "$THREADS" = 1 ] && echo "" || echo "_t$THREADS")
# the machine the figures belong to: CPU model (with its family and model numbers: one name covers several
# generations), the ISA extensions the int8 kernels use, threads, versions
{
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1) (family $(lscpu | sed -n 's/^CPU family: *//p' | head -1), model $(lscpu | sed -n 's/^Model: *//p' | head -1)); $(grep -o -w 'avx2\|avx512f\|avx512_vnni\|avx512_bf16\|amx_int8\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "threads: $THREADS; $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
} | tee -a "$OUT/machine.txt"

measure() {  # NAME CHECKPOINT BENCH_FLAGS...: its figures, written whole (an interrupted run leaves none);
    # also a checkpoint made above, measured with other runtime choices
    local name=$1 checkpoint=$2; shift 2
    local file="$OUT/speed_$name$SUFFIX.json"
    if [ -s "$file" ] || ! chosen "$name"; then return; fi
    $L bench --model "$CK/$checkpoint" --batch 1 8 --prompt 512 --decode 32 --repeats 3 --json "$@" | tail -1 \
        > "$file.partial"
    mv "$file.partial" "$file"
}

chosen() {  # NAME: measured in this run (every name without ONLY)
    [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]
}

speed() {  # NAME QUANTIZE_FLAGS...
    local name=$1; shift
    chosen "$name" || return 0
    [ -f "$CK/$name/config.json" ] || $L quantize --quiet --no-eval "$@" --output "$CK/$name"
    measure "$name" "$name"
}

speed none_quarot --scheme none --pre-opt quarot          # the cost of the online rotations R3 + R4
speed w8a8_token --scheme w_int8_per_channel_a_int8_per_token_dynamic
speed w8a8_static --scheme w_int8_per_channel_a_int8_per_tensor_static
speed w4_g64 --scheme w_uint4_per_group_asym --group-size 64
speed w3_g64 --scheme w_uint3_per_group_asym --group-size 64   # 3-bit fields run as 4-bit ones
speed w8a8_token_kv8 --scheme w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic
measure w8a8_token_bf16_attention w8a8_token --attention bfloat16  # its attention in bfloat16 (float32: the baseline)
# the rows above run the quantized model's attention in causal blocks (the default, `llmquant.nn.causal_blocks`) and
# the float32 baseline's as transformers runs it; this one runs both as transformers does: the int8 Linears' own gain
measure w8a8_token_model_attention w8a8_token --attention model
# W4A4: 4-bit inputs per token (asymmetric, clip searched per token) and in groups of 32 (best_w4a4kv4*.yaml's kernels)
speed w4a4_token --scheme w_int4_per_channel_sym_a_uint4_per_token_asym_dynamic \
    --activation-clip-grid 0.9 0.85 0.8 0.75 0.7
speed w4a4_g32 --scheme w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic --group-size 32 \
    --activation-clip-grid 1.0 0.95 0.9 0.85 0.8
# the INT8 KV cache's decode cost: the same scheme with and without it, step by step in one process
if chosen w8a8_token_kv8; then
    for batch in 1 8; do
        .venv/bin/python scripts/runtime_profile.py kv --model "$CK/w8a8_token_kv8" --baseline "$CK/w8a8_token" \
            --batch "$batch" --threads "$THREADS" | tail -2 | tee -a "$OUT/kv_decode$SUFFIX.txt"
    done
fi

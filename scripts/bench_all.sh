#!/usr/bin/env bash
# Every single-recipe figure of BENCHMARKS.md, one recipe per process on one thread (two lanes can share
# the two cores), appended to bench/results.jsonl; a name already there is skipped, so a rerun resumes.
#
#     bash scripts/bench_all.sh [w8a8|w4|seed003|lowbit|gptaq|best|all]      then: .venv/bin/python scripts/bench_tables.py
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results.jsonl}
source scripts/bench_lib.sh  # run NAME RECIPE_JSON

R12='{"name": "quarot", "rotations": ["R1", "R2"], "online_had": false}'
QUAROT='{"name": "quarot"}'
SQ_AUTO='{"name": "smoothquant", "alpha": "auto"}'
SQ085='{"name": "smoothquant", "alpha": 0.85}'
STATIC=w_int8_per_channel_a_int8_per_tensor_static
TOKEN=w_int8_per_channel_a_int8_per_token_dynamic

w8a8() {
    run token_quarot_gptq "{\"scheme\": \"$TOKEN\", \"algorithm\": \"gptq\", \"pre_opts\": [$QUAROT]}"
    run static_r12_sqauto_gptq "{\"scheme\": \"$STATIC\", \"algorithm\": \"gptq\", \"pre_opts\": [$R12, $SQ_AUTO]}"
    run token_r12_gptq "{\"scheme\": \"$TOKEN\", \"algorithm\": \"gptq\", \"pre_opts\": [$R12]}"
    run static_sq085_gptq "{\"scheme\": \"$STATIC\", \"algorithm\": \"gptq\", \"pre_opts\": [$SQ085]}"
    run static_sqauto_gptq "{\"scheme\": \"$STATIC\", \"algorithm\": \"gptq\", \"pre_opts\": [$SQ_AUTO]}"
    # the best W8A8 recipes with every Hessian of a layer from its float pass
    run static_sqauto_gptq_float_hessians "{\"scheme\": \"$STATIC\", \"algorithm\": \"gptq\", \"gptq\": {\"true_sequential\": false}, \"pre_opts\": [$SQ_AUTO]}"
    run token_quarot_gptq_float_hessians "{\"scheme\": \"$TOKEN\", \"algorithm\": \"gptq\", \"gptq\": {\"true_sequential\": false}, \"pre_opts\": [$QUAROT]}"
}

w4_g64() {
    for algo in rtn gptq awq; do
        run "w4_g64_asym_$algo" "{\"scheme\": \"w_uint4_per_group_asym\", \"group_size\": 64, \"algorithm\": \"$algo\"}"
        run "w4_g64_sym_$algo" "{\"scheme\": \"w_int4_per_group_sym\", \"group_size\": 64, \"algorithm\": \"$algo\"}"
    done
}

w4_gptq_variants() {  # the W4 g64 GPTQ variants of BENCHMARKS.md (activation order is the default)
    run w4_g64_asym_gptq_actorder '{"scheme": "w_uint4_per_group_asym", "group_size": 64, "algorithm": "gptq", "gptq": {"act_order": true}}'
    run w4_g64_asym_gptq_actorder_mse '{"scheme": "w_uint4_per_group_asym", "group_size": 64, "algorithm": "gptq", "gptq": {"act_order": true}, "weight_observer": "mse"}'
    run w4_g64_asym_r12_gptq_mse "{\"scheme\": \"w_uint4_per_group_asym\", \"group_size\": 64, \"algorithm\": \"gptq\", \"weight_observer\": \"mse\", \"pre_opts\": [$R12]}"
    # every Hessian of a layer from its float pass (llm-compressor's way) instead of true-sequential stages
    run w4_g64_asym_gptq_float_hessians '{"scheme": "w_uint4_per_group_asym", "group_size": 64, "algorithm": "gptq", "gptq": {"true_sequential": false}}'
    run w4_g64_sym_gptq_actorder '{"scheme": "w_int4_per_group_sym", "group_size": 64, "algorithm": "gptq", "gptq": {"act_order": true}}'
    run w4_g64_sym_gptq_float_hessians '{"scheme": "w_int4_per_group_sym", "group_size": 64, "algorithm": "gptq", "gptq": {"true_sequential": false}}'
    run w4_g64_asym_gptq_float_hessians_mse '{"scheme": "w_uint4_per_group_asym", "group_size": 64, "algorithm": "gptq", "gptq": {"true_sequential": false}, "weight_observer": "mse"}'
    run w4_g64_asym_r12_gptq_mse_float_hessians "{\"scheme\": \"w_uint4_per_group_asym\", \"group_size\": 64, \"algorithm\": \"gptq\", \"gptq\": {\"true_sequential\": false}, \"weight_observer\": \"mse\", \"pre_opts\": [$R12]}"
}

w4_more() {  # 576 inputs: with groups of 128, q/k/v/gate/up fall back to groups of 64, the rest keep 128
    run w4_g128_asym_gptq "{\"scheme\": \"w_uint4_per_group_asym\", \"group_size\": 128, \"algorithm\": \"gptq\"}"
    run w3_g64_asym_rtn "{\"scheme\": \"w_uint3_per_group_asym\", \"group_size\": 64, \"algorithm\": \"rtn\"}"
    run w3_g64_asym_gptq "{\"scheme\": \"w_uint3_per_group_asym\", \"group_size\": 64, \"algorithm\": \"gptq\"}"
    run w4_g128_asym_rtn "{\"scheme\": \"w_uint4_per_group_asym\", \"group_size\": 128, \"algorithm\": \"rtn\"}"
    run w4_g128_asym_awq "{\"scheme\": \"w_uint4_per_group_asym\", \"group_size\": 128, \"algorithm\": \"awq\"}"
    run w3_g64_asym_awq "{\"scheme\": \"w_uint3_per_group_asym\", \"group_size\": 64, \"algorithm\": \"awq\"}"
}

seed003() {  # QuaRot's tables: weight-only int8 per tensor with and without R1+R2; W8A8 static with and without QuaRot
    run seed003_w8_per_tensor '{"scheme": "w_int8_per_tensor"}'
    run seed003_w8_per_tensor_r12 "{\"scheme\": \"w_int8_per_tensor\", \"pre_opts\": [$R12]}"
    run seed003_w8a8_static '{"scheme": "w_int8_per_tensor_a_int8_per_tensor_static"}'
    run seed003_w8a8_static_quarot "{\"scheme\": \"w_int8_per_tensor_a_int8_per_tensor_static\", \"pre_opts\": [$QUAROT]}"
    run none_quarot "{\"scheme\": \"none\", \"pre_opts\": [$QUAROT]}"
    run none_smooth_auto "{\"scheme\": \"none\", \"pre_opts\": [$SQ_AUTO]}"
    run none_smooth_auto_heldout "{\"scheme\": \"none\", \"pre_opts\": [$SQ_AUTO]}"  # after the held-out search
}

lowbit() {  # issue 19's table, most telling cells first: W4A4, W4A4KV4, W4A8 by Hadamard (QuaRot) and learned
    # (SpinQuant) rotations + GPTQ, with and without the clip search, then W3 and W4 g64, then the cells without a
    # rotation; on pydoc and the stdlib corpus. LANE=k LANES=n runs every n-th cell from the k-th (two lanes share
    # the two cores).
    local w4a8='"scheme": "w_int4_per_group_sym_a_int8_per_token_dynamic", "group_size": 64'
    local w4a4='"scheme": "w_int4_per_channel_sym_a_int4_per_token_dynamic"'
    local w4a4kv4="$w4a4, \"kv_cache\": \"int4_per_token_asym\""
    local w3='"scheme": "w_uint3_per_group_asym", "group_size": 64'
    local w4='"scheme": "w_uint4_per_group_asym", "group_size": 64'
    local learned="{\"name\": \"quarot\", \"learn\": {\"iterations\": ${LEARN_STEPS:-100}, \"lr\": ${LEARN_LR:-0.1}}}"
    local gptq='"algorithm": "gptq"' clip='"clip_search": {"samples": 4}'
    local cells=("lb_float" '{"scheme": "none"}')
    for row in w4a4 w4a4kv4 w4a8; do
        local fields=${!row}
        cells+=("lb_${row}_quarot_gptq" "{$fields, $gptq, \"pre_opts\": [$QUAROT]}"
                "lb_${row}_quarot_gptq_clip" "{$fields, $gptq, \"pre_opts\": [$QUAROT], $clip}"
                "lb_${row}_learned_gptq" "{$fields, $gptq, \"pre_opts\": [$learned]}"
                "lb_${row}_learned_gptq_clip" "{$fields, $gptq, \"pre_opts\": [$learned], $clip}")
    done
    for row in w3 w4; do
        local fields=${!row}
        cells+=("lb_${row}_quarot_gptq" "{$fields, $gptq, \"pre_opts\": [$QUAROT]}"
                "lb_${row}_learned_gptq" "{$fields, $gptq, \"pre_opts\": [$learned]}")
    done
    for row in w4a4 w4a4kv4 w4a8 w3 w4; do  # the table's last column: QuaRot + GPTAQ (GPTQ aimed at the float model)
        local fields=${!row}
        cells+=("lb_${row}_quarot_gptaq" "{$fields, \"algorithm\": \"gptq\", \"gptq\": {\"asymmetric\": 0.25}, \"pre_opts\": [$QUAROT]}")
    done
    for row in w4a4 w4a4kv4 w4a8 w3 w4; do
        local fields=${!row}
        cells+=("lb_${row}_rtn" "{$fields}" "lb_${row}_gptq" "{$fields, $gptq}")
    done
    # llm-compressor's SpinQuantModifier rotations (R1 + R2, nothing online) for the side-by-side with it
    cells+=("lb_w4a8_r12_gptq" "{$w4a8, $gptq, \"pre_opts\": [$R12]}")
    local lanes=${LANES:-1} lane=${LANE:-0}
    for ((i = 0; i < ${#cells[@]} / 2; i++)); do
        if ((i % lanes == lane)); then run "${cells[2 * i]}" "${cells[2 * i + 1]}" --corpora pydoc stdlib; fi
    done
}

gptaq() {  # GPTAQ (gptq: {asymmetric: A}) on the best GPTQ recipe of each row (true-sequential Hessians), A = 0 (plain GPTQ) beside
    # A = ${ALPHA:-0.25}, on pydoc and the stdlib corpus; LANE=k LANES=n as in lowbit (two lanes: each pair side by side)
    local a=${ALPHA:-0.25} clip='"clip_search": {"samples": 4}'
    local r124='{"name": "quarot", "rotations": ["R1", "R2", "R4"]}'
    local rows=(  # NAME and the recipe's fields but GPTQ's, which end with the asymmetric alpha
        w4_g64_best "\"scheme\": \"w_uint4_per_group_asym\", \"group_size\": 64, \"weight_observer\": \"mse\", \"pre_opts\": [$R12], \"gptq\": {"
        w4a8_best "\"scheme\": \"w_int4_per_group_sym_a_int8_per_token_dynamic\", \"group_size\": 64, \"pre_opts\": [$QUAROT], $clip, \"gptq\": {"
        w3_g64_quarot "\"scheme\": \"w_uint3_per_group_asym\", \"group_size\": 64, \"pre_opts\": [$QUAROT], \"gptq\": {"
        w4a4kv4_best "\"scheme\": \"w_int4_per_channel_sym_a_int4_per_token_dynamic\", \"kv_cache\": \"int4_per_token_asym\", \"pre_opts\": [$QUAROT], $clip, \"gptq\": {"
        fp8_token_gptq "\"scheme\": \"w_fp8_per_channel_a_fp8_per_token_dynamic\", \"gptq\": {"
        w8a8_token_best "\"scheme\": \"$TOKEN\", \"pre_opts\": [$r124], \"gptq\": {"
        w8a8_static_best "\"scheme\": \"$STATIC\", \"pre_opts\": [$SQ_AUTO], \"gptq\": {")
    local cells=()
    for ((r = 0; r < ${#rows[@]} / 2; r++)); do
        for alpha in 0 "$a"; do
            cells+=("gq_${rows[2 * r]}_a${alpha/./}" "{\"algorithm\": \"gptq\", ${rows[2 * r + 1]} \"asymmetric\": $alpha}}")
        done
    done
    local lanes=${LANES:-1} lane=${LANE:-0}
    for ((i = 0; i < ${#cells[@]} / 2; i++)); do
        if ((i % lanes == lane)); then run "${cells[2 * i]}" "${cells[2 * i + 1]}" --corpora pydoc stdlib; fi
    done
}

best() {  # every configs/recipes/best_*.yaml as it is, on pydoc and the stdlib corpus; LANE=k LANES=n as in lowbit
    local lanes=${LANES:-1} lane=${LANE:-0} i=0
    for file in configs/recipes/best_*.yaml; do
        if ((i++ % lanes == lane)); then run "$(basename "$file" .yaml)" "$file" --corpora pydoc stdlib; fi
    done
}

case "${1:-all}" in
    w8a8) w8a8 ;;
    seed003) seed003 ;;
    lowbit) lowbit ;;
    gptaq) gptaq ;;
    best) best ;;
    w4) w4_g64; w4_gptq_variants; w4_more ;;
    all) w4_g64; w4_gptq_variants; w8a8; seed003; w4_more ;;
    *) echo "usage: $0 [w8a8|w4|seed003|lowbit|gptaq|best|all]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# On a GPU machine without internet, in one lease: install the wheels carried in .whl/ (scripts/gpu_wheels.sh), then
# the STEPS (default: the first five), most wanted first, each cut to what BUDGET (seconds, default 570) leaves:
#   fp8_tests    the FP8 kernels' GPU tests (tests/test_fp8.py: per tensor, per token, the fused input codes, 128 x 128
#                blocks on Hopper);
#   fp8_profile  FP8 W8A8 GEMMs on torch._scaled_mm against bf16 Linears, by rows (scripts/runtime_profile.py fp8);
#   bench        scripts/gpu_bench.py (its arguments are this script's; default: GPTQ W4 g128 by both tools, no
#                sweep), which writes the random Llama-3-8B-shaped checkpoint;
#   fp8_prefill  that checkpoint (or one of PREFILL_LAYERS layers) in FP8 by round to nearest, per token, then in
#                blocks, and `llmquant bench` of each against the bf16 model on the GPU (prefill and decode);
#   tests        the device tests (tests/test_devices.py, tests/test_gptq_kernel.py);
#   moe          one 128-expert layer by both tools, and by llmquant under --max-gpu-memory.
# Everything it reports goes to $OUT (default out/gpu): gpu.txt, fp8_tests.log, fp8.log, bench.log, gpu_bench.json,
# fp8_prefill.log, tests.log, moe.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
BUDGET=${BUDGET:-570}
DEVICE=${DEVICE:-cuda} SHAPE=${SHAPE:-llama3-8b} PYTHON=${PYTHON:-python3}  # (a dry run here: DEVICE=cpu SHAPE=tiny
# PYTHON=.venv/bin/python WHEELS=0, with llm-compressor's site in /tmp/site-llmc)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
install() {  # TARGET WHEEL...
    [ "${WHEELS:-1}" = 1 ] || return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$1" "${@:2}" || exit 1
}
left() {  # seconds the budget leaves, less $1
    echo $((BUDGET - SECONDS - ${1:-0}))
}
within() {  # CAP COMMAND...: the command, stopped after CAP seconds or what the budget leaves
    local cap=$1
    local rest
    rest=$(left 5)
    ((rest < cap)) && cap=$rest
    if ((cap < 20)); then
        echo "skipped (budget spent): ${*:2}"
        return 1
    fi
    timeout "$cap" "${@:2}"
}
LQ=(env PYTHONPATH=/tmp/site-llmquant:src "$PYTHON")  # python with llmquant's site
install /tmp/site-llmquant .whl/common/*.whl .whl/llmquant/*.whl
install /tmp/site-llmc .whl/common/*.whl .whl/llmcompressor/*.whl
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nproc
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

fp8_tests() {
    within 90 "${LQ[@]}" -m pytest -q -p no:cacheprovider tests/test_fp8.py -k "on_the_gpu or hopper" \
        > "$OUT/fp8_tests.log" 2>&1
    tail -n 15 "$OUT/fp8_tests.log"
}
fp8_profile() {
    within 90 "${LQ[@]}" scripts/runtime_profile.py fp8 --device "$DEVICE" > "$OUT/fp8.log" 2>&1
    tail -n 70 "$OUT/fp8.log"
}
bench() {  # (also writes the checkpoint that fp8_prefill reads)
    local args=("${BENCH_ARGS[@]}")
    ((${#args[@]})) || args=(--runs gptq_w4_g128 --no-sweep)
    within 330 "${LQ[@]}" scripts/gpu_bench.py --out "$OUT" --llmquant-path /tmp/site-llmquant:src \
        --llmcompressor-path /tmp/site-llmc --shape "$SHAPE" --device "$DEVICE" --deadline "$(left 230)" \
        "${args[@]}" > "$OUT/bench.log" 2>&1
    grep -v -E "^\s*$|Warning|warn\(|INFO|METRIC|it/s\]" "$OUT/bench.log" | tail -n 20
}
fp8_prefill() {  # the checkpoint in FP8 by round to nearest, `llmquant bench` against the bf16 model; PREFILL_LAYERS:
    # a checkpoint of that many layers of its own
    local model=/tmp/llmquant-gpu-bench-$SHAPE
    if [ -n "${PREFILL_LAYERS:-}" ]; then
        model=/tmp/llmquant-gpu-bench-$SHAPE-$PREFILL_LAYERS
        within 60 "${LQ[@]}" scripts/gpu_bench.py --shape "$SHAPE" --layers "$PREFILL_LAYERS" --model-dir "$model" \
            --device "$DEVICE" --build-only >> "$OUT/fp8_prefill.log" 2>&1
    fi
    for scheme in ${PREFILL_SCHEMES:-w_fp8_per_channel_a_fp8_per_token_dynamic w_fp8_block128_a_fp8_group128_dynamic}; do
        [ -f "$model/config.json" ] || break
        echo "== $scheme" >> "$OUT/fp8_prefill.log"
        within 100 "${LQ[@]}" -m llmquant quantize --model "$model" --scheme "$scheme" --calib-samples 0 --no-eval \
            --device "$DEVICE" --output "/tmp/$scheme" --overwrite --quiet >> "$OUT/fp8_prefill.log" 2>&1 &&
            within 200 "${LQ[@]}" -m llmquant bench --model "/tmp/$scheme" --baseline "$model" --device "$DEVICE" \
                --batch 1 8 --prompt "${PROMPT:-1024}" --decode 32 --repeats 3 --json >> "$OUT/fp8_prefill.log" 2>&1
        rm -rf "/tmp/$scheme"
    done
    grep -v -E "it/s\]|s/it\]|generation/s|Warning|warn\(" "$OUT/fp8_prefill.log" | tail -n 40
}
tests() {
    within 200 "${LQ[@]}" -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_gptq_kernel.py \
        > "$OUT/tests.log" 2>&1
    tail -n 15 "$OUT/tests.log"
}
moe() {  # one Qwen3-30B-A3B-shaped layer (128 experts), GPTQ W4 g128, 32 x 512 tokens, bf16, llmquant against
    # llm-compressor (moe/gpu_bench.json), then by llmquant alone under --max-gpu-memory: GPTQ's rounds of experts
    # and sweeps sized by what is left
    within 300 "${LQ[@]}" scripts/gpu_bench.py --shape "${MOE_SHAPE:-qwen3-30b-a3b-layer}" --device "$DEVICE" \
        --no-sweep --out "$OUT/moe" --llmquant-path /tmp/site-llmquant:src --llmcompressor-path /tmp/site-llmc \
        --deadline "$(left 60)" > "$OUT/moe.log" 2>&1
    grep -v -E "^\s*$|Warning|warn\(|INFO|METRIC|it/s\]" "$OUT/moe.log" | tail -n 20
    within 300 "${LQ[@]}" scripts/moe_layer_bench.py --device "$DEVICE" --samples 32 --seqlen 512 \
        --max-gpu-memory 3GB --json "$OUT/moe_layer_capped.json" > "$OUT/moe_capped.log" 2>&1
    tail -n 25 "$OUT/moe_capped.log"
    tar czf "$OUT/moe.tgz" -C "$OUT" moe moe.log moe_capped.log moe_layer_capped.json && rm -rf "$OUT/moe" \
        "$OUT"/moe*.log "$OUT/moe_layer_capped.json"  # (8 files come back from a lease)
}

BENCH_ARGS=("$@")
for step in ${STEPS:-fp8_tests fp8_profile bench fp8_prefill tests}; do
    echo "== $step (${SECONDS} s)"
    "$step"
done
echo "gpu_bench.sh: ${SECONDS} s"

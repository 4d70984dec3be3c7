#!/usr/bin/env bash
# On a GPU machine without internet: install the wheels carried in .whl/ (scripts/gpu_wheels.sh), run the device
# tests (tests/test_devices.py, tests/test_gptq_kernel.py, the FP8 kernel's) on the GPU, the FP8 GEMM timings, then
# scripts/gpu_bench.py (arguments are passed on); with MOE=1, scripts/gpu_bench.py on one 128-expert layer too.
# Everything it reports goes to $OUT (default out/gpu): gpu.txt, tests.log, fp8.log, bench.log, gpu_bench.json, moe.log,
# moe/gpu_bench.json, moe_capped.log, moe_layer_capped.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
install() {  # TARGET WHEEL...
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$1" "${@:2}" || exit 1
}
install /tmp/site-llmquant .whl/common/*.whl .whl/llmquant/*.whl
install /tmp/site-llmc .whl/common/*.whl .whl/llmcompressor/*.whl
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nproc
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
PYTHONPATH=/tmp/site-llmquant:src timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_devices.py tests/test_gptq_kernel.py \
    tests/test_fp8.py::test_the_fp8_kernel_on_the_gpu_agrees_with_the_simulation > "$OUT/tests.log" 2>&1
tail -n 25 "$OUT/tests.log"
PYTHONPATH=/tmp/site-llmquant:src timeout "${FP8_TIMEOUT:-120}" python3 scripts/runtime_profile.py fp8 --device cuda \
    > "$OUT/fp8.log" 2>&1  # FP8 W8A8 on torch._scaled_mm against bfloat16 Linears
tail -n 30 "$OUT/fp8.log"
PYTHONPATH=/tmp/site-llmquant:src python3 scripts/gpu_bench.py --out "$OUT" --llmquant-path /tmp/site-llmquant:src \
    --llmcompressor-path /tmp/site-llmc "$@" > "$OUT/bench.log" 2>&1
grep -v -E "^\s*$|Warning|warn\(" "$OUT/bench.log" | tail -n 40
if [ "${MOE:-0}" = 1 ]; then  # one Qwen3-30B-A3B-shaped layer (128 experts), GPTQ W4 g128, 32 x 512 tokens, bf16,
    # llmquant against llm-compressor (OUT/moe/gpu_bench.json)
    PYTHONPATH=/tmp/site-llmquant:src python3 scripts/gpu_bench.py --shape qwen3-30b-a3b-layer --no-sweep \
        --out "$OUT/moe" --llmquant-path /tmp/site-llmquant:src --llmcompressor-path /tmp/site-llmc \
        > "$OUT/moe.log" 2>&1
    grep -v -E "^\s*$|Warning|warn\(" "$OUT/moe.log" | tail -n 20
    # the same layer by llmquant alone under --max-gpu-memory: GPTQ's rounds of experts and sweeps sized by what is left
    PYTHONPATH=/tmp/site-llmquant:src timeout "${MOE_TIMEOUT:-300}" python3 scripts/moe_layer_bench.py --device cuda \
        --samples 32 --seqlen 512 --max-gpu-memory 3GB --json "$OUT/moe_layer_capped.json" > "$OUT/moe_capped.log" 2>&1
    tail -n 25 "$OUT/moe_capped.log"
fi

#!/usr/bin/env bash
# FP8 per tensor static (preset FP8), calibration draw 0: llmquant's checkpoint (`llmquant quantize`) and
# llm-compressor's (scripts/compare_llmcompressor.py --save), tensor by tensor, then each evaluated three ways on the
# 40 windows: llmquant with transformers' sdpa attention, llmquant with its causal blocks (`llmquant eval`'s
# default), transformers with compressed-tensors (llm-compressor's environment). One thread, one run at a time:
#     bash bench/fp8_seeds_2026-12-08/same_checkpoint/run.sh WORK_DIR > bench/fp8_seeds_2026-12-08/same_checkpoint/out.txt
set -euo pipefail
cd "$(dirname "$0")/../../.."
WORK=$1
LLMC=${LLMC:-/tmp/llmc/bin/python}
STATIC=w_fp8_per_tensor_a_fp8_per_tensor_static
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$WORK"
[ -d "$WORK/ours" ] || .venv/bin/llmquant quantize --scheme $STATIC --no-eval --output "$WORK/ours" --quiet >&2
[ -d "$WORK/llmc" ] || PYTHONPATH=src "$LLMC" scripts/compare_llmcompressor.py --schemes $STATIC --save "$WORK/llmc" \
    --max-windows 4 --scales-against "$WORK/ours" --out "$WORK/llmc.json" >&2
THEIRS=$WORK/llmc/$STATIC
echo "checkpoint_diff.py ours theirs:"
.venv/bin/python scripts/checkpoint_diff.py "$WORK/ours" "$THEIRS" | tail -2
for checkpoint in "$WORK/ours" "$THEIRS"; do
    for attention in model blocks; do
        echo "$(basename "$checkpoint"), llmquant eval --attention $attention: $(.venv/bin/llmquant eval \
            --model "$checkpoint" --attention $attention --quiet 2>&1 | grep 'perplexity pydoc')"
    done
done
echo "transformers + compressed-tensors:"
PYTHONPATH=src "$LLMC" scripts/compare_llmcompressor.py --eval-checkpoints "$WORK/ours" "$THEIRS" \
    --out "$WORK/eval.json" 2>/dev/null | grep '"ppl"'

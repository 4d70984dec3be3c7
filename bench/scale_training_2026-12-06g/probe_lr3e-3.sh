#!/bin/bash
# once the wgroups16 run and the checkpoint are done: the probe of two more settings on the checkpoint
while pgrep -f "bench_recipe.py w4a4kv4_wgroups16_kv16_trained" > /dev/null || pgrep -f "llmquant quantize --config configs/recipes/best_w4a4kv4.yaml" > /dev/null; do sleep 20; done
cd /tmp/codeA2
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/codeA2/src TORCH_EXTENSIONS_DIR=/tmp/extB
echo "start $(date -u +%T)"
/work/main/.venv/bin/python bench/scale_training_2026-12-05/probe.py /tmp/ckpt_w4a4kv4 --threads 1 --samples 256 \
  --configs '{"lr": 0.003}' --out /work/main/bench/scale_training_2026-12-06g/probe.jsonl
echo "done $(date -u +%T)"

#!/usr/bin/env bash
# BENCHMARKS.md "Block training": the runs of runs.jsonl, from the repository root (each took one thread; the
# section ran two side by side).
set -euo pipefail
out=bench/block_training_2026-12-07/runs.jsonl
run() { OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_recipe.py "$@" --threads 1 --corpora pydoc stdlib --out "$out"; }
blocks='block_training={epochs: 1, lr: 0.01, codes_lr: 0.02, holdout: 8, target: layer}'  # (the default then)
model='block_training={epochs: 1, lr: 0.01, codes_lr: 0.02, holdout: 8, target: model}'
run w4a4kv4_channel_block_trained configs/recipes/best_w4a4kv4_trained.yaml --set "$blocks"
run w4_g64_block_trained configs/recipes/best_w4_g64.yaml --set "$blocks"
run w4_g64_block_trained_model_target configs/recipes/best_w4_g64.yaml --set "$model"
run w3_g64_block_trained_model_target configs/recipes/best_w3_g64.yaml --set "$model"
run w3_g64 configs/recipes/best_w3_g64.yaml --set block_training=null  # (the recipe before block training)
# (a second session of 12-07, two side by side again)
run w4a4kv4_channel_block_trained_model_target configs/recipes/best_w4a4kv4_trained.yaml --set "$model"
run w3_g64_block_trained configs/recipes/best_w3_g64.yaml --set "$blocks"

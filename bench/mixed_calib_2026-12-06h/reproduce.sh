#!/usr/bin/env bash
# BENCHMARKS.md "Calibration on a mixture of corpora": the four runs of runs.jsonl, from the repository root
# (each took one thread; the section ran two side by side).
set -euo pipefail
out=bench/mixed_calib_2026-12-06h/runs.jsonl
run() { OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_recipe.py "$@" --threads 1 --corpora pydoc stdlib --out "$out"; }
run channel_trained_mixed configs/recipes/best_w4a4kv4_trained.yaml --set calib.dataset=pydoc+stdlib
run wgroups16_kv16_trained_mixed configs/recipes/best_w4a4kv4_wgroups16_kv16_trained.yaml --set calib.dataset=pydoc+stdlib
run w4_g64_mixed configs/recipes/best_w4_g64.yaml --set calib.dataset=pydoc+stdlib
run w4_g64_pydoc configs/recipes/best_w4_g64.yaml

#!/usr/bin/env bash
# Every run of BENCHMARKS.md's "FP8 per token, trained end to end", in its order: one JSON line each appended to
# OUT (default: this folder's runs.jsonl). The rows were measured one thread each, two or three at a time, but the
# first and the last (2 threads). Usage, from the repository root: bash bench/fp8_trained_2026-12-07/reproduce.sh [OUT]
set -euo pipefail
out=${1:-bench/fp8_trained_2026-12-07/runs.jsonl}
recipe=configs/recipes/best_fp8_per_token_trained.yaml
run() {  # NAME THREADS [--set FIELD=VALUE ...]
    local name=$1 threads=$2; shift 2
    OMP_NUM_THREADS=$threads PYTHONPATH=src .venv/bin/python scripts/bench_recipe.py "$name" "$recipe" \
        "$@" --threads "$threads" --corpora pydoc stdlib --quiet --out "$out"
}
s256=(--set scale_training.samples=256)  # (the recipe trains on 512)
run fp8_token_gptq_trained 2 "${s256[@]}"
run fp8_token_gptq_trained_norms 1 "${s256[@]}" --set scale_training.norms=true
run fp8_token_gptq_trained_lr4e3 1 "${s256[@]}" --set scale_training.lr=0.004
run fp8_token_gptq_trained_lr1e3 1 "${s256[@]}" --set scale_training.lr=0.001
run fp8_token_gptq_trained_codes02 1 "${s256[@]}" --set scale_training.codes_lr=0.02
run fp8_token_gptq_trained_codes005 1 "${s256[@]}" --set scale_training.codes_lr=0.005
run fp8_token_gptq_trained_s512 1
run best_fp8_per_token_trained_rerun 2

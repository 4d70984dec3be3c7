#!/bin/bash
# The figures of BENCHMARKS.md "Scale training on a saved checkpoint" (issue 19's layout), one step after another,
# one thread each, from the repository root:  bash bench/scale_training_2026-12-06g/reproduce.sh WORKDIR
# (they were run two at a time beside other jobs; the seconds depend on that, the perplexities do not).
# The grouped recipe's row: scripts/bench_recipe.py, as the section says.
set -euo pipefail
work=${1:?usage: reproduce.sh WORKDIR}
here=bench/scale_training_2026-12-06g
export OMP_NUM_THREADS=1
llmquant() { .venv/bin/python -m llmquant "$@"; }
evaluate() { llmquant eval --model "$1" --ppl pydoc stdlib --max-windows 40 --quiet --json "${@:2}"; }

llmquant quantize --config configs/recipes/best_w4a4kv4.yaml --output "$work/ckpt" --no-eval --quiet
# the recipe's training (best_w4a4kv4_trained.yaml): train_scales_cli.log, trained_checkpoint_llmquant.json
/usr/bin/time -v .venv/bin/python -m llmquant train-scales "$work/ckpt" --samples 256 --set lr=0.002 --quiet \
    --output "$work/trained" 2> "$work/train_scales_time.txt"
evaluate "$work/ckpt"
evaluate "$work/trained"
evaluate "$work/trained" --attention model
# Adam's step 3e-3, by the probe (its untrained figure measured again in its process): probe.jsonl
.venv/bin/python bench/scale_training_2026-12-05/probe.py "$work/ckpt" --threads 1 --samples 256 \
    --configs '{"lr": 0.003}' --out "$work/probe.jsonl"
# the norms' gains trained too: train_scales_norms.log, trained_norms_checkpoint_llmquant.json
llmquant train-scales "$work/ckpt" --samples 256 --set lr=0.002 --set norms=true --no-eval --quiet \
    --output "$work/trained_norms"
evaluate "$work/trained_norms"

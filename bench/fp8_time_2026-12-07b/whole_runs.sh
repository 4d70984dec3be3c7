#!/usr/bin/env bash
# Alternating quantization times (no evaluation) of the code before (a worktree of e824973 at $OLD:
#   git worktree add $OLD e824973) and this checkout, 3 rounds; stopped after 5 runs on 12-07 (the machine drifted).
#   OLD=/tmp/old bash bench/fp8_time_2026-12-07b/whole_runs.sh
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-bench/fp8_time_2026-12-07b/whole_runs_interrupted.jsonl}
KV='{"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "kv_cache": "fp8_per_tensor"}'
ST='{"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static"}'
FC='{"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static", "calib": {"propagate": "float"}}'
for round in 1 2 3; do
  for pair in "fp8_token_kv_tensor|$KV" "fp8_static|$ST" "fp8_static_float_calib|$FC"; do
    name=${pair%%|*}; recipe=${pair#*|}
    PYTHONPATH="$OLD"/src .venv/bin/python bench/fp8_time_2026-12-07b/whole_runs.py old "$name" "$recipe" 2>/dev/null | tail -1 >> $OUT
    PYTHONPATH=src .venv/bin/python bench/fp8_time_2026-12-07b/whole_runs.py new "$name" "$recipe" 2>/dev/null | tail -1 >> $OUT
  done
done
echo done >> $OUT

#!/usr/bin/env bash
# FP8_DYNAMIC (FP8 weights per channel, FP8 inputs per token, dynamic; round to nearest) on the default model:
# quantization seconds of llm-compressor's `oneshot` against llmquant's, alternating run by run in one go, medians.
#
#   bash scripts/llmcompressor_env.sh              # once: llm-compressor in /tmp/llmc
#   THREADS=1 REPEATS=3 bash scripts/fp8_dynamic_time.sh [OUT_DIR]
#
# llmquant runs twice a round: as a plain `llmquant quantize --scheme ...` (one sample measures each layer's output
# error) and with `--calib-samples 0` (no pass, no output-error figures). Seconds are llmquant's manifest
# `seconds.total` and llm-compressor's `oneshot` wall time: neither counts loading the model. llm-compressor's
# perplexity is on 4 windows here (the 40-window figures: BENCHMARKS.md); llmquant's runs do not evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-1}
REPEATS=${REPEATS:-3}
OUT=${1:-bench/fp8_dynamic_time}
LLMC=${LLMC:-/tmp/llmc/bin/python}
SCHEME=w_fp8_per_channel_a_fp8_per_token_dynamic
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS PYTHONPATH=src
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for round in $(seq 1 "$REPEATS"); do
    "$LLMC" scripts/compare_llmcompressor.py --schemes $SCHEME --threads "$THREADS" --max-windows 4 \
        --out "$OUT/llmc_t${THREADS}_$round.json"
    for samples in 32 0; do
        .venv/bin/python -m llmquant.cli quantize --scheme $SCHEME --calib-samples $samples --no-eval --quiet \
            --output "$work/s$samples" --overwrite
        cp "$work/s$samples/llmquant.json" "$OUT/llmquant_s${samples}_t${THREADS}_$round.json"
    done
done
.venv/bin/python - "$OUT" "$THREADS" <<'EOF'
import json, platform, statistics, sys
from pathlib import Path

out, threads = Path(sys.argv[1]), sys.argv[2]
def median(pattern, read):
    return statistics.median(read(json.loads(p.read_text())) for p in sorted(out.glob(pattern)))
llmc = median(f"llmc_t{threads}_*.json", lambda d: d["rows"][0]["seconds"])
rows = {"llm-compressor FP8_DYNAMIC (oneshot)": llmc}
for samples, what in (("32", "llmquant, one sample measuring the output errors"), ("0", "llmquant --calib-samples 0")):
    rows[what] = median(f"llmquant_s{samples}_t{threads}_*.json", lambda d: d["seconds"]["total"])
print(f"cpu: {platform.processor() or platform.machine()}, threads {threads}, medians of "
      f"{len(list(out.glob(f'llmc_t{threads}_*.json')))} rounds")
print("| run | seconds | / llm-compressor |\n|---|---|---|")
for what, seconds in rows.items():
    print(f"| {what} | {seconds:.2f} | {seconds / llmc:.2f} |")
EOF

#!/usr/bin/env bash
# FP8_DYNAMIC (FP8 weights per channel, FP8 inputs per token, dynamic; round to nearest) on the default model:
# quantization seconds of llm-compressor's `oneshot` against llmquant's, alternating run by run in one go, medians.
#
#   bash scripts/llmcompressor_env.sh              # once: llm-compressor in /tmp/llmc
#   THREADS=1 REPEATS=3 bash scripts/fp8_dynamic_time.sh [OUT_DIR]
#
# llmquant runs twice a round: with `--calib-samples 32` (one sample measures each layer's output error; the default
# before 2026-12-07) and with `--calib-samples 0` (no pass, no output-error figures; now the default, no count given). Seconds are llmquant's manifest
# `seconds.total` (`llmquant.quantize` from Python, as `llmquant quantize --scheme S --calib-samples N` runs it) and
# llm-compressor's `oneshot` wall time: neither counts loading the model. llm-compressor rounds
# the weights only when it writes the checkpoint (compressed-tensors' compression in `save_pretrained`; after
# `oneshot` its weights are the float ones), so the second column adds each side's checkpoint writing: `llmquant.save`,
# llm-compressor's `save_pretrained`. llm-compressor's perplexity is on 4 windows here (the
# 40-window figures: BENCHMARKS.md); llmquant's runs do not evaluate.
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
        --save "$work/llmc" --out "$OUT/llmc_t${THREADS}_$round.json"
    rm -rf "$work/llmc"
    for samples in 32 0; do
        .venv/bin/python - "$samples" "$work/s$samples" "$OUT/llmquant_s${samples}_t${THREADS}_$round.json" <<'EOF'
import json, shutil, sys, time
import llmquant
from llmquant.model.loading import load_float

samples, directory, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
model, tokenizer = load_float()  # (not timed, as on llm-compressor's side)
llmquant.quantize(model, {"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "calib": {"samples": samples}},
                  tokenizer, progress=False)
start = time.perf_counter()
llmquant.save(model, tokenizer, directory)
seconds = {**model.llmquant_manifest.seconds, "save": time.perf_counter() - start}
shutil.rmtree(directory)
json.dump({"seconds": seconds}, open(out, "w"))
EOF
    done
done
.venv/bin/python - "$OUT" "$THREADS" <<'EOF'
import json, platform, statistics, sys
from pathlib import Path

out, threads = Path(sys.argv[1]), sys.argv[2]
def median(pattern, read):
    return statistics.median(read(json.loads(p.read_text())) for p in sorted(out.glob(pattern)))
rows = {"llm-compressor FP8_DYNAMIC (oneshot)": (f"llmc_t{threads}_*.json",
                                                 lambda d: (d["rows"][0]["seconds"],
                                                            d["rows"][0]["seconds"] + d["rows"][0]["save_seconds"]))}
for samples, what in (("32", "llmquant --calib-samples 32: one sample measures the output errors"),
                      ("0", "llmquant --calib-samples 0 (since 2026-12-07 also the default: none given)")):
    rows[what] = (f"llmquant_s{samples}_t{threads}_*.json",
                  lambda d: (d["seconds"]["total"], d["seconds"]["total"] + d["seconds"]["save"]))
medians = {what: [median(pattern, lambda d, i=i: read(d)[i]) for i in (0, 1)] for what, (pattern, read) in rows.items()}
base = medians["llm-compressor FP8_DYNAMIC (oneshot)"]
print(f"cpu: {platform.processor() or platform.machine()}, threads {threads}, medians of "
      f"{len(list(out.glob(f'llmc_t{threads}_*.json')))} rounds")
print("| run | quantize s | / llm-compressor | quantize + write the checkpoint s | / llm-compressor |")
print("|---|---|---|---|---|")
for what, (quantize, written) in medians.items():
    print(f"| {what} | {quantize:.2f} | {quantize / base[0]:.2f} | {written:.2f} | {written / base[1]:.2f} |")
EOF

#!/usr/bin/env bash
# Perplexity of saved checkpoints on two English corpora no recipe calibrates on, beside pydoc and stdlib: the Vim user
# manual (chapters 01-19, /usr/share/vim/vim90/doc, Debian's vim-runtime) and six licence texts (Debian's base-files,
# /usr/share/common-licenses). Usage: bash reproduce.sh OUT_DIR CHECKPOINT...  ("float": the default float model).
# Each line of OUT_DIR/eval.jsonl: the checkpoint and `llmquant eval --json`'s figures (40 windows of 512, int8 runtime).
# The checkpoints written for BENCHMARKS.md's section (2 threads each):
#   llmquant quantize --config configs/recipes/best_w8a8_per_token.yaml --no-eval --output W8A8
#   llmquant quantize --config configs/recipes/best_w4_g64.yaml --no-eval --output W4
#   llmquant quantize --config configs/recipes/best_w4a4kv4.yaml [--calib pydoc+stdlib | --calib OUT_DIR/vim_manual_20_45.txt] --no-eval --output W4A4KV4
#   llmquant train-scales W4A4KV4 --samples 256 --set lr=0.002 --no-eval --output W4A4KV4_TRAINED
set -euo pipefail
out=$1; shift
mkdir -p "$out"
vim=/usr/share/vim/vim90/doc licenses=/usr/share/common-licenses
[ -d "$vim" ] && [ -d "$licenses" ] || { echo "needs $vim (vim-runtime) and $licenses (base-files)" >&2; exit 2; }
cat "$vim"/usr_0*.txt "$vim"/usr_1*.txt > "$out/vim_manual.txt"
cat "$vim"/usr_[2-4]*.txt > "$out/vim_manual_20_45.txt"  # (chapters 20-45: a calibration text of the same kind)
cat "$licenses"/{GPL-3,GFDL-1.3,LGPL-3,Apache-2.0,MPL-2.0,GPL-2} > "$out/licenses.txt"
here=$(cd "$(dirname "$0")/../.." && pwd)
for checkpoint in "$@"; do
    model=(); [ "$checkpoint" = float ] || model=(--model "$checkpoint")
    figures=$("$here/.venv/bin/llmquant" eval "${model[@]}" --ppl pydoc stdlib "$out/vim_manual.txt" "$out/licenses.txt" \
        --max-windows 40 --json --quiet | tail -1)
    echo "{\"checkpoint\": \"$checkpoint\", \"figures\": $figures}" >> "$out/eval.jsonl"
done

#!/usr/bin/env bash
# Perplexity of saved checkpoints on two English corpora no recipe calibrates on, beside pydoc and stdlib: the Vim user
# manual (chapters 01-19, /usr/share/vim/vim90/doc, Debian's vim-runtime) and six licence texts (Debian's base-files,
# /usr/share/common-licenses). Usage: bash reproduce.sh OUT_DIR CHECKPOINT...  ("float": the default float model).
# Each line of OUT_DIR/eval.jsonl: the checkpoint and `llmquant eval --json`'s figures (40 windows of 512, int8 runtime).
set -euo pipefail
out=$1; shift
mkdir -p "$out"
vim=/usr/share/vim/vim90/doc licenses=/usr/share/common-licenses
[ -d "$vim" ] && [ -d "$licenses" ] || { echo "needs $vim (vim-runtime) and $licenses (base-files)" >&2; exit 2; }
cat "$vim"/usr_0*.txt "$vim"/usr_1*.txt > "$out/vim_manual.txt"
cat "$licenses"/{GPL-3,GFDL-1.3,LGPL-3,Apache-2.0,MPL-2.0,GPL-2} > "$out/licenses.txt"
here=$(cd "$(dirname "$0")/../.." && pwd)
for checkpoint in "$@"; do
    model=(); [ "$checkpoint" = float ] || model=(--model "$checkpoint")
    figures=$("$here/.venv/bin/llmquant" eval "${model[@]}" --ppl pydoc stdlib "$out/vim_manual.txt" "$out/licenses.txt" \
        --max-windows 40 --json --quiet | tail -1)
    echo "{\"checkpoint\": \"$checkpoint\", \"figures\": $figures}" >> "$out/eval.jsonl"
done

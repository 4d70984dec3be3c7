#!/bin/bash
# after the clean-clone test run: train-scales with the norms' gains too, then both corpora
while pgrep -f "/tmp/ci1/.venv/bin/python .venv/bin/pytest" > /dev/null; do sleep 15; done
cd /tmp/codeA2
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/codeA2/src TORCH_EXTENSIONS_DIR=/tmp/extA
PY=/work/main/.venv/bin/python
echo "start $(date -u +%T)"
$PY -m llmquant train-scales /tmp/ckpt_w4a4kv4 --samples 256 --set lr=0.002 --set norms=true --no-eval --quiet --output /tmp/ckpt_w4a4kv4_trained_norms
echo "trained $(date -u +%T)"
$PY -m llmquant eval --model /tmp/ckpt_w4a4kv4_trained_norms --ppl pydoc stdlib --max-windows 40 --quiet --json
echo "done $(date -u +%T)"

#!/bin/bash
# wait for the checkpoint, then train-scales (lr 2e-3, 256 windows) and evaluate both on pydoc and stdlib
while pgrep -f "llmquant quantize --config configs/recipes/best_w4a4kv4.yaml" > /dev/null; do sleep 20; done
cd /tmp/codeA2
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/codeA2/src TORCH_EXTENSIONS_DIR=/tmp/extA
PY=/work/main/.venv/bin/python
echo "start $(date -u +%T)"
/usr/bin/time -v $PY -m llmquant train-scales /tmp/ckpt_w4a4kv4 --samples 256 --set lr=0.002 --quiet --output /tmp/ckpt_w4a4kv4_trained 2> /tmp/jobs/a2_time.txt
echo "trained $(date -u +%T)"
for d in /tmp/ckpt_w4a4kv4 /tmp/ckpt_w4a4kv4_trained; do
  $PY -m llmquant eval --model $d --ppl pydoc stdlib --max-windows 40 --quiet --json
done
echo "done $(date -u +%T)"

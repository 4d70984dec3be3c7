"""One checkpoint's perplexity evaluated ways that compute the same function up to float32 rounding (BENCHMARKS.md,
"An FP8 KV cache's perplexity moves with float rounding"): transformers' sdpa attention, the same with the input
embeddings multiplied by 1 + 1e-6 N(0, 1) (two seeds), and llmquant's causal blocks; the protocol's 40 pydoc windows.

    PYTHONPATH=src .venv/bin/python bench/fp8_kv_2026-12-07/rounding_spread.py CHECKPOINT
"""

from __future__ import annotations

import sys

import torch

import llmquant
from llmquant import data
from llmquant.evaluation.perplexity import perplexity


def main() -> None:
    torch.set_num_threads(2)
    checkpoint = sys.argv[1]
    for attention in ("model", "blocks"):
        model, tokenizer = llmquant.load(checkpoint, attention=attention)
        windows = data.corpus_windows(tokenizer, "pydoc", 512, 40)
        print(attention, round(perplexity(model, windows), 4))
    model, _ = llmquant.load(checkpoint, attention="model")
    embeddings = model.get_input_embeddings().weight
    kept = embeddings.detach().clone()
    for seed in (1, 2):
        noise = torch.randn(kept.shape, generator=torch.Generator().manual_seed(seed))
        embeddings.data = kept * (1 + 1e-6 * noise)
        print(f"model, embeddings x (1 + 1e-6 N), seed {seed}", round(perplexity(model, windows), 4))


if __name__ == "__main__":
    main()

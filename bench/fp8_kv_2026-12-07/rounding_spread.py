"""One checkpoint's perplexity evaluated ways that compute the same function up to float32 rounding (BENCHMARKS.md,
"An FP8 KV cache's perplexity moves with float rounding"): llmquant's causal blocks, transformers' sdpa attention, and
the same with the input embeddings multiplied by 1 + 1e-6 N(0, 1) (two seeds); the protocol's 40 pydoc windows.
``--queries``: instead, on the first window, how far the two attentions' outputs are apart on one call (layer 0's
query, key and value) and how far the queries they receive drift apart, layer by layer.

    PYTHONPATH=src .venv/bin/python bench/fp8_kv_2026-12-07/rounding_spread.py CHECKPOINT [--queries]
"""

from __future__ import annotations

import argparse

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import llmquant
import llmquant.nn.kv_cache as kv_cache
from llmquant import data
from llmquant.evaluation.perplexity import perplexity

ATTENTIONS = ("blocks", "model")  # (the last one loaded is perturbed)


def spread(checkpoint: str) -> None:
    for attention in ATTENTIONS:
        model, tokenizer = llmquant.load(checkpoint, attention=attention)
        windows = data.corpus_windows(tokenizer, "pydoc", 512, 40)
        print(attention, round(perplexity(model, windows), 4))
    embeddings = model.get_input_embeddings().weight
    kept = embeddings.detach().clone()
    for seed in (1, 2):
        noise = torch.randn(kept.shape, generator=torch.Generator().manual_seed(seed))
        embeddings.data = kept * (1 + 1e-6 * noise)
        print(f"model, embeddings x (1 + 1e-6 N), seed {seed}", round(perplexity(model, windows), 4))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def queries(checkpoint: str) -> None:
    """The arguments of every call of the attention function under each attention (recorded on the fake runtime,
    whose keys are each layer's own tensors), then the distances."""
    calls: dict[str, list[tuple]] = {}
    wrapped = kv_cache._base_attention

    def recording(module, base):
        function = wrapped(module, base)

        def attention(module, query, key, value, mask, **kwargs):
            calls[current].append((module, query, key, value, mask, kwargs))
            return function(module, query, key, value, mask, **kwargs)

        return attention

    kv_cache._base_attention = recording
    for current in ATTENTIONS:
        calls[current] = []
        model, tokenizer = llmquant.load(checkpoint, runtime="fake", attention=current)
        with torch.no_grad():
            model(data.corpus_windows(tokenizer, "pydoc", 512, 40)[:1], use_cache=False)
    module, query, key, value, mask, kwargs = calls["model"][0]
    one_call = [ALL_ATTENTION_FUNCTIONS[name](module, query, key, value, mask, **kwargs)[0]
                for name in ("sdpa", "sdpa+blocks")]
    print("one call (layer 0), sdpa against blocks:", f"{relative(*one_call):.2e}")
    for layer, (ours, theirs) in enumerate(zip(calls["blocks"], calls["model"], strict=True)):
        print(f"layer {layer}: queries {relative(theirs[1], ours[1]):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--queries", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    (queries if args.queries else spread)(args.checkpoint)


if __name__ == "__main__":
    main()

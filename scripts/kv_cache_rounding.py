"""A static FP8 KV-cache checkpoint's perplexity with its cache rounded another way: what vLLM's CPU build could be
doing where its perplexity differs from llmquant's (BENCHMARKS.md, "FP8 KV cache per head").

    .venv/bin/python scripts/kv_cache_rounding.py CHECKPOINT e4m3|e5m2|unscaled|toward_zero

``e4m3`` is llmquant's own rounding (q = e4m3(clamp(x / s, +-448)), x_hat = q s); ``e5m2`` stores E5M2 codes with the
same scales; ``unscaled`` ignores the checkpoint's k_scale / v_scale (s = 1); ``toward_zero`` rounds x / s to the E4M3
value next to it on the side of zero (the mantissa truncated), as vLLM 0.32's CPU build writes its cache
(`scripts/vllm_kv_cache_probe.py`). pydoc windows of the protocol (512 tokens, 40 windows), the simulated runtime.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from vllm_kv_cache_probe import e4m3_toward_zero  # (scripts/, beside this one)

import llmquant
import llmquant.nn.kv_cache as kv_cache
from llmquant import data
from llmquant.evaluation.perplexity import perplexity
from llmquant.quant import QuantSpec
from llmquant.quant.primitives import from_blocks, to_blocks

CODES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "unscaled": torch.float8_e4m3fn,
         "toward_zero": torch.float8_e4m3fn}


def rounding(mode: str) -> Callable[..., torch.Tensor]:
    """The replacement of `llmquant.nn.kv_cache`'s fake_quantize for ``mode``."""
    static = kv_cache.fake_quantize

    def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                      zero: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None:  # a dynamic cache: unchanged
            return static(x, spec, scale, zero)
        blocks = to_blocks(x.float(), spec)
        used = torch.ones_like(scale) if mode == "unscaled" else scale
        clamped = (blocks / used).clamp(-448, 448)
        codes = e4m3_toward_zero(clamped) if mode == "toward_zero" else clamped.to(CODES[mode]).float()
        return from_blocks(codes * used, x.shape, spec).to(x.dtype)

    return fake_quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("mode", choices=list(CODES))
    args = parser.parse_args()
    kv_cache.fake_quantize = rounding(args.mode)
    model, tokenizer = llmquant.load(args.checkpoint, runtime="fake")
    print(args.mode, perplexity(model, data.corpus_windows(tokenizer, "pydoc", 512, 40)))


if __name__ == "__main__":
    main()

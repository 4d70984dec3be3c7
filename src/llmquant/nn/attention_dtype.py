"""Attention in bfloat16 inside a float32 model: a runtime choice, off by default (`set_attention_dtype`).

softmax(q k^T / sqrt(d)) v has no weights to quantize; in a float32 model it stays float32 while the int8 runtime
makes the Linears around it several times faster, so on a CPU it becomes the largest part of a long prefill (166 of
the 602 ms of the default model's 512-token W8A8 prefill on a Xeon with AMX, BENCHMARKS.md "Runtimes"). With
``set_attention_dtype(model, "bfloat16")`` the attention function casts the query, key and value to bfloat16 (after
RoPE, the KV cache and its quantization, exactly what the attention multiplies), runs transformers' sdpa on them
(torch's CPU flash kernel accumulates in float32) and casts the output back: one rounding of q, k, v and p to
bfloat16's 8 significant bits. A decode step (one query position) stays float32: it would cast the whole cache at
every step for a product of one row (decode at batch 1 ran at 0.99 of float32 with it, 1.07 without; BENCHMARKS.md).
That changes the function, unlike the int8 Linears (which give the simulation's bits), so it is a choice with its
perplexity measured, not a default. It wraps the sdpa-based implementations
(transformers' ``sdpa`` and llmquant's KV-cache one) under a new name registered in transformers'
`AttentionInterface`; ``"model"`` restores the wrapped name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llmquant.errors import LlmquantError
from llmquant.nn.kv_cache import VARIANT_SEPARATOR, attention_configs

ATTENTION_DTYPES = ("model", "bfloat16")
SUFFIX = VARIANT_SEPARATOR + "bfloat16"
WRAPPABLE = ("sdpa", "llmquant_sdpa")


def _in_bfloat16(base: str) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs):
        function = ALL_ATTENTION_FUNCTIONS[base]
        if query.dtype != torch.float32 or query.shape[-2] == 1:  # a 16-bit model, or a decode step
            return function(module, query, key, value, attention_mask, **kwargs)
        mask = attention_mask.bfloat16() if attention_mask is not None and attention_mask.is_floating_point() \
            else attention_mask
        output, weights = function(module, query.bfloat16(), key.bfloat16(), value.bfloat16(), mask, **kwargs)
        return output.float(), weights

    return attention


def _register() -> None:
    """Every wrappable name's bfloat16 variant, at import: `enable_kv_quantization` may move sdpa+ to llmquant_sdpa+."""
    for base in WRAPPABLE:
        AttentionInterface.register(base + SUFFIX, _in_bfloat16(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(base + SUFFIX, ALL_MASK_ATTENTION_FUNCTIONS[base])


_register()


def check_attention_dtype(dtype: str) -> None:
    if dtype not in ATTENTION_DTYPES:
        raise LlmquantError(f"unknown attention dtype '{dtype}'; allowed: {', '.join(ATTENTION_DTYPES)}")


def set_attention_dtype(model: nn.Module, dtype: str) -> None:
    """Run ``model``'s attention in ``dtype``: "bfloat16" (module docstring) or "model" (its own dtype)."""
    check_attention_dtype(dtype)
    configs = attention_configs(model)
    bases = [config._attn_implementation.removesuffix(SUFFIX) for config in configs]
    refused = sorted({base for base in bases if base not in WRAPPABLE}) if dtype == "bfloat16" else []
    if refused:  # (checked for every config before any changes)
        raise LlmquantError(f"attention in bfloat16 wraps sdpa attention; this model uses '{refused[0]}' "
                            f"(allowed: {', '.join(WRAPPABLE)})")
    for config, base in zip(configs, bases, strict=True):
        config._attn_implementation = base if dtype == "model" else base + SUFFIX

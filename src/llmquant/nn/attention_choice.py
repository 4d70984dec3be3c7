"""How a model's attention runs: a runtime choice (`set_attention`; `llmquant.load`'s ``attention``).

- ``"model"``: the model's own implementation, as transformers runs it.
- ``"blocks"``: a causal prefill on the CPU in blocks of query rows, each reading only the keys it can see
  (`llmquant.nn.causal_blocks`): the same function to float32's rounding, about half the products below 768
  positions; a decode step over a float cache by the same op, a KV head's keys read once for its query heads;
  anything else as sdpa.
- ``"auto"`` (the default of `llmquant.load`): ``"blocks"`` where the model's attention is sdpa, else ``"model"``.
- ``"bfloat16"``: attention in bfloat16 inside a float32 model, off by default. softmax(q k^T / sqrt(d)) v has no
  weights to quantize; in a float32 model it stays float32 while the int8 runtime makes the Linears around it several
  times faster, so on a CPU it becomes the largest part of a long prefill (166 of the 602 ms of the default model's
  512-token W8A8 prefill on a Xeon with AMX, BENCHMARKS.md "Runtimes"). The attention function casts the query, key
  and value to bfloat16 (after RoPE, the KV cache and its quantization, exactly what the attention multiplies), runs
  transformers' sdpa on them (torch's CPU flash kernel accumulates in float32) and casts the output back: one rounding
  of q, k, v and p to bfloat16's 8 significant bits. A decode step (one query position) stays float32: it would cast
  the whole cache at every step for a product of one row (decode at batch 1 ran at 0.99 of float32 with it, 1.07
  without; BENCHMARKS.md). That changes the function, unlike the int8 Linears (which give the simulation's bits), so
  it is a choice with its perplexity measured, not a default.

Both variants wrap the sdpa-based implementations (transformers' ``sdpa`` and llmquant's KV-cache one, which quantizes
the keys and values before the variant's sdpa sees them) under a new name, ``<implementation>+<variant>``, registered
in transformers' `AttentionInterface`; ``"model"`` restores the wrapped name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llmquant.errors import LlmquantError
from llmquant.nn.causal_blocks import NAME as BLOCKS
from llmquant.nn.causal_blocks import VARIANT, blocked_sdpa_attention
from llmquant.nn.kv_cache import QUANTIZED_ATTENTION, VARIANT_SEPARATOR, attention_configs, quantizing_attention

ATTENTIONS = ("auto", "model", "blocks", "bfloat16")
WRAPPABLE = ("sdpa", QUANTIZED_ATTENTION)


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
    """Every wrappable name's variants, at import: `enable_kv_quantization` may move sdpa+<variant> to
    llmquant_sdpa+<variant>, which quantizes the keys and values before it calls sdpa+<variant>."""
    functions = {"sdpa": {"bfloat16": _in_bfloat16("sdpa"), VARIANT: blocked_sdpa_attention},
                 QUANTIZED_ATTENTION: {"bfloat16": _in_bfloat16(QUANTIZED_ATTENTION),
                                       VARIANT: quantizing_attention(BLOCKS)}}
    for base, variants in functions.items():
        for variant, function in variants.items():
            AttentionInterface.register(base + VARIANT_SEPARATOR + variant, function)
            ALL_MASK_ATTENTION_FUNCTIONS.register(base + VARIANT_SEPARATOR + variant,
                                                  ALL_MASK_ATTENTION_FUNCTIONS[base])


_register()


def check_attention(choice: str) -> None:
    if choice not in ATTENTIONS:
        raise LlmquantError(f"unknown attention '{choice}'; allowed: {', '.join(ATTENTIONS)}")


def set_attention(model: nn.Module, choice: str) -> str:
    """Run ``model``'s attention as ``choice`` says (module docstring); returns what it runs: "model", "blocks" or
    "bfloat16" ("auto" resolved)."""
    check_attention(choice)
    configs = attention_configs(model)
    bases = [config._attn_implementation.partition(VARIANT_SEPARATOR)[0] for config in configs]
    refused = sorted({base for base in bases if base not in WRAPPABLE}) if choice != "model" else []
    if refused and choice != "auto":  # (checked for every config before any changes)
        raise LlmquantError(f"attention '{choice}' wraps sdpa attention; this model uses '{refused[0]}' "
                            f"(allowed: {', '.join(WRAPPABLE)}, or the attention 'model')")
    variant = "model" if choice == "model" or refused else VARIANT if choice == "auto" else choice
    for config, base in zip(configs, bases, strict=True):
        config._attn_implementation = base if variant == "model" else base + VARIANT_SEPARATOR + variant
    return variant


def attention_in_use(model: nn.Module) -> str:
    """The variant ``model``'s attention runs ("model" where none, or where its configs disagree)."""
    variants = {config._attn_implementation.partition(VARIANT_SEPARATOR)[2] for config in attention_configs(model)}
    only = variants.pop() if len(variants) == 1 else ""
    return only or "model"

"""INT8 KV cache: the keys and values an attention stores and reads are quantized.

The quantizer sits where attention reads them: llmquant registers the attention implementation
``llmquant_sdpa`` in transformers' `AttentionInterface`; it fake-quantizes the key and value states
(after RoPE and after the cache update, i.e. exactly what the cache holds) with the attention module's
`KVCacheQuantizer`, then runs transformers' sdpa attention. Modules without a
quantizer run unchanged.

Granularity: ``tensor`` is one scale per layer for K and one for V (static: calibrated; dynamic: from
the current tensor); ``token`` is one scale per (batch, kv head, position) over head_dim, dynamic.
Scale names follow compressed-tensors: ``k_scale`` and ``v_scale`` on the attention module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llmquant.quant import Observer, QuantSpec, fake_quantize

QUANTIZED_ATTENTION = "llmquant_sdpa"


class KVCacheQuantizer(nn.Module):
    """Holds the spec and (static) scales of one attention module's key and value cache."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        if not spec.dynamic:
            self.register_buffer("k_scale", torch.ones(1))
            self.register_buffer("v_scale", torch.ones(1))
        self.observers: tuple[Observer, Observer] | None = None

    def start_observing(self) -> None:
        if not self.spec.dynamic:
            self.observers = (Observer(self.spec), Observer(self.spec))

    @torch.no_grad()
    def stop_observing(self) -> None:
        if self.observers is None:
            return
        self.k_scale.copy_(self.observers[0].qparams()[0].reshape(1))
        self.v_scale.copy_(self.observers[1].qparams()[0].reshape(1))
        self.observers = None

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.observers is not None:
            self.observers[0].update(key)
            self.observers[1].update(value)
            return key, value
        if self.spec.dynamic:
            return fake_quantize(key, self.spec), fake_quantize(value, self.spec)
        zero = torch.zeros(1, 1)
        return (
            fake_quantize(key, self.spec, self.k_scale.reshape(1, 1), zero),
            fake_quantize(value, self.spec, self.v_scale.reshape(1, 1), zero),
        )


def _quantizing_attention(base: str) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        quantizer = getattr(module, "kv_cache_quantizer", None)
        if quantizer is not None:
            key, value = quantizer(key, value)
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)

    return attention


def _register() -> None:
    AttentionInterface.register(QUANTIZED_ATTENTION, _quantizing_attention("sdpa"))
    ALL_MASK_ATTENTION_FUNCTIONS.register(QUANTIZED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


_register()


def enable_kv_quantization(model: PreTrainedModel) -> None:
    """Route the model's attention through the quantizing implementation (a no-op if already done)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = QUANTIZED_ATTENTION

"""Causal prefill attention in blocks of query rows, each reading only the keys it can see: the same function as
sdpa, with about half the products of a short prefill on the CPU.

softmax(q_i k_j^T * scale) over j <= i, times v: query rows [s, e) need the keys [0, e) only, the last e - s of them
under the causal mask ``tril`` shifted by s. torch's CPU flash attention (``scaled_dot_product_attention``,
``is_causal``) takes the keys in blocks of 512 and, below 768 positions, the queries in blocks of at most 64 rows,
so up to 512 positions it multiplies the whole score matrix and masks half of it, and up to 767 it skips at most one
block of keys (`scripts/runtime_profile.py attention`, 9 query and 3 KV heads of 64, 512 positions, one thread: 7.69
ms causal against 7.53 ms without any mask). `causal_block_attention` calls it once per
block of `BLOCK` rows over the keys [0, e) (the first block square and causal, the others with an additive mask).
`scripts/runtime_profile.py attention` on an AMD EPYC (Zen 4), those heads, batch 1: 512 positions 7.70 -> 5.45 ms
on one thread, 4.89 -> 4.59 and 3.99 -> 3.23 on two (two runs); 384 positions 4.28 -> 3.08 and 2.41 -> 1.96; 767
positions 13.95 -> 11.52 and 8.99 -> 9.26 / 7.42 -> 6.68. From 768 positions torch's query blocks grow to 256 rows
and its kernel skips the key blocks past them: on two threads 768 positions 6.99 -> 9.22 / 6.60 -> 6.65, 2,048
positions 41.0 -> 58.1 (on one, 2,048 positions 72.3 -> 74.6); hence `MAX_POSITIONS` (BENCHMARKS.md "Runtimes"). The
sums run in another order: not the same bits, the same function to float32's rounding (largest difference 4.8e-7
there; tested).

`blocked_sdpa_attention` is transformers' sdpa attention with that path for a causal prefill on the CPU (no mask,
as many keys as queries, no dropout, `MIN_POSITIONS` to `MAX_POSITIONS` positions) and transformers' own
``sdpa_attention_forward`` for anything else (a mask, a decode step, a cache with earlier positions, a GPU, whose
flash kernels skip the masked blocks themselves). `llmquant.nn.attention_choice` registers it as the variant
``sdpa+blocks`` (`VARIANT`) with sdpa's mask function, so the model builds the same masks as for sdpa.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llmquant.nn.kv_cache import VARIANT_SEPARATOR

BLOCK = 64  # query rows a call (32 and 64 alike, 128 slower: `scripts/runtime_profile.py attention`)
MIN_POSITIONS = 2 * BLOCK
MAX_POSITIONS = 767  # from 768 positions torch's own blocks gain as much or more (module docstring)
VARIANT = "blocks"
NAME = "sdpa" + VARIANT_SEPARATOR + VARIANT  # what `llmquant.nn.attention_choice` registers it as


@functools.lru_cache(maxsize=64)
def _visible(rows: int, start: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows, start + rows]: 0 where query row start + r sees the key (0 .. start + r), -inf elsewhere; the additive
    mask sdpa makes of a boolean one at every call (`aten::where`: 420 calls and 11 ms of a 543-ms prefill, one
    thread, `scripts/runtime_profile.py profile`), made once."""
    seen = torch.ones(rows, start + rows, dtype=torch.bool, device=device).tril(start)
    return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))


def causal_block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                           block: int = BLOCK) -> torch.Tensor:
    """Causal attention of ``query`` [batch, heads, positions, dim] over ``key`` / ``value`` [batch, kv heads,
    positions, dim] (as many positions; grouped heads when kv heads divide heads), one sdpa call per ``block`` query
    rows over the keys up to its last row; returns [batch, positions, heads, dim], the layout transformers' attention
    functions return."""
    batch, heads, positions, _ = query.shape
    grouped = key.shape[1] != heads
    output = query.new_empty(batch, positions, heads, value.shape[-1])
    for start in range(0, positions, block):
        end = min(start + block, positions)
        mask = None if start == 0 else _visible(end - start, start, query.dtype, query.device)
        rows = F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, :end], value[:, :, :end],
                                              attn_mask=mask, is_causal=start == 0, scale=scale, enable_gqa=grouped)
        output[:, start:end] = rows.transpose(1, 2)
    return output


def _takes_blocks(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                  dropout: float, is_causal: bool | None, kwargs: dict) -> bool:
    positions = query.shape[2]
    if not MIN_POSITIONS <= positions <= MAX_POSITIONS:  # (first: a decode step, every layer, leaves here)
        return False
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (causal and attention_mask is None and query.device.type == "cpu" and dropout == 0.0
            and key.shape[2] == positions
            and query.shape[1] % key.shape[1] == 0
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None)


def blocked_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (module docstring)."""
    if _takes_blocks(module, query, key, attention_mask, dropout, is_causal, kwargs):
        return causal_block_attention(query, key, value, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


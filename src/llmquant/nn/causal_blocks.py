"""Causal prefill attention in blocks of query rows, each reading only the keys it can see: the same function as
sdpa, with about half the products of a prefill on the CPU.

softmax(q_i k_j^T * scale) over j <= i, times v: query rows [s, e) need the keys [0, e) only, the last e - s of them
under the causal mask ``tril`` shifted by s. torch's CPU flash attention (``scaled_dot_product_attention``,
``is_causal``) takes the keys in blocks of 512 and, below 768 positions, the queries in blocks of at most 64 rows,
so up to 512 positions it multiplies the whole score matrix and masks half of it, and up to 767 it skips at most one
block of keys (`scripts/runtime_profile.py attention`, 9 query and 3 KV heads of 64, 512 positions, one thread: 7.69
ms causal against 7.53 ms without any mask). `causal_block_attention` computes each block of `BLOCK` rows over the
keys [0, e) in one of two ways, the same function to float32's rounding (the sums in another order; tested):

- the op (``causal_attention.cpp``, built by torch's cpp_extension like the int8 ops of `llmquant.nn.int8_gemv`, on
  x86 CPUs with AVX2): each (batch, head, block) a piece of work of two float32 products (BLAS's sgemm, torch's own)
  and the softmax between them, the pieces on torch's threads from a shared counter, the longest first, from
  `MIN_POSITIONS` to `OP_MAX_POSITIONS` positions. On the AMD EPYC (Zen 4) of BENCHMARKS.md, those heads, batch 1,
  the query in transformers' layout, two threads: 512 positions 4.00 ms for sdpa, 3.13 for one sdpa call per block,
  2.42 for the op; 767 positions 7.42, 6.51, 5.11; 2,048 positions 39.9, 57.2, 33.8; 4,096 positions 143, 213, 131
  (one thread: 512 positions 7.67, 5.05, 4.52; `bench/speed_2026-12-05_epyc_zen4_attention_op/attention_t*.txt`);
- without it (no AVX2, no compiler, ``LLMQUANT_GEMV=0``, not float32: `attention_op_refusal`): one sdpa call per
  block (`sdpa_blocks`; the first block square and causal, the others with an additive mask), up to
  `MAX_POSITIONS`: 64 rows of 9 heads are too few pieces for sdpa's threads (512 positions 5.05 -> 3.13 ms from one
  thread to two, where the op goes 4.52 -> 2.42). From 768 positions torch's query blocks grow to 256 rows and its
  kernel skips the key blocks past them: on two threads 768 positions 6.99 -> 9.22 / 6.60 -> 6.65, 2,048 positions
  41.0 -> 58.1 (on one, 2,048 positions 72.3 -> 74.6), hence that limit (BENCHMARKS.md "Runtimes").

`blocked_sdpa_attention` is transformers' sdpa attention with that path for a causal prefill on the CPU (no mask,
as many keys as queries, no dropout, `MIN_POSITIONS` positions up to the limit of the way that runs), the op for a
decode step over a float cache (one query row over up to `OP_MAX_POSITIONS` keys, no mask, where the op runs: each KV
head's group of query heads in one piece, its keys and values read once for the group; on the AMD EPYC with AVX2 only
of BENCHMARKS.md, a W8A8 checkpoint's decode step after 512 tokens, one thread, `scripts/runtime_profile.py
decodeattention`: 138.3 -> 128.8 ms at batch 8, 49.3 -> 49.2 at batch 1), and transformers' own
``sdpa_attention_forward`` for anything else (a mask, a prefill with earlier positions in the cache, a GPU, whose
flash kernels skip the masked blocks themselves, and a gradient to pass back: the op has no backward, so scale
training and learned rotations run sdpa's, whose gradient reaches q, k and v).
`llmquant.nn.attention_choice` registers it as the variant ``sdpa+blocks`` (`VARIANT`) with sdpa's mask function, so
the model builds the same masks as for sdpa.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llmquant.nn.int8_gemv import build_op, call_op, float32_avx2_refusal
from llmquant.nn.kv_cache import VARIANT_SEPARATOR

BLOCK = 64  # query rows a call (32 and 64 alike, 128 slower: `scripts/runtime_profile.py attention`)
MIN_POSITIONS = 2 * BLOCK
MAX_POSITIONS = 767  # from 768 positions torch's own blocks gain as much or more (module docstring)
OP_MAX_POSITIONS = 4096  # the op, as far as measured (module docstring)
SOURCE = Path(__file__).with_name("causal_attention.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
_op: ModuleType | None = None
_build_error: str | None = None
VARIANT = "blocks"
NAME = "sdpa" + VARIANT_SEPARATOR + VARIANT  # what `llmquant.nn.attention_choice` registers it as


@functools.lru_cache(maxsize=64)
def _visible(rows: int, start: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows, start + rows]: 0 where query row start + r sees the key (0 .. start + r), -inf elsewhere; the additive
    mask sdpa makes of a boolean one at every call (`aten::where`: 420 calls and 11 ms of a 543-ms prefill, one
    thread, `scripts/runtime_profile.py profile`), made once."""
    seen = torch.ones(rows, start + rows, dtype=torch.bool, device=device).tril(start)
    return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))


def attention_op_refusal(tensor: torch.Tensor) -> str | None:
    """Why the attention op does not run for ``tensor`` (the query), or None (it may still fail to build:
    `attention_op`)."""
    return float32_avx2_refusal(tensor, "states", _build_error)


def attention_op(tensor: torch.Tensor) -> ModuleType | None:
    """The built op where it runs for ``tensor`` (built on the first call, once per machine), else None (the reason
    logged once and kept for `attention_op_refusal`)."""
    global _op, _build_error
    if attention_op_refusal(tensor) is not None:
        return None
    if _op is None:
        _op, _build_error = build_op(SOURCE, "llmquant_causal_attention", FLAGS, "one sdpa call per block")
    return _op


def max_positions(query: torch.Tensor) -> int:
    """The most positions the blocks take for ``query``: the op's limit where it runs, else the sdpa calls'."""
    return OP_MAX_POSITIONS if attention_op(query) is not None else MAX_POSITIONS


def causal_block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                           block: int = BLOCK) -> torch.Tensor:
    """Causal attention of ``query`` [batch, heads, positions, dim] over ``key`` / ``value`` [batch, kv heads, kv
    positions, dim] (grouped heads when kv heads divide heads; as many positions, or more: the query rows are the last
    positions, a cache holding the earlier ones) in blocks of ``block`` query rows over the keys up to each block's
    last row, by the op where it runs (float32 states, the last dimension contiguous), else `sdpa_blocks`; returns
    [batch, positions, heads, dim], the layout transformers' attention functions return."""
    op = attention_op(query)
    if op is not None and all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in (query, key, value)):
        return call_op(op, "causal_attention", query, key, value,
                       query.shape[-1] ** -0.5 if scale is None else scale, block)
    return sdpa_blocks(query, key, value, scale, block)


def sdpa_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                block: int = BLOCK) -> torch.Tensor:
    """`causal_block_attention` by one sdpa call per block."""
    batch, heads, positions, _ = query.shape
    grouped, earlier = key.shape[1] != heads, key.shape[2] - positions
    output = query.new_empty(batch, positions, heads, value.shape[-1])
    for start in range(0, positions, block):
        end = min(start + block, positions)
        first = start + earlier == 0  # (sdpa's is_causal aligns the first row with the first key)
        mask = None if first else _visible(end - start, earlier + start, query.dtype, query.device)
        rows = F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, :earlier + end],
                                              value[:, :, :earlier + end], attn_mask=mask, is_causal=first,
                                              scale=scale, enable_gqa=grouped)
        output[:, start:end] = rows.transpose(1, 2)
    return output


def _takes_blocks(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float, is_causal: bool | None, kwargs: dict) -> bool:
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False  # (a gradient to pass back: the op has no backward; training takes sdpa's)
    if not (attention_mask is None and query.device.type == "cpu" and dropout == 0.0
            and query.shape[1] % key.shape[1] == 0
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None):
        return False  # (first: the checks that read no environment, at every layer of every step)
    positions, kv_positions = query.shape[2], key.shape[2]
    if positions == 1:  # a decode step (one row sees every key: causal or not): where the op runs
        return kv_positions <= OP_MAX_POSITIONS and attention_op(query) is not None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return causal and MIN_POSITIONS <= positions <= max_positions(query) and kv_positions == positions


def blocked_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (module docstring)."""
    if _takes_blocks(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        return causal_block_attention(query, key, value, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


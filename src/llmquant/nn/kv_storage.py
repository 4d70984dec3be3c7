"""INT8 KV-cache storage: on the int8 runtime the cache really holds int8 codes and float scales (and a float cache
grows in place).

`llmquant.nn.kv_cache` simulates the INT8 KV cache: transformers' cache stores float keys and values and
the attention wrapper fake-quantizes all of them at every call. On the int8 runtime (`set_kv_cache_runtime`,
called by `llmquant.nn.quant_linear.set_runtime`) a forward pre-hook on each attention module with a
`KVCacheQuantizer` puts an `Int8CacheLayer` in the ``DynamicCache`` entry of that attention (still an empty
plain ``DynamicLayer``), so the cache stores 1 byte per element plus the scales. Only public parts of transformers'
cache API are used: the hook finds the ``Cache`` among the attention's arguments by its type (transformers renamed
that argument from ``past_key_values`` to ``cache`` in 5.24), and the entry is replaced in ``Cache.layers`` by a
subclass of ``DynamicLayer``. `int8_kv_cache` builds such a cache up front, to pass to ``generate`` or a forward
(`cache_argument` names the argument; `returned_cache` reads it back from an output). The layer

- rotates the incoming keys with the attention's ``qk_rotation`` (QuaRot's R3), if any, and subtracts their
  calibrated mean where the quantizer centres keys (`KVCacheQuantizer.centered`);
- quantizes the incoming keys and values: q = clamp(round(x / s), -128, 127), with s the calibrated
  ``k_scale``/``v_scale`` (static per tensor), absmax over head_dim / 127 for each (batch, kv head,
  position) (dynamic per token), or absmax of the incoming chunk / 127 (dynamic per tensor);
- appends the codes and one scale per (batch, kv head or 1, position) along the sequence, in place: the stores
  grow by `GROWTH` positions at a time (a decode step writes one position instead of copying the whole cache as
  ``torch.cat`` does, which transformers' float layer pays at every step);
- returns the dequantized keys and values of the whole sequence, x_hat = q * s (the codes converted, then scaled
  in place), written into a per-thread workspace that every layer reuses: they are valid until the next update of
  an int8 cache layer in the same thread, which is after the attention that reads them.

On a CPU with AVX512-VNNI the per-token codes (every step) and the dequantization (one pass) are calls of the
decode op of `llmquant.nn.int8_gemv`: the same bits. Where an op runs (the VNNI op, or the AVX2 op on a CPU without
VNNI or AMX: `kv_kernel`), a decode step's codes of its keys and values go straight into the stores while they have
room, per token (`store_token_codes`) or under a static per-tensor scale, int8 or E4M3 (`store_static_codes`), the
same bits (per token: one call instead of a stack, a quantization and two appends; a layer's update at batch 1
after 512 positions took 94 against 176 us on the AMD EPYC (AVX2) of BENCHMARKS.md, one thread,
`scripts/runtime_profile.py kvlayer`).

Attention over the codes (`decode_attention`: the VNNI op's, or on a CPU with AVX2 but without VNNI or AMX the AVX2
op's: `kv_kernel`; int8 or FP8 E4M3 codes): at a decode step (one
new position) the layer does not dequantize the cache; it returns stand-ins of the keys' and values' shapes, and the
attention wrapper of `llmquant.nn.kv_cache` asks the layer to attend (`attend`: softmax(q k_q^T s_k * scaling +
mask) (s_v v_q), each row of codes read once, nothing written but the output). That runs only where it is safe: the
model's attention must hand the cache's keys and values to the attention function untouched, which the first decode
step of each attention checks by identity (`KVCacheQuantizer.passes_cache_untouched`) while it still dequantizes;
and the call must be one that sdpa would make alike (sdpa underneath, one query position, float32, no dropout,
position bias or soft-capping, a mask of one row per batch or head). Anything else gets the dequantized keys and
values as before (`readable`). Not the simulation's bits: the op's float32 order and exp differ from sdpa's by
float32 roundings (tests bound it; the tokens of greedy generation are the simulation's in the tests);
``LLMQUANT_GEMV=0`` gives the exact path.

The hook tells the attention wrapper that the keys it receives are already rotated and quantized: the wrapper
then rotates only the query and quantizes nothing again.

Same function as the simulation: static per tensor and dynamic per token quantize each position on its own,
so storing codes gives the simulation's values. Dynamic per tensor differs: the simulation takes one scale
over the whole sequence at each call, the cache one scale per incoming chunk (the prompt, then each new
token), which it cannot revisit. A forward without a cache (``use_cache=False``: perplexity, lm-eval) or with
an empty one (a prefill) is identical in every case.

The float cache of the other attentions on the int8 runtime (no `KVCacheQuantizer`, or one that does not store codes)
takes the same stores that grow in place (`FloatCacheLayer`, put in place by the same pre-hook, which every module
with a ``layer_idx`` gets): the same values as transformers' layer, which copies the whole cache into a new tensor at
every decode step. A decode step after 512 tokens on the AMD EPYC (Zen 4) of BENCHMARKS.md, W8A8 per token: at batch
8 1.14x as fast on one thread, 1.02x on two; at batch 1 1.005x and 1.018x (`scripts/runtime_profile.py kv`: the
copy saved, less the attention's time to read keys and values not just copied; BENCHMARKS.md "Runtimes"). The fake
runtime keeps transformers' layers.

Left to the simulation: sliding-window (and other non-plain) cache layers, caches that are not a
``DynamicCache`` (static, quantized, encoder-decoder), and KV specs other than symmetric 8-bit per tensor
or per token with a fixed clip ratio (a clip grid runs in the simulation). ``DynamicCache``'s iteration (its
legacy format) yields the int8 codes of these layers.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from llmquant.errors import LlmquantError
from llmquant.nn.causal_blocks import NAME as BLOCKED_SDPA
from llmquant.nn.int8_gemv import (
    avx2_kernel,
    cpu_kernel,
    decode_attention,
    dequantize_rows,
    kv_kernel,
    static_fp8_codes,
    store_static_codes,
    store_token_codes,
)
from llmquant.nn.int8_linear import avx2_codes, input_codes, op_codes
from llmquant.nn.kv_cache import CODE_READER, STORED_FLAG, KVCacheQuantizer
from llmquant.quant import QuantSpec, qparams_for, quantize
from llmquant.quant.primitives import codes_to_float


def supports_code_storage(spec: QuantSpec) -> bool:
    """Whether keys/values with this spec can be stored as 8-bit codes (int8 or float8) with one scale per
    position."""
    return spec.bits == 8 and spec.symmetric and spec.granularity in ("tensor", "token") and spec.clip_grid is None


def stores_codes(quantizer: KVCacheQuantizer) -> bool:
    """Whether the int8 runtime stores this quantizer's keys and values as codes: a spec that allows it
    (`supports_code_storage`) and no float first positions (those caches stay in the simulation's, on every
    runtime)."""
    return supports_code_storage(quantizer.spec) and not quantizer.keep_first


def scale_shape(states: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the stored scales of ``states`` ``[..., h, s, d]``: ``[..., h, s, 1]`` per token, ``[..., 1, s, 1]``
    per tensor (one float per position: a few bytes next to the h * d codes)."""
    *lead, h, s, _ = states.shape
    return *lead, h if spec.granularity == "token" else 1, s, 1


def quantize_states(
    states: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of ``states`` ``[..., b, h, s, d]`` and their scales ``[..., b, h, s, 1]`` (per token) or
    ``[..., b, 1, s, 1]`` (per tensor): q = clamp(round(x / s), -128, 127), with s the given static ``scale`` or,
    when None, absmax / 127 over head_dim (per token) or over all of ``states`` (per tensor). The values of
    `fake_quantize`; integer codes by the decode op where it runs (static, dynamic per token or per tensor; per token
    by the AVX2 op on a CPU without VNNI or AMX), and FP8 codes under a static scale per tensor, else by the few
    operations of the int8 Linears' input codes (`input_codes`: a decode step pays for each operation) or
    `quantize`."""
    static = None if scale is None else scale.reshape(1, 1).float()
    codes = None
    if (spec.type == "float" and static is not None and spec.granularity == "tensor"
            and states.dtype == torch.float32 and (kernel := cpu_kernel(states)) is not None):
        codes, scale = static_fp8_codes(kernel, states, static, spec.qmax), static
    elif spec.type == "int" and spec.code_dtype == torch.int8 and states.dtype == torch.float32:
        rows, dynamic = states.reshape(-1, states.shape[-1]), spec.granularity if static is None else None
        arguments = (dynamic, static, int(spec.qmin), int(spec.qmax), spec.clip_ratio)
        if (kernel := cpu_kernel(states)) is not None:
            codes, scale = op_codes(kernel, rows, *arguments)
        elif (kernel := avx2_kernel(states)) is not None:
            codes, scale = avx2_codes(kernel, rows, *arguments)
    if codes is not None:
        codes = codes.reshape(states.shape)
    elif spec.type == "int":
        codes, scale = input_codes(states.float(), spec.granularity if static is None else None, static,
                                   int(spec.qmin), int(spec.qmax), spec.clip_ratio)
        codes = codes.to(spec.code_dtype)
    else:
        scale, zero = qparams_for(states, spec) if static is None else (static, torch.zeros_like(static))
        codes = quantize(states, scale, zero, spec)
    shape = scale_shape(states, spec)
    if scale.numel() == 1:  # static, or dynamic per tensor: the one scale is recorded at every position
        return codes, scale.reshape([1] * len(shape)).expand(shape).contiguous()
    return codes, scale.reshape(shape)


def dequantize_states(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, slot: str | None = None
                      ) -> torch.Tensor:
    """x_hat = q * s, in ``dtype`` (what `fake_quantize` returns for a symmetric spec): the codes converted (exact)
    into the output, then scaled in place: two vectorised passes, faster here than one multiplication that promotes
    int8 on the fly (`scripts/runtime_profile.py dequant`). With a ``slot``, the output is this thread's workspace
    for it (`workspace`)."""
    out = (workspace(slot, codes.shape, dtype, codes.device) if slot is not None
           else torch.empty(codes.shape, dtype=dtype, device=codes.device))
    if (codes.dtype == torch.int8 and dtype == torch.float32 and scales.shape[:-1] == codes.shape[:-1]
            and codes.dim() >= 3 and (kernel := cpu_kernel(codes)) is not None):
        planes = codes.flatten(0, -3)
        if planes.stride(-1) == 1 and planes.stride(-2) == codes.shape[-1]:  # (rows contiguous: views of the stores)
            dequantize_rows(kernel, planes, scales.flatten(0, -3), out.view(planes.shape))
            return out
    return out.copy_(codes_to_float(codes) if codes.dtype == torch.float8_e4m3fn else codes).mul_(scales)


_workspaces = threading.local()


def workspace(slot: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` in this thread's buffer ``slot``, reused by every int8 cache layer: the dequantized keys
    and values a layer returns live only until the attention that reads them is done, and a new tensor of a growing
    size at every decode step can come from fresh pages of memory each time, depending on the allocator's history
    (`scripts/runtime_profile.py dequant`). The buffer grows to twice what is asked when too small."""
    buffers = _workspaces.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    buffer = buffers.get(slot)
    if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != device:
        buffer = buffers[slot] = torch.empty(2 * size, dtype=dtype, device=device)
    return buffer[:size].view(shape)


SDPA_AT_DECODE = ("sdpa", BLOCKED_SDPA)  # (the blocks: sdpa itself at one query position)
GROWTH = 256  # positions by which a store grows when full
FLOAT_STORES = "_llmquant_float_stores"  # on an attention: its plain float cache layer becomes a `FloatCacheLayer`


def appended(store: torch.Tensor | None, filled: list[torch.Tensor], new: Sequence[torch.Tensor]) -> torch.Tensor:
    """Write ``new`` (``p`` tensors ``[..., n, d]``: a tensor ``[p, ..., n, d]`` or a sequence, e.g. a step's keys and
    values, not stacked) after the positions ``filled`` holds along the sequence (dim -2) in the ``p`` planes of
    ``store`` ``[p, ..., capacity, d]`` (``filled[i]``: the first positions of plane i); return the store. A new one,
    `GROWTH` positions beyond what is needed, holds ``filled`` and ``new`` when ``store`` is None (none yet, or
    ``filled`` is no longer a view of it) or full."""
    first = new[0]
    length, needed = filled[0].shape[-2], filled[0].shape[-2] + first.shape[-2]
    if store is None or store.shape[-2] < needed:
        grown = first.new_empty(len(new), *first.shape[:-2], needed + GROWTH, first.shape[-1])
        for plane, part in zip(grown, filled, strict=True):
            plane[..., :length, :] = part
        store = grown
    for plane, part in zip(store.narrow(-2, length, first.shape[-2]), new, strict=True):
        plane.copy_(part)  # (float codes already rounded: the cast to int8 is exact)
    return store


@dataclass
class _Store:
    """A store of `appended` and the views of its planes the layer's attributes ``names`` hold."""

    tensor: torch.Tensor
    names: tuple[str, ...]
    views: tuple[torch.Tensor, ...]


class StoreLayer(DynamicLayer):
    """A ``DynamicLayer`` whose tensors (`STATES`) are views of the first positions of stores that grow by `GROWTH`
    positions (`appended`): what `Int8CacheLayer` and `FloatCacheLayer` share, including how they follow every
    operation transformers applies to a layer (a crop, a beam reorder, a batch selection)."""

    STATES: tuple[str, ...] = ("keys", "values")

    def __init__(self) -> None:
        super().__init__()
        self._stores: dict[str, _Store] = {}  # the tensors STATES are views of the first positions of these

    def _append(self, store_name: str, names: tuple[str, ...], new: Sequence[torch.Tensor]) -> torch.Tensor:
        """Append ``new`` (one plane per name) to the store ``store_name`` and return it; the attributes ``names``
        become views of the filled positions of its planes. (Transformers may have replaced an attribute since the last
        call: a beam reorder, a batch selection; then the store is rebuilt from the attributes.)"""
        filled = [getattr(self, name) for name in names]
        entry = self._stores.get(store_name)
        store = appended(entry.tensor if self._current(entry) else None, filled, new)
        self._fill(store_name, names, store, filled[0].shape[-2] + new[0].shape[-2])
        return store

    def _current(self, entry: _Store | None) -> bool:
        """Whether the layer's attributes are still the views of ``entry``'s store it made (`_append`)."""
        return entry is not None and all(getattr(self, name) is view for name, view in zip(entry.names, entry.views,
                                                                                              strict=True))

    def _fill(self, store_name: str, names: tuple[str, ...], store: torch.Tensor, length: int) -> None:
        """Record ``store`` under ``store_name``; its planes' first ``length`` positions become the attributes
        ``names``."""
        views = store.narrow(-2, 0, length).unbind(0)
        self._stores[store_name] = _Store(store, names, views)
        for name, view in zip(names, views, strict=True):
            setattr(self, name, view)

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor], keeps_views: bool = False) -> None:
        """Apply ``function`` to every tensor of `STATES`; unless it keeps them views of the stores (a crop), the
        stores are released and the next update copies the results into new ones."""
        for name in self.STATES:
            setattr(self, name, function(getattr(self, name)))
        if not keeps_views:
            self._stores = {}
        for entry in self._stores.values():
            entry.views = tuple(getattr(self, name) for name in entry.names)

    def reset(self) -> None:
        super().reset()
        self._stores = {}

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            super().crop(tokens_to_remove)  # raises: only negative counts are supported
        if tokens_to_remove < 0 and self.is_initialized:
            self._map(lambda t: t[..., :tokens_to_remove, :], keeps_views=True)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._map(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class FloatCacheLayer(StoreLayer):
    """A ``DynamicLayer`` of float keys and values ``[b, h, s, d]`` (the model's dtype) held in one store that grows
    by `GROWTH` positions: a decode step writes its position in place, where transformers' layer copies the whole
    cache into a new tensor (``torch.cat``) at every step. A prefill's keys and values are kept as they come (the
    first decode step copies them into a store, once, as ``torch.cat`` would). The same values, so the same logits
    (tested). Put in place of the empty plain layers of the attentions without a `KVCacheQuantizer` on the int8
    runtime (`set_kv_cache_runtime`); its keys and values are then views of the store (strided along the heads)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self._paired = key_states.shape == value_states.shape  # (else one store each)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.shape[-2] == 0:  # a prefill: kept as it comes (the first decode step copies it into a store,
            self.keys, self.values = key_states, value_states  # as torch.cat would: a prefill copies nothing)
            self._stores = {}
            return self.keys, self.values
        if self._paired:  # (a decode step: written in place while the store has room)
            self._append("states", ("keys", "values"), (key_states, value_states))
        else:
            self._append("keys", ("keys",), (key_states,))
            self._append("values", ("values",), (value_states,))
        return self.keys, self.values


class Int8CacheLayer(StoreLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are int8 codes ``[b, h, s, d]``, with float32 scales
    ``key_scales``/``value_scales`` ``[b, h or 1, s, 1]`` (see the module docstring)."""

    STATES = ("keys", "values", "key_scales", "value_scales")  # (the scales follow the codes through every operation)

    def __init__(self, quantizer: KVCacheQuantizer, rotation: nn.Module | None = None) -> None:
        super().__init__()
        self.quantizer, self.rotation = quantizer, rotation
        self.key_scales: torch.Tensor | None = None
        self.value_scales: torch.Tensor | None = None
        self._returned: tuple[torch.Tensor, torch.Tensor] | None = None  # what the last update returned
        self._deferred = False  # whether that was stand-ins (`attend` reads the codes)
        self._paired = False  # whether keys and values share one store (set with the first update)
        self._op: ModuleType | None = None  # the op serving this step (`llmquant.nn.int8_gemv.kv_kernel`), if any

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[..., :0, :]  # [b, h, 0, d]: the stored tensors grow from there along the sequence
        self.keys = empty.to(self.quantizer.spec.code_dtype)  # int8, or float8 for an FP8 cache
        self.values = value_states[..., :0, :].to(self.quantizer.spec.code_dtype)
        self.key_scales = empty.new_empty(scale_shape(empty, self.quantizer.spec), dtype=torch.float32)
        self.value_scales = empty.new_empty(scale_shape(value_states[..., :0, :], self.quantizer.spec),
                                            dtype=torch.float32)
        spec = self.quantizer.spec  # keys and values side by side in one store: dynamic per token, of one shape
        self._paired = spec.dynamic and spec.granularity == "token" and key_states.shape == value_states.shape
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys (rotated by R3, if any) and values as int8; return the whole sequence dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotation is not None:
            key_states = self.rotation(key_states)
        spec, quantizer = self.quantizer.spec, self.quantizer
        key_states = quantizer.centered(key_states)  # keys minus their calibrated mean, if centred
        self._op = kv_kernel(key_states)  # (asked once a step, for the codes and the attention)
        if self._paired:
            # keys and values side by side in one store: one quantization, one append of the codes and one of the
            # scales, one dequantization (each position is quantized on its own: stacking changes no code)
            if not self._store_in_place(key_states, value_states):
                codes, scales = quantize_states(torch.stack((key_states, value_states)), spec, None)
                self._append("codes", ("keys", "values"), codes)
                self._append("scales", ("key_scales", "value_scales"), scales)
        else:
            for codes_name, scales_name, states, static in (("keys", "key_scales", key_states, "k_scale"),
                                                            ("values", "value_scales", value_states, "v_scale")):
                if not self._store_static_in_place(codes_name, scales_name, states, static):
                    codes, scales = quantize_states(states, spec, None if spec.dynamic else getattr(quantizer, static))
                    self._append(codes_name, (codes_name,), codes.unsqueeze(0))
                    self._append(scales_name, (scales_name,), scales.unsqueeze(0))
        self._deferred = self._attends_over_codes(key_states)
        if self._deferred:  # stand-ins of the right shapes, never read (`attend`)
            zero = _zero(self.dtype, self.device)
            self._returned = (zero.expand(self.keys.shape), zero.expand(self.values.shape))
        else:
            self._returned = self._dequantized()
        return self._returned

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x_hat = q * s of the whole sequence, in this thread's workspaces (`dequantize_states`)."""
        if self._paired:
            length = self.keys.shape[-2]
            code_store, scale_store = self._stores["codes"].tensor, self._stores["scales"].tensor
            states = dequantize_states(code_store.narrow(-2, 0, length), scale_store.narrow(-2, 0, length), self.dtype,
                                       "keys and values")
            return states[0], states[1]
        return (dequantize_states(self.keys, self.key_scales, self.dtype, "keys"),
                dequantize_states(self.values, self.value_scales, self.dtype, "values"))

    def _attends_over_codes(self, key_states: torch.Tensor) -> bool:
        """Whether this update's attention reads the codes (module docstring): a decode step, with int8 or E4M3 codes,
        in float32, where the op runs, for an attention seen handing its cache's keys and values over untouched."""
        return (key_states.shape[-2] == 1 and self.quantizer.passes_cache_untouched is True
                and self.keys.dtype in (torch.int8, torch.float8_e4m3fn) and self.dtype == torch.float32
                and self._op is not None)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, base: str, options: dict) -> torch.Tensor | None:
        """The attention output over the int8 codes (`llmquant.nn.int8_gemv.decode_attention`) after an update that
        returned stand-ins, where the call is one sdpa would compute alike; else None (`kv_cache.CodeReader`). After
        an update that dequantized, a decode step records whether the model handed the keys and values over
        untouched."""
        returned = self._returned is not None and key is self._returned[0] and value is self._returned[1]
        if not self._deferred:
            if query.shape[-2] == 1 and self.quantizer.passes_cache_untouched is None:
                self.quantizer.passes_cache_untouched = returned
            return None
        if not returned:  # (the identity held at the first decode step: the model's code took another branch)
            raise LlmquantError("the attention received other keys and values than its INT8 KV cache layer gave; "
                                "run with LLMQUANT_GEMV=0 to keep the cache dequantized")
        if not _sdpa_alike(query, attention_mask, base, options, self.keys.shape[-2]):
            return None
        scaling = options.get("scaling")
        return decode_attention(self._op, query, self.keys, self.values, self.key_scales,
                                self.value_scales, attention_mask,
                                query.shape[-1] ** -0.5 if scaling is None else scaling)

    def readable(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantized keys and values where the last update returned stand-ins, else ``key`` and ``value``."""
        if self._deferred and self._returned is not None and key is self._returned[0]:
            return self._dequantized()
        return key, value

    def _room(self, codes_name: str, scales_name: str, count: int) -> tuple[_Store, _Store, int] | None:
        """The stores ``codes_name`` and ``scales_name`` and their filled length, where the op runs and ``count`` new
        positions fit into them in place (their views still the layer's attributes); else None."""
        codes, scales = self._stores.get(codes_name), self._stores.get(scales_name)
        if self._op is None or codes is None or scales is None or not (self._current(codes) and self._current(scales)):
            return None
        length = getattr(self, codes.names[0]).shape[-2]
        return (codes, scales, length) if codes.tensor.shape[-2] >= length + count else None

    def _store_in_place(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Write the per-token codes and scales of new float32 keys and values straight into the paired stores where
        they have room and the op runs (`llmquant.nn.int8_gemv.store_token_codes`: `quantize_states`' bits, in one
        call instead of a stack, a quantization and two appends); else False, nothing written."""
        spec, count = self.quantizer.spec, key_states.shape[-2]
        if (spec.type != "int" or spec.code_dtype != torch.int8 or key_states.dtype != torch.float32
                or value_states.dtype != torch.float32 or (room := self._room("codes", "scales", count)) is None):
            return False
        codes, scales, length = room
        store_token_codes(self._op, [key_states, value_states], codes.tensor, scales.tensor, length, int(spec.qmax),
                          int(spec.qmin), spec.clip_ratio)
        self._fill("codes", codes.names, codes.tensor, length + count)
        self._fill("scales", scales.names, scales.tensor, length + count)
        return True

    def _store_static_in_place(self, codes_name: str, scales_name: str, states: torch.Tensor, static: str) -> bool:
        """Write the static per-tensor codes (int8 or E4M3) of new float32 keys or values and their scale straight into
        the stores ``codes_name`` and ``scales_name`` where they have room and the op runs
        (`llmquant.nn.int8_gemv.store_static_codes`: `quantize_states`' bits); else False, nothing written."""
        spec, count = self.quantizer.spec, states.shape[-2]
        scale = getattr(self.quantizer, static, None)
        if (spec.dynamic or spec.granularity != "tensor" or scale is None or states.dtype != torch.float32
                or spec.code_dtype not in (torch.int8, torch.float8_e4m3fn)
                or (room := self._room(codes_name, scales_name, count)) is None):
            return False
        codes, scales, length = room
        store_static_codes(self._op, states, codes.tensor, scales.tensor, length, scale, spec.qmin, spec.qmax)
        self._fill(codes_name, codes.names, codes.tensor, length + count)
        self._fill(scales_name, scales.names, scales.tensor, length + count)
        return True

    def reset(self) -> None:
        super().reset()
        self.key_scales = self.value_scales = None
        self._returned, self._deferred = None, False


@functools.cache
def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dimensional zero, expanded into stand-ins of a cache's shapes."""
    return torch.zeros((), dtype=dtype, device=device)


def _sdpa_alike(query: torch.Tensor, mask: torch.Tensor | None, base: str, options: dict, positions: int) -> bool:
    """Whether transformers' sdpa attention would compute plain softmax(q k^T * scaling + mask) v for this call, of
    one query position (what `decode_attention` computes): sdpa underneath, float32, no dropout, position bias or
    soft-capping, and a mask of one row per batch (or head) over the cached positions."""
    plain = (base in SDPA_AT_DECODE and query.shape[-2] == 1 and query.dtype == torch.float32
             and not options.get("dropout")
             and options.get("position_bias") is None and options.get("softcap") is None)
    return plain and (mask is None or (mask.dim() == 4 and mask.shape[-2] == 1 and mask.shape[-1] == positions
                                       and mask.shape[0] == query.shape[0] and mask.shape[1] in (1, query.shape[1])
                                       and mask.dtype in (torch.bool, torch.float32)))


def _cache_among(args: tuple, kwargs: dict) -> Cache | None:
    """The ``Cache`` a module is called with, whatever the argument's name (``cache``, ``past_key_values``)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # (the names transformers passes: a decode step's
    if isinstance(cache, Cache):                                # every attention runs this hook)
        return cache
    return next((value for value in (*kwargs.values(), *args) if isinstance(value, Cache)), None)


def _int8_layer_for(attention: nn.Module) -> Int8CacheLayer | None:
    """A new `Int8CacheLayer` for ``attention`` when its quantizer stores int8 now (int8 runtime, not calibrating)."""
    quantizer = getattr(attention, "kv_cache_quantizer", None)
    if (not isinstance(quantizer, KVCacheQuantizer) or not stores_codes(quantizer)
            or quantizer.runtime != "int8" or quantizer.observing):
        return None
    return Int8CacheLayer(quantizer, getattr(attention, "qk_rotation", None))


def _adopt(cache: Cache, index: int, attention: nn.Module) -> bool:
    """Make entry ``index`` of ``cache``, while it is still an empty plain ``DynamicLayer`` (created up front from the
    config, or lazily as `Cache.update` does) or an empty `FloatCacheLayer`, an `Int8CacheLayer` where ``attention``'s
    quantizer stores int8, else a `FloatCacheLayer` where ``attention`` is on the int8 runtime (`FLOAT_STORES`);
    whether the entry stores int8. (A module above the attention with a ``layer_idx`` of its own may adopt the entry
    first: the attention's quantizer still makes it int8.)"""
    if cache.layer_class_to_replicate is not None:
        while len(cache.layers) <= index:
            cache.layers.append(cache.layer_class_to_replicate())
    if index >= len(cache.layers):
        return False
    layer = cache.layers[index]
    if type(layer) in (DynamicLayer, FloatCacheLayer) and not layer.is_initialized:
        replacement = _int8_layer_for(attention)
        if replacement is None and type(layer) is DynamicLayer and attention.__dict__.get(FLOAT_STORES, False):
            replacement = FloatCacheLayer()
        if replacement is not None:
            layer = cache.layers[index] = replacement
    return isinstance(layer, Int8CacheLayer)


def _store_int8(attention: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: on the int8 runtime, make this attention's entry of its cache an `Int8CacheLayer` (or a
    `FloatCacheLayer`: `_adopt`); record whether the entry stores int8 (the attention wrapper then leaves K and V
    alone)."""
    cache = _cache_among(args, kwargs)
    index = getattr(attention, "layer_idx", None)
    stored = cache is not None and index is not None and _adopt(cache, index, attention)
    state = attention.__dict__  # (plain attributes, without nn.Module.__setattr__: this runs at every decode step)
    state[STORED_FLAG] = stored
    state[CODE_READER] = weakref.ref(cache.layers[index]) if stored else None


def int8_kv_cache(model: nn.Module) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose entries are `Int8CacheLayer`s where the attention's quantizer stores
    int8 (the int8 runtime), and transformers' own layers elsewhere (sliding windows, float attentions: on the int8
    runtime the pre-hook makes these `FloatCacheLayer`s at the first forward)."""
    cache = DynamicCache(config=model.config)
    for attention in model.modules():
        index = getattr(attention, "layer_idx", None)
        if isinstance(getattr(attention, "kv_cache_quantizer", None), KVCacheQuantizer) and index is not None:
            _adopt(cache, index, attention)
    return cache


def cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument of ``model``'s forward: ``cache`` (transformers 5.24 on) or
    ``past_key_values`` (before)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output: object) -> Cache | None:
    """The KV cache a forward or ``generate`` returned (``output.cache``, or ``output.past_key_values`` before 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if isinstance(cache, Cache) else getattr(output, "past_key_values", None)


def set_kv_cache_runtime(model: nn.Module, runtime: str) -> int:
    """Store the KV cache of every attention whose `KVCacheQuantizer` allows it as int8 (``runtime="int8"``), or
    simulate it (``"fake"``); on the int8 runtime the other attentions' plain float layers become `FloatCacheLayer`s
    (``"fake"`` keeps transformers' own). Return how many quantizers switched. The hook is registered once, on
    first use, on every module with a ``layer_idx`` (the attentions: the index of their cache entry)."""
    switched = 0
    for attention in model.modules():
        quantizer = getattr(attention, "kv_cache_quantizer", None)
        stored = isinstance(quantizer, KVCacheQuantizer) and stores_codes(quantizer)
        if stored:
            quantizer.runtime = runtime
            switched += 1
        elif not isinstance(getattr(attention, "layer_idx", None), int):
            continue
        attention.__dict__[FLOAT_STORES] = runtime == "int8"
        if runtime == "int8" and getattr(attention, "_llmquant_kv_storage_hook", None) is None:
            attention._llmquant_kv_storage_hook = attention.register_forward_pre_hook(_store_int8, with_kwargs=True)
    return switched


__all__ = [
    "FloatCacheLayer",
    "Int8CacheLayer",
    "cache_argument",
    "dequantize_states",
    "int8_kv_cache",
    "quantize_states",
    "returned_cache",
    "set_kv_cache_runtime",
    "supports_code_storage",
]

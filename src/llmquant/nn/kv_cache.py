"""INT8 KV cache: the keys and values an attention stores and reads are quantized.

The quantizer sits where attention reads them: llmquant registers the attention implementation
``llmquant_sdpa`` in transformers' `AttentionInterface`. It receives the query, key and value states
after RoPE and after the cache update (exactly what the cache holds); if the attention module has a
``qk_rotation`` (QuaRot's online R3, an `OnlineRotation` over head_dim) it rotates queries and keys,
which leaves q k^T unchanged; then it fake-quantizes keys and values with the module's
`KVCacheQuantizer`, and runs transformers' sdpa attention. Modules with neither run unchanged.

That is the simulation (the ``fake`` runtime). On the ``int8`` runtime the cache itself stores int8 codes
(`llmquant.nn.kv_storage`): its layer rotates and quantizes the keys and values it stores, and the wrapper,
told so by the flag ``_llmquant_kv_stored`` the attention's pre-hook sets, rotates only the query. The pre-hook also
names the cache layer (``_llmquant_kv_reader``, a `CodeReader`): at a decode step the wrapper lets it attend over
its int8 codes, and gives the base attention the dequantized keys and values only where it declines.

Granularity: ``tensor`` is one scale per layer for K and one for V (static: calibrated; dynamic: from
the current tensor); ``attn_head`` one static scale per KV head (``k_scale`` / ``v_scale`` ``[heads]``, sized
by the first calibration or the checkpoint); ``token`` is one scale per (batch, kv head, position) over
head_dim, dynamic. A dynamic spec with a ``clip_grid`` (`QuantSpec.clip_grid`) clips each token's (each tensor's)
range by the ratio of the grid that quantizes it with the least squared error, chosen when the keys or values are
quantized (`llmquant.quant.primitives.searched_clip_ratios`), so a cache that stored codes would hold the same.
Scale names follow compressed-tensors: ``k_scale`` and ``v_scale`` on the attention module.

Centred keys (``center_keys``; SageAttention's key smoothing, Zhang et al. 2024, arXiv:2410.02367, with a static
mean): the keys lose their mean over the calibration positions, one value per (KV head, channel) (``k_mean``,
``[heads, head_dim]``), before they are quantized, and it is never added back. softmax(q (k_j - mu)^T) =
softmax(q k_j^T - q mu^T) = softmax(q k_j^T): the shift is the same for every key a query reads, so plain softmax
attention computes the same function; the keys' per-token ranges lose the offset their channels share, which 4-bit
keys pay for. Where an attention is not shift-invariant in its keys (attention sinks, soft-capping, a cache that
holds something else than the keys), the engine's check finds it and the layer keeps its keys as they are.

Kept first positions (``keep_first``; IntactKV, Liu et al. 2024, arXiv:2403.01241, which keeps the cache of its
"pivot" tokens lossless): the first ``keep_first`` entries of the cache (a sequence's first positions, where
attention sinks sit, which every later query reads) stay float; the others are quantized as the spec says, and a
static scale or a per-tensor range is taken over them only. N float positions a layer, whatever the length. The
first entries of a cache that drops its oldest positions (a sliding window past its length) are the oldest it
holds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llmquant.errors import LlmquantError
from llmquant.nn.e4m3_simulation import simulated
from llmquant.parallel import SINGLE, Ranks
from llmquant.quant import Observer, QuantSpec, straight_through

QUANTIZED_ATTENTION = "llmquant_sdpa"
STORED_FLAG = "_llmquant_kv_stored"  # on an attention, for the current call: its int8 cache layer quantized K, V
CODE_READER = "_llmquant_kv_reader"  # on an attention, for the current call: a weak reference to a `CodeReader`


class CodeReader(Protocol):
    """A cache layer that can attend over the codes it stores (`llmquant.nn.kv_storage.Int8CacheLayer`)."""

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, base: str, options: dict) -> torch.Tensor | None:
        """The attention output (``[b, q, heads, dv]``, as transformers' sdpa returns it) computed from the codes, or
        None where the reader declines (the base attention then runs on `readable`'s tensors)."""

    def readable(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The float keys and values the cache update stood for (``key`` and ``value`` themselves when real)."""


class KVCacheQuantizer(nn.Module):
    """Holds the spec and (static) scales of one attention module's key and value cache."""

    def __init__(self, spec: QuantSpec, center_keys: bool = False, keep_first: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.center_keys = center_keys  # calibrate ``k_mean`` and quantize keys minus it (module docstring)
        self.register_buffer("k_mean", None)  # [kv heads, head_dim], once calibrated or loaded
        # how many first positions stay float (module docstring): a buffer so that a checkpoint keeps it, and its
        # value as an int, read at every call without a device sync
        self.register_buffer("kept_positions", None)
        self.keep_first = keep_first
        self._key_sums: tuple[torch.Tensor, int] | None = None  # calibration: float64 sums [heads, d], positions
        self.key_positions = 0  # how many (sample, position) pairs ``k_mean`` averages, over every rank
        self.quantizing = True  # False: keys centred, nothing quantized (the engine's check of the centring)
        if not spec.dynamic:
            self.register_buffer("k_scale", torch.ones(1))
            self.register_buffer("v_scale", torch.ones(1))
        self.observers: tuple[Observer, Observer] | None = None
        self.observing = False  # calibration passes: keys and values pass through (and are observed if static)
        self.runtime = "fake"  # "int8": a DynamicCache stores int8 codes (`llmquant.nn.kv_storage`)
        # whether the attention passes its cache layer's keys and values to the attention function untouched, seen
        # at a decode step of the int8 runtime (None: not seen yet); then that layer may attend over its codes
        self.passes_cache_untouched: bool | None = None

    def start_observing(self) -> None:
        """Calibration: pass keys and values through unquantized (a dynamic cache too, so the float passes and
        the equivalence checks of function-preserving transforms see the float function); record static ranges."""
        self.observing = True
        self._key_sums = None
        if not self.spec.dynamic:
            self.observers = (Observer(self.spec), Observer(self.spec))

    @torch.no_grad()
    def stop_observing(self, ranks: Ranks = SINGLE) -> None:
        """Freeze the static scales from what was observed (on every rank of ``ranks``)."""
        self.observing = False
        if self.center_keys:
            self._set_key_mean(ranks)
        if self.observers is None:
            return
        for observer in self.observers:
            observer.reduce(ranks)
        self._set_scales(self.observers[0].qparams()[0].reshape(-1), self.observers[1].qparams()[0].reshape(-1))
        self.observers = None

    def _observe_keys(self, key: torch.Tensor) -> None:
        """Add the keys ``[b, heads, positions, d]`` to the calibration sums of their mean (float64)."""
        sums, count = self._key_sums or (torch.zeros(key.shape[1], key.shape[-1], dtype=torch.float64,
                                                      device=key.device), 0)
        self._key_sums = sums + key.double().sum(dim=(0, 2)), count + key.shape[0] * key.shape[2]

    def _set_key_mean(self, ranks: Ranks) -> None:
        """``k_mean`` from every rank's sums (all ranks must have seen keys)."""
        if self._key_sums is None:
            raise RuntimeError("the attention saw no calibration keys to centre")
        sums, count = self._key_sums
        sums = ranks.sum(sums.clone())
        count = ranks.total(float(count))
        self._key_sums, self.key_positions = None, int(count)
        self.k_mean = (sums / count).float()

    def drop_key_mean(self) -> None:
        """Keys as they are (no centring): what the engine's check does where centring changes the function."""
        self.k_mean = None

    def centered(self, key: torch.Tensor) -> torch.Tensor:
        """``key`` ``[b, heads, positions, d]`` minus ``k_mean`` (itself without one)."""
        if self.k_mean is None:
            return key
        if tuple(key.shape[-3::2]) != tuple(self.k_mean.shape):
            raise LlmquantError(f"keys [heads {key.shape[-3]}, channels {key.shape[-1]}] cannot lose a mean "
                                f"calibrated over [{self.k_mean.shape[0]}, {self.k_mean.shape[1]}]: this cache "
                                "holds other states than the attention reads (MLA); centred keys run there on the "
                                "simulation only (runtime 'fake'), or quantize without kv_cache_center_keys")
        return key - self.k_mean.to(key.dtype)[:, None, :]

    @property
    def keep_first(self) -> int:
        """How many first positions of the cache stay float (0: none)."""
        return self._keep_first

    @keep_first.setter
    def keep_first(self, count: int) -> None:
        self.kept_positions = torch.tensor([count]) if count else None
        self._keep_first = count

    def _set_scales(self, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        """The static scales, one per tensor or per head (the buffers take the size of what is given)."""
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            buffer = self._buffers[name]
            if buffer.shape != scale.shape:
                self._buffers[name] = torch.empty(scale.shape, dtype=buffer.dtype, device=buffer.device)
            self._buffers[name].copy_(scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A checkpoint's per-head scales resize the buffers before they load."""
        if not self.spec.dynamic and self.spec.granularity == "attn_head":
            k_scale, v_scale = state_dict.get(prefix + "k_scale"), state_dict.get(prefix + "v_scale")
            if k_scale is not None and v_scale is not None:
                self._set_scales(k_scale.reshape(-1), v_scale.reshape(-1))
        if (k_mean := state_dict.get(prefix + "k_mean")) is not None:  # a checkpoint with centred keys
            self.center_keys = True
            self.k_mean = torch.empty_like(k_mean)
        if (kept := state_dict.get(prefix + "kept_positions")) is not None:  # with float first positions
            self.keep_first = int(kept.reshape(-1)[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[b, kv heads, positions, d]`` as attention reads them: centred keys, quantized (the
        first ``keep_first`` positions float); unchanged while observing."""
        kept = self.keep_first
        if self.observing:
            if key.shape[-2] > kept:  # (the quantized positions only)
                self._observe(key[..., kept:, :], value[..., kept:, :])
            return key, value
        key = self.centered(key)
        if not self.quantizing or key.shape[-2] <= kept:
            return key, value
        if kept:
            quantized_key, quantized_value = self._quantized(key[..., kept:, :], value[..., kept:, :])
            return (torch.cat([key[..., :kept, :], quantized_key], dim=-2),
                    torch.cat([value[..., :kept, :], quantized_value], dim=-2))
        return self._quantized(key, value)

    def _observe(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Calibration: the keys' mean, and a static cache's ranges."""
        if self.center_keys:
            self._observe_keys(key)
        if self.observers is not None:  # (static scales: `Recipe` centres the keys of dynamic caches only)
            self.observers[0].update(key)
            self.observers[1].update(value)

    def _quantized(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``key`` (centred) and ``value`` fake-quantized by the spec (the gradient, where one is wanted, straight
        through: `straight_through`)."""
        if self.spec.dynamic:  # (FP8 on the CPU: the op's one pass, `simulated`)
            quantized = simulated(key, self.spec), simulated(value, self.spec)
        else:  # (scales [1 or heads, 1])
            quantized = (simulated(key, self.spec, self.k_scale.reshape(-1, 1)),
                         simulated(value, self.spec, self.v_scale.reshape(-1, 1)))
        return straight_through(key, quantized[0]), straight_through(value, quantized[1])


def _base_attention(module: nn.Module, base: str) -> Callable:
    """The attention function llmquant's wraps: transformers' registered ones (sdpa, ...), or the
    model's own ``eager_attention_forward`` (which may do more than plain attention, e.g. soft-capping)."""
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def quantizing_attention(base: str) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        # (every layer at every decode step: the module's plain attributes and submodules read and written in its
        # dictionaries, without nn.Module's attribute machinery, a microsecond a lookup)
        state, submodules = module.__dict__, module._modules
        state["_llmquant_attention_calls"] = state.get("_llmquant_attention_calls", 0) + 1
        stored = state.get(STORED_FLAG, False)  # an int8 cache layer already rotated and quantized K, V
        rotation = submodules.get("qk_rotation")
        if rotation is not None:
            query, key = rotation(query), key if stored else rotation(key)
        quantizer = submodules.get("kv_cache_quantizer")
        if quantizer is not None and not stored:
            key, value = quantizer(key, value)
        reference = state.get(CODE_READER) if stored else None
        reader: CodeReader | None = reference() if reference is not None else None
        if reader is not None:
            output = reader.attend(query, key, value, attention_mask, base, kwargs)
            if output is not None:
                return output, None
            key, value = reader.readable(key, value)
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    return attention


WRAPPED = {"sdpa": QUANTIZED_ATTENTION, "eager": "llmquant_eager"}


def _register() -> None:
    for base, name in WRAPPED.items():
        AttentionInterface.register(name, quantizing_attention(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


_register()


def set_kv_clip(model: nn.Module, ratio: float) -> int:
    """Give every KV-cache quantizer the clip ratio ``ratio`` (`QuantSpec.clip_ratio`); return how many changed. A
    dynamic cache applies it to each tensor's range; a static one's calibrated scales become those its observer
    gives with ``ratio`` (scaled by ``ratio`` over the ratio they hold now), so what a checkpoint stores as
    ``k_scale`` / ``v_scale`` is the clipped scale itself."""
    changed = 0
    for module in model.modules():
        if isinstance(module, KVCacheQuantizer):
            if not module.spec.dynamic:
                factor = ratio / module.spec.clip_ratio
                module.k_scale.mul_(factor)
                module.v_scale.mul_(factor)
            module.spec = module.spec.model_copy(update={"clip_ratio": ratio, "clip_grid": None})
            changed += 1
    return changed


def attention_configs(model: nn.Module) -> list:
    """The configs (the model's and its sub-models') that name an attention implementation."""
    return [m.config for m in model.modules()
            if getattr(m, "config", None) is not None and hasattr(m.config, "_attn_implementation")]


VARIANT_SEPARATOR = "+"  # "<implementation>+<variant>": a wrapper of an implementation (`llmquant.nn.attention_dtype`)


def enable_kv_quantization(model: PreTrainedModel) -> list[str]:
    """Route the model's attention through llmquant's wrapper of its implementation (eager stays eager,
    anything else runs sdpa underneath); a no-op if already done. A variant's suffix ("sdpa+bfloat16") stays on
    the new name ("llmquant_sdpa+bfloat16"), which its module registers with the plain one. Returns the names
    before, for `restore_attention`."""
    configs = attention_configs(model)
    before = [config._attn_implementation for config in configs]
    for config in configs:
        base, separator, variant = config._attn_implementation.partition(VARIANT_SEPARATOR)
        if base not in WRAPPED.values():
            config._attn_implementation = WRAPPED["eager" if base == "eager" else "sdpa"] + separator + variant
    return before


def restore_attention(model: PreTrainedModel, before: list[str]) -> None:
    """Give the model back the attention implementations `enable_kv_quantization` returned: for an attention that
    does not call the attention interface (Falcon compares the name with "sdpa" itself), another name changes
    what it computes."""
    for config, name in zip(attention_configs(model), before, strict=True):
        config._attn_implementation = name


def uses_llmquant_attention(attention: nn.Module, run: Callable[[], object]) -> bool:
    """Whether ``attention`` really calls the attention function (some architectures compute attention
    inline, where neither the KV-cache quantizer nor R3 could act): ``run()`` runs it once."""
    attention._llmquant_attention_calls = 0
    run()
    return attention._llmquant_attention_calls > 0

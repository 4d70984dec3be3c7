"""Schemes: what is quantized in a Linear (weight, input activation) and in the KV cache, by name.

Preset names are the seeds' names (seed 000: the eight W8A8 rows; seed 003: ``w_int8_per_tensor``;
seed 002 / issue 5: weight-only int4/int3), W4A8 and W4A4, and the FP8 (E4M3) ones in the same pattern.
``none`` quantizes nothing: pre-optimizations only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from llmquant.errors import LlmquantError
from llmquant.quant.spec import QuantSpec


class Scheme(BaseModel):
    """Specs of one Linear's weight and input, and of the KV cache of the attention around it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: QuantSpec | None = None
    input_activations: QuantSpec | None = None
    kv_cache: QuantSpec | None = None

    @property
    def is_float(self) -> bool:
        return self.weights is None and self.input_activations is None

    def linear_part(self) -> Scheme:
        """The scheme without its KV cache (what a Linear carries)."""
        return Scheme(weights=self.weights, input_activations=self.input_activations)


def _int8(granularity: str, dynamic: bool = False) -> QuantSpec:
    return QuantSpec(bits=8, symmetric=True, granularity=granularity, dynamic=dynamic)


def _fp8(granularity: str, dynamic: bool = False) -> QuantSpec:
    return QuantSpec(bits=8, type="float", granularity=granularity, dynamic=dynamic)


KV_CACHE = {
    "int8_per_tensor": _int8("tensor"),
    "int8_per_tensor_dynamic": _int8("tensor", dynamic=True),
    "int8_per_token": _int8("token", dynamic=True),
    "fp8_per_tensor": _fp8("tensor"),  # static k_scale / v_scale: what vLLM reads
    "fp8_per_head": _fp8("attn_head"),  # static k_scale / v_scale [kv heads]: vLLM's strategy "attn_head"
    # QuaRot's KV4: 4-bit asymmetric, one scale and zero point per token and head (a group of head_dim values)
    "int4_per_token_asym": QuantSpec(bits=4, symmetric=False, granularity="token", dynamic=True),
    # the same in groups of 16 channels of a head (KIVI's and Atom's finer KV groups): 4 scales and zero points a
    # token and head of 64; the head's width must be a multiple of 16
    "int4_per_token_group16_asym": QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16,
                                             dynamic=True),
}

FP8_SCHEMES = {  # E4M3 codes (`QuantSpec` type "float"): llm-compressor's FP8 and FP8_DYNAMIC, weight-only FP8
    "w_fp8_per_tensor_a_fp8_per_tensor_static": Scheme(weights=_fp8("tensor"), input_activations=_fp8("tensor")),
    "w_fp8_per_channel_a_fp8_per_token_dynamic": Scheme(weights=_fp8("channel"),
                                                        input_activations=_fp8("token", dynamic=True)),
    "w_fp8_per_channel": Scheme(weights=_fp8("channel")),
    # DeepSeek-V3's FP8 (llm-compressor's FP8_BLOCK): weights in 128 x 128 tiles, inputs per token in groups of 128
    "w_fp8_block128_a_fp8_group128_dynamic": Scheme(
        weights=QuantSpec(bits=8, type="float", granularity="block", block_shape=(128, 128)),
        input_activations=QuantSpec(bits=8, type="float", granularity="group", group_size=128, dynamic=True)),
}

_W8A8 = {
    "w_int8_per_tensor_a_int8_per_tensor_static": (_int8("tensor"), _int8("tensor")),
    "w_int8_per_channel_a_int8_per_tensor_static": (_int8("channel"), _int8("tensor")),
    "w_int8_per_channel_a_int8_per_tensor_dynamic": (_int8("channel"), _int8("tensor", dynamic=True)),
    "w_int8_per_channel_a_int8_per_token_dynamic": (_int8("channel"), _int8("token", dynamic=True)),
}

W8A8_SCHEMES: tuple[str, ...] = (
    "w_int8_per_tensor_a_int8_per_tensor_static",
    "w_int8_per_channel_a_int8_per_tensor_static",
    "w_int8_per_channel_a_int8_per_tensor_dynamic",
    "w_int8_per_channel_a_int8_per_token_dynamic",
    "w_int8_per_tensor_a_int8_per_tensor_kv_cache_int8_per_tensor_static",
    "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_static",
    "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_dynamic",
    "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic",
)

WEIGHT_ONLY_SCHEMES: tuple[str, ...] = (
    "w_int8_per_tensor",
    "w_int8_per_channel",
    "w_int8_per_group_sym",
    "w_uint4_per_group_asym",
    "w_int4_per_group_sym",
    "w_uint3_per_group_asym",
    "w_int3_per_group_sym",
)

LOW_BIT_SCHEMES: tuple[str, ...] = (  # 4-bit weights with quantized activations (issue 19: W4A8, W4A4)
    "w_int4_per_group_sym_a_int8_per_token_dynamic",
    "w_int4_per_channel_sym_a_int4_per_token_dynamic",
    "w_int4_per_channel_sym_a_uint4_per_token_asym_dynamic",
    "w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic",
    "w_int4_per_group_sym_a_uint4_per_group_asym_dynamic",
    "w_int4_per_group_sym_a_uint4_per_token_asym_dynamic",
)

DEFAULT_GROUP_SIZE = 64


def _w8a8(name: str) -> Scheme:
    for base, (weights, inputs) in _W8A8.items():
        prefix, mode = base.rsplit("_", 1)
        if name == base:
            return Scheme(weights=weights, input_activations=inputs)
        for kv_name in ("int8_per_tensor", "int8_per_token"):
            if name == f"{prefix}_kv_cache_{kv_name}_{mode}":
                dynamic_tensor = (kv_name, mode) == ("int8_per_tensor", "dynamic")
                kv = KV_CACHE["int8_per_tensor_dynamic" if dynamic_tensor else kv_name]
                return Scheme(weights=weights, input_activations=inputs, kv_cache=kv)
    raise KeyError(name)


def _weight_only(name: str, group_size: int | None) -> Scheme:
    if name == "w_int8_per_tensor":
        return Scheme(weights=_int8("tensor"))
    if name == "w_int8_per_channel":
        return Scheme(weights=_int8("channel"))
    bits = 8 if "int8" in name else 4 if "int4" in name else 3
    symmetric = name.endswith("_sym")
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    if group_size == -1:
        return Scheme(weights=QuantSpec(bits=bits, symmetric=symmetric, granularity="channel"))
    return Scheme(weights=QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size))


def _low_bit(name: str, group_size: int | None) -> Scheme:
    """W4A8 (int4 weights in symmetric groups, int8 inputs per token) and W4A4 (int4 weights per channel, int4
    inputs per token), symmetric, or with asymmetric inputs (unsigned 4-bit codes and a zero point per token: 16
    levels over [min, max] instead of 15 over [-absmax, absmax]); what integer kernels multiply
    (`llmquant.nn.int8_linear`: asymmetric codes shifted by their zero point). W4A4 with inputs per token in
    groups (``group_size`` consecutive inputs of a token share a scale and zero point, as Atom's activations,
    arXiv:2310.19102, and the MX formats' blocks; -1: per token) takes one integer product per group, scaled by its
    row's group scale (`llmquant.nn.int8_linear.input_grouped_linear`). The weight in groups of ``group_size``
    columns goes with asymmetric inputs per token too (one integer product per weight group,
    `llmquant.nn.int8_linear.grouped_linear`) or in the inputs' groups (Atom's layout)."""
    if name == "w_int4_per_group_sym_a_int8_per_token_dynamic":
        weights = _weight_only("w_int4_per_group_sym", group_size).weights
        return Scheme(weights=weights, input_activations=_int8("token", dynamic=True))
    weights = QuantSpec(bits=4, symmetric=True, granularity="channel")
    if name == "w_int4_per_group_sym_a_uint4_per_token_asym_dynamic":  # the weight in groups, the inputs per token
        weights = _weight_only("w_int4_per_group_sym", group_size).weights
    if name.endswith("_a_uint4_per_group_asym_dynamic"):
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        grain = {"granularity": "token"} if group_size == -1 else {"granularity": "group", "group_size": group_size}
        if name.startswith("w_int4_per_group_sym"):  # both operands in the same groups of columns (Atom, MX)
            weights = _weight_only("w_int4_per_group_sym", group_size).weights
        return Scheme(weights=weights, input_activations=QuantSpec(bits=4, symmetric=False, dynamic=True, **grain))
    symmetric = name == "w_int4_per_channel_sym_a_int4_per_token_dynamic"
    return Scheme(weights=weights,
                  input_activations=QuantSpec(bits=4, symmetric=symmetric, granularity="token", dynamic=True))


def scheme_names() -> tuple[str, ...]:
    return ("none", *W8A8_SCHEMES, *WEIGHT_ONLY_SCHEMES, *LOW_BIT_SCHEMES, *FP8_SCHEMES)


def scheme_from_name(name: str, group_size: int | None = None, kv_cache: str | None = None) -> Scheme:
    """The preset ``name``; ``group_size`` (-1: per channel) for the grouped weight-only schemes and
    ``kv_cache`` (a key of `KV_CACHE`) replace the preset's."""
    if name == "none":
        scheme = Scheme()
    elif name in W8A8_SCHEMES:
        scheme = _w8a8(name)
    elif name in WEIGHT_ONLY_SCHEMES:
        scheme = _weight_only(name, group_size)
    elif name in LOW_BIT_SCHEMES:
        scheme = _low_bit(name, group_size)
    elif name in FP8_SCHEMES:
        scheme = FP8_SCHEMES[name]
    else:
        raise LlmquantError(f"unknown scheme '{name}'; allowed: {', '.join(scheme_names())}")
    if kv_cache is not None:
        if kv_cache not in KV_CACHE:
            raise LlmquantError(f"unknown kv cache '{kv_cache}'; allowed: {', '.join(KV_CACHE)}")
        scheme = Scheme(weights=scheme.weights, input_activations=scheme.input_activations, kv_cache=KV_CACHE[kv_cache])
    return scheme

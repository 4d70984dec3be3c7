"""`QuantLinear`: a Linear whose weight is stored as integer codes and whose input is quantized.

Two runtimes compute the same function:

- ``fake`` (accuracy studies): y = fq_a(x) @ dequant(W_q)^T + b, where fq_a fake-quantizes the activation
  with a static scale (calibrated by an `Observer`) or a dynamic one (computed from x at run time);
- ``int8`` (speed, W8A8 with symmetric int8 weights per tensor or channel and int8 inputs per tensor or
  token): y = s_x * s_w * (x_q @ W_q^T) + b with the int8 x int8 -> int32 product of `torch._int_mm` and
  the scales applied once per output. The same runtime runs W4 (W3, W2) weight-only layers on the CPU's int4 kernel
  (`llmquant.nn.int4_linear`), FP8 W8A8 ones on ``torch._scaled_mm`` on CUDA (`llmquant.nn.fp8_linear`), and the
  rows of weight-only int8 ones (W8A16, e.g. a quantized head; up to 8 rows: decode steps, a batch's last prompt
  rows) on the decode op of `llmquant.nn.int8_gemv` (1 byte a weight read; float32 sums within roundings of the
  simulation's, not its bits; more rows: the simulation).

For the layers the int8 runtime can run, the simulation evaluates the same algebra in the same order,
y = s_x * s_w * (x_q @ W_q^T) + b, with the integer codes held as float32: the product of codes is exact in
float32 while every partial sum stays below 2^24 (a row of 1536 codes would need an average |x_q * w_q|
above 10,900 to break it; real rows are far below), so both runtimes give the same bits. Computing
fq_a(x) @ dequant(W_q)^T instead (equal in exact arithmetic) rounds differently by ~1e-7, enough to flip
codes that sit on a rounding boundary in later layers: 0.2-0.5% of perplexity on the default model.

Parameter names and storage shapes follow compressed-tensors, so a state dict is (nearly) a checkpoint:
``weight`` (8-bit codes: int8, uint8 when asymmetric), ``weight_scale`` ([1] per tensor, [out, 1] per
channel, [out, in / g] per group, [ceil(out / r), ceil(in / c)] per r x c block), ``weight_zero_point``
(asymmetric only), ``input_scale`` / ``input_zero_point`` (static only).

Weights of fewer than 8 bits are kept packed ("pack-quantized", `llmquant.quant.packing`): ``weight_packed``
(int32 ``[out, ceil(in * b / 32)]``, codes stored signed, q - `storage_offset`) and ``weight_shape``
(int64 ``[2]``) replace ``weight``, and the zero point is int8 (it is packed only on disk). The forward
dequantizes them in float32 on every call, so the layer holds b/8 of the bytes of an int8 one (plus the
scales) and no float copy of its weight; set ``cache_dequantized`` to keep that copy after the first call
(faster, as large as a float Linear). `QuantLinear.codes` answers the integer codes of any layer.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.nn.e4m3_simulation import fused_code_error, quantized_codes, simulated
from llmquant.nn.fp8_linear import FP8_BLOCK, fp8_block_linear, fp8_linear, fp8_refusal
from llmquant.nn.int4_linear import (
    FIELD_OFFSET,
    MIN_BITS,
    Int4DecodeRows,
    Int4Weight,
    Int16Rows,
    int4_decode_rows,
    int4_linear,
    int4_refusal,
    nibbles_of,
    prepare_int4,
)
from llmquant.nn.int8_gemv import (
    WEIGHT_ONLY_GROUP_MULTIPLE,
    WEIGHT_ONLY_MAX_ROWS,
    avx2_kernel,
    avx2_weight_only,
    avx2_weight_only_pack,
    cpu_kernel,
    gemv_refusal,
    weight_only_linear,
    weight_only_refusal,
)
from llmquant.nn.int8_linear import (
    Avx2Weight,
    DecodeRows,
    GroupedWeight,
    Int8Weight,
    asymmetric_input_codes,
    avx2_weight_refusal,
    decode_rows,
    float_product,
    grouped_gemm_refusal,
    grouped_inputs_forward,
    grouped_int8_linear,
    grouped_linear,
    input_codes,
    int8_linear,
    int_mm_refusal,
    onednn_refusal,
    scale_output,
    shared_input_codes,
)
from llmquant.nn.kv_storage import set_kv_cache_runtime
from llmquant.nn.last_result import LastResult
from llmquant.nn.online_rotation import attach_input_rotation, input_rotation_of
from llmquant.parallel import SINGLE, Ranks
from llmquant.quant import Observer, QuantSpec, dequantize, straight_through
from llmquant.quant.metrics import relative_error
from llmquant.quant.observers import observe_once
from llmquant.quant.packing import pack_int32, packed_length, unpack_fields, unpack_int32
from llmquant.quant.primitives import (
    block_grid_shape,
    codes_to_float,
    grid_steps,
    qparams_from_min_max,
    round_to_codes,
)

log = logging.getLogger(__name__)

_last_input = LastResult()  # the simulated input of the last QuantLinear that quantized one on this thread


def shared_fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                         zero: torch.Tensor | None = None) -> torch.Tensor:
    """`fake_quantize` of a Linear's input (``scale`` and ``zero``: a static quantizer's, by identity; a symmetric
    one's zero may be None), kept for the next Linear that quantizes the same tensor, unchanged, the same way: q/k/v
    and gate/up read one tensor, so the simulation quantizes it once, as the integer runtime shares its codes
    (`shared_input_codes`). The same values; callers only read them. A tensor made under ``torch.inference_mode``
    has no version counter, so its result is not kept."""
    key = (spec, scale, zero)
    tracked = not x.is_inference()
    kept = _last_input.get(x, lambda k, _: k[1] is scale and k[2] is zero and k[0] == spec) if tracked else None
    if kept is not None:
        return kept
    quantized = simulated(x, spec, None if scale is None else scale.reshape(1, 1),
                          None if zero is None else zero.reshape(1, 1))  # (FP8 on the CPU: the op's one pass)
    if tracked:
        _last_input.put(x, key, quantized)
    else:
        _last_input.clear()
    return quantized


def storage_offset(spec: QuantSpec) -> int:
    """What is subtracted from codes and zero points to store them signed, as compressed-tensors expects:
    2^(b-1) for asymmetric codes q in [0, 2^b - 1], 0 for symmetric ones (already signed)."""
    return 0 if spec.symmetric else 2 ** (spec.bits - 1)


def is_packed(spec: QuantSpec | None) -> bool:
    """Whether a weight with this spec is stored packed into int32 words (fewer than 8 bits)."""
    return spec is not None and spec.bits < 8


def storage_shape(spec: QuantSpec, weight_shape: torch.Size) -> tuple[int, ...]:
    """Shape of a weight's scale/zero point as compressed-tensors stores it."""
    out_features, in_features = weight_shape
    if spec.granularity == "tensor":
        return (1,)
    if spec.granularity == "channel":
        return (out_features, 1)
    if spec.granularity == "block":
        return block_grid_shape(weight_shape, spec)
    assert spec.group_size is not None
    return (out_features, in_features // spec.group_size)


class QuantLinear(nn.Module):
    """Fake-quant linear layer with integer weight storage (the accuracy runtime)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_spec: QuantSpec | None,
        input_spec: QuantSpec | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """``dtype``: the model's, for the float tensors (the bias, an unquantized weight); scales stay float32."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.input_spec = weight_spec, input_spec
        shape = torch.Size((out_features, in_features))
        self.packed = is_packed(weight_spec)
        self.cache_dequantized = False  # packed layers only: keep the float weight after the first forward
        on = {"device": device}
        if weight_spec is None:
            self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, **on), requires_grad=False)
        else:
            if self.packed:
                words = (out_features, packed_length(in_features, weight_spec.bits))
                self.register_buffer("weight_packed", torch.zeros(words, dtype=torch.int32, **on))
                self.register_buffer("weight_shape", torch.tensor(shape, dtype=torch.int64, **on))
            else:  # 8-bit codes: int8, uint8 for asymmetric codes in [0, 255], or float8 (E4M3)
                self.register_buffer("weight", torch.zeros(shape, dtype=weight_spec.code_dtype, **on))
            qparam_shape = storage_shape(weight_spec, shape)
            self.register_buffer("weight_scale", torch.ones(qparam_shape, **on))
            if not weight_spec.symmetric:
                zero_dtype = torch.int8 if self.packed else torch.float32
                self.register_buffer("weight_zero_point", torch.zeros(qparam_shape, dtype=zero_dtype, **on))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **on), requires_grad=False) if bias else None
        if input_spec is not None and not input_spec.dynamic:
            self.register_buffer("input_scale", torch.ones(1, **on))
            if not input_spec.symmetric:
                self.register_buffer("input_zero_point", torch.zeros(1, **on))
        self.observer: Observer | None = None
        self.int8_fallback: str | None = None  # why the int8 kernel does not run this layer here (`set_runtime`)
        self._dequantized: torch.Tensor | None = None
        self.code_offsets: torch.Tensor | None = None  # offsets trained on the codes (`_dequantize`), while training
        self._float_codes: torch.Tensor | None = None  # simulation of an int8-capable layer: W_q as float32
        self._int8_call: tuple | None = None  # `_int8_args`
        self._integer_codes: torch.Tensor | None = None  # packed codes unpacked once (int8): integer path, training
        self._int8_weight_cache: Int8Weight | None = None  # the int8 runtime: the codes (and oneDNN's copy)
        # the int8 runtime's decode rows, W8A8 or W4 (False: none; None: ask)
        self._decode_rows: DecodeRows | Int4DecodeRows | Int16Rows | bool | None = None
        self._int4_weight: Int4Weight | None = None  # W4 weight-only on the int8 runtime (`prepare_int4`)
        self._weight_only_pack: tuple[torch.Tensor, torch.Tensor] | None = None  # W8A16 on the AVX2 op: its panels
        # inputs in groups: (the runtime, the group size, whether the product is an integer one, what it multiplies:
        # the weight's codes cut into those column groups, each contiguous, or the AVX2 op's panels)
        self._input_group_weights: tuple[str, int, bool, list[torch.Tensor] | Avx2Weight] | None = None
        self._supports_int8: bool | None = None
        self._supports_fp8: bool | None = None
        # the FP8 block scheme that torch._scaled_mm's blockwise scaling runs: weights in FP8_BLOCK x FP8_BLOCK tiles,
        # inputs dynamic per token in groups of FP8_BLOCK (`fp8_block_linear`); set with _supports_fp8
        self._fp8_blocks = False
        self.runtime = "fake"

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weight_spec: QuantSpec | None, input_spec: QuantSpec | None
    ) -> QuantLinear:
        """Quantize ``linear``'s weight by round-to-nearest with the spec's observer (on its device; the float
        tensors keep its dtype)."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_spec, input_spec,
                     device=weight.device, dtype=weight.dtype)
        rotation = input_rotation_of(linear)
        if rotation is not None:  # an online rotation (QuaRot's R4) stays in front of the quantized input
            attach_input_rotation(module, rotation)
        module.set_weight(weight)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Store ``weight`` quantized with ``qparams`` (block view), or with the observer's when None."""
        weight = weight.to(self.weight_scale.device if self.weight_spec is not None else self.weight.device).float()
        if self.weight_spec is None:
            self.weight.data.copy_(weight)
        else:
            spec = self.weight_spec
            scale, zero = qparams if qparams is not None else observe_once(weight, spec)
            self.set_codes(quantized_codes(weight, spec, scale, zero))
            self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
            if not spec.symmetric:
                self.weight_zero_point.copy_(torch.round(zero).reshape(self.weight_zero_point.shape))
        self.drop_caches()

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor) -> None:
        """Store the weight's integer codes ``[out, in]`` (llmquant's convention, as `codes` gives them), packed where
        the layer packs them; scales and zero points stay."""
        spec = self.weight_spec
        assert spec is not None
        if self.packed:
            self.weight_packed.copy_(pack_int32(codes.to(torch.int32) - storage_offset(spec), spec.bits))
        else:
            self.weight.copy_(codes)
        self.drop_caches()

    def set_scale(self, scale: torch.Tensor, keep_codes: bool = False) -> None:
        """Give the weight the scales ``scale`` (the stored shape: plain values, or a function of trained ones, as
        `llmquant.algorithms.scale_training` sets them at every step). What the runtimes built from the old scales is
        dropped; with ``keep_codes`` the unpacked codes (`_weight_codes`), which do not depend on them, stay."""
        codes = self._integer_codes
        self.weight_scale = scale
        self.drop_caches()
        self._integer_codes = codes if keep_codes else None

    def broadcast_weight(self, ranks: Ranks, owner: int) -> None:
        """``owner``'s quantized weight (codes, scales, zero points) on every rank of ``ranks``."""
        if ranks.world == 1:
            return
        for name in ("weight", "weight_packed", "weight_scale", "weight_zero_point"):
            tensor = self._buffers.get(name)
            if tensor is not None:
                ranks.broadcast(tensor, owner)
        self.drop_caches()

    def set_input_spec(self, spec: QuantSpec | None) -> None:
        """Quantize the inputs as ``spec`` says from the next call on (None: float inputs); what the runtimes built
        from the input spec is built again, the weight's caches stay."""
        self.input_spec = spec
        self._supports_int8 = self._int8_call = self._decode_rows = None

    def drop_caches(self) -> None:
        """Forget what a runtime built from the weight (`runtime_caches`): the next forward builds it again."""
        self._dequantized = self._float_codes = self._int8_call = self._integer_codes = self._int4_weight = None
        self._int8_weight_cache = self._decode_rows = self._weight_only_pack = self._input_group_weights = None

    def runtime_caches(self) -> list[torch.Tensor]:
        """The tensors a runtime keeps besides the state dict after a forward: a dequantized weight, the codes as
        float32 (simulation; the int8 runtime's too on a CPU without VNNI or AMX where the AVX2 op does not run),
        unpacked to int8 or in oneDNN's or the AVX2 op's layout, the decode op's row sums, the int4 kernel's copy of
        the codes and its bfloat16 scales."""
        caches = [self._dequantized, self._float_codes, self._integer_codes if self.packed else None]
        int8_weight = self._int8_weight_cache
        if isinstance(int8_weight, GroupedWeight | Avx2Weight):
            caches += int8_weight.tensors()
        elif int8_weight is not None:
            caches += [int8_weight.packed[0] if int8_weight.packed is not None else None, int8_weight.row_sums,
                       int8_weight.float_codes if int8_weight.float_codes is not self._float_codes else None]
        if self._int4_weight is not None:
            w = self._int4_weight
            caches += [w.kernel_codes, w.kernel_scales, w.scale, w.zero, w.float_zero]
            scale_memory = self.weight_scale.untyped_storage().data_ptr()
            caches += ([w.float_scale] if w.float_scale is not None
                       and w.float_scale.untyped_storage().data_ptr() != scale_memory else [])  # (often a view)
            packed_memory = self.weight_packed.untyped_storage().data_ptr()
            caches += [w.nibbles] if w.nibbles.untyped_storage().data_ptr() != packed_memory else []  # (4-bit: a view)
            caches += w.int16_weight.tensors() if w.int16_weight is not None else []
        caches += self._weight_only_pack or ()
        groups = self._input_group_weights[3] if self._input_group_weights is not None else None
        if isinstance(groups, list):
            caches += groups  # (an Avx2Weight is the int8 weight's cache, counted above)
        elif isinstance(groups, GroupedWeight):  # (the decode op's packed copy for inputs in groups: its own)
            caches += groups.tensors()
        return [tensor for tensor in caches if tensor is not None]

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the weight in the block view (``[n_blocks, 1]``, float)."""
        assert self.weight_spec is not None
        scale = self.weight_scale.reshape(-1, 1)
        if self.weight_spec.symmetric:
            return scale, torch.zeros_like(scale)
        return scale, self.weight_zero_point.reshape(-1, 1).float()

    def codes(self) -> torch.Tensor:
        """The weight's integer codes ``[out, in]`` in llmquant's convention (unpacked: a copy)."""
        spec = self.weight_spec
        assert spec is not None
        if not self.packed:
            return self._buffers["weight"]
        signed = unpack_int32(self.weight_packed, spec.bits, self.in_features)
        return (signed.to(torch.int32) + storage_offset(spec)).to(torch.int8)

    def dequantized_weight(self, keep: bool = True) -> torch.Tensor:
        """The float weight the layer computes with: x_hat = (q - zero) * scale. Cached, except for a packed
        layer without ``cache_dequantized``, which unpacks it on every call, and with ``keep=False`` (a figure
        about the weight, such as its error: the float copy would hold as much memory as the float weight)."""
        if self.weight_spec is None:
            return self.weight
        if self._dequantized is not None:
            return self._dequantized
        weight = self._dequantize()
        if keep and (not self.packed or self.cache_dequantized):
            self._dequantized = weight
        return weight

    def weight_error(self, reference: torch.Tensor) -> float:
        """||W_hat - W|| / ||W||: the relative error of the weight the layer computes with against the float weight
        ``reference`` (the manifest's weight error): for plain float8 codes (unpacked, no trained code offsets) in one
        pass of the E4M3 op where it runs (`fused_code_error`), else from the dequantized weight."""
        w = reference.detach().float()
        if self.weight_spec is not None and not self.packed and self.code_offsets is None:
            fused = fused_code_error(self.weight, self.weight_spec, self.weight_qparams()[0], w)
            if fused is not None:
                return fused
        return relative_error([w], [self.dequantized_weight(keep=False)])

    def _dequantize(self) -> torch.Tensor:
        """(q - zero) * scale from the stored codes, in float32 (a function of ``weight_scale``, with its gradient
        where it has one; with ``code_offsets`` d set, of round(q + d g) clamped to the codes' range, rounded straight
        through, g the grid's step at q: 1 for integer codes, `grid_steps`; `llmquant.algorithms.scale_training`)."""
        spec = self.weight_spec
        assert spec is not None
        if self.code_offsets is not None:
            start = codes_to_float(self._weight_codes())
            shifted = start + self.code_offsets * grid_steps(start, spec)
            codes = straight_through(shifted, round_to_codes(shifted, spec))
            return dequantize(codes, *self.weight_qparams(), spec)
        if self.packed:  # the packed fields are u = q - offset + 2^(b-1): that constant folds into the zero
            scale, zero = self.weight_qparams()
            fields = unpack_fields(self.weight_packed, spec.bits, self.in_features)
            return dequantize(fields, scale, zero + (2 ** (spec.bits - 1) - storage_offset(spec)), spec)
        return dequantize(self.weight, *self.weight_qparams(), spec)

    def _apply(self, fn, recurse: bool = True):
        """A move (``.to``, ``.float()``, to ``meta`` when a streamed layer is released) drops the cached
        dequantized weight, a plain attribute that ``Module.to`` would leave behind."""
        self.drop_caches()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.drop_caches()

    # --- integer runtime ----------------------------------------------------------------------
    @property
    def supports_int8(self) -> bool:
        """Whether this layer can run as int8 x int8 GEMMs: symmetric integer codes of at most 8 bits for the weight
        (per tensor, channel or group: W8A8, W4A8, W4A4) and the input (per tensor or token, or dynamic per token in
        groups dividing the inputs, with a weight per tensor or channel or in the same groups:
        `grouped_inputs_forward`), or asymmetric dynamic inputs of at most 7 bits (their codes shifted by the zero
        point fit int8: `asymmetric_input_codes`) with any of those weights; decided once, from the specs the layer
        was made with."""
        if self._supports_int8 is None:
            w, a = self.weight_spec, self.input_spec
            self._supports_int8 = (
                w is not None and a is not None and w.bits <= 8 and a.bits <= 8 and w.symmetric
                and w.type == a.type == "int"
                and w.granularity in ("tensor", "channel", "group")
                and (a.granularity in ("tensor", "token") or (self._input_groups and self._input_groups_fit))
                and (a.symmetric or (a.dynamic and a.bits <= 7))
            )
        return self._supports_int8

    @property
    def _input_groups_fit(self) -> bool:
        """Whether a weight goes with inputs in groups: per tensor or channel, or in the same groups of columns."""
        w = self.weight_spec
        return w is not None and (w.granularity != "group" or w.group_size == self._input_groups)

    @property
    def _input_groups(self) -> int:
        """The size of the groups of a dynamic input quantized per token in groups that divide the inputs, else 0."""
        a = self.input_spec
        if a is None or a.granularity != "group" or not a.dynamic or a.group_size is None:
            return 0
        return a.group_size if self.in_features % a.group_size == 0 else 0

    def _weight_codes(self) -> torch.Tensor:
        """The weight's int8 codes ``[out, in]``: the stored ones, or (packed below 8 bits) unpacked once and kept
        while the layer runs on the integer path or trains its scales (1 byte a weight, against b/8 packed)."""
        if not self.packed:
            return self.weight
        if self._integer_codes is None:
            self._integer_codes = self.codes().to(torch.int8)
        return self._integer_codes

    def _int8_weight(self) -> Int8Weight | GroupedWeight | Avx2Weight:
        """What the int8 runtime multiplies (`llmquant.nn.int8_linear.Int8Weight`): the int8 codes, and oneDNN's
        copy of them or the decode op's row sums where they run, made on the first call that uses them; for a
        weight in groups where the op's `grouped_gemm` runs, only its packed copy (`GroupedWeight`); where the AVX2
        op runs, only its panels (`Avx2Weight`)."""
        if self._int8_weight_cache is None:
            device, spec = self.weight_scale.device, self.weight_spec
            group = spec.group_size if spec is not None and spec.granularity == "group" and spec.group_size else 0
            packed_copy = None  # an op's layout that replaces the codes: GroupedWeight or Avx2Weight.from_codes
            if group and grouped_gemm_refusal(device, self.in_features, group) is None:
                packed_copy = GroupedWeight.from_codes
            elif avx2_weight_refusal(device, self.in_features, group) is None:
                packed_copy = Avx2Weight.from_codes
            if packed_copy is not None:
                codes = self.codes().to(torch.int8) if self.packed else self.weight  # (not kept: `_weight_codes`)
                self._int8_weight_cache = packed_copy(codes, self.weight_scale, group)
            else:
                self._int8_weight_cache = Int8Weight(self._weight_codes(), onednn_refusal(device) is None,
                                                     gemv=gemv_refusal(device) is None,
                                                     float_codes=self._float_codes)  # (the simulation's, if made)
        return self._int8_weight_cache

    @property
    def supports_fp8(self) -> bool:
        """Whether this layer is an FP8 W8A8 one that ``torch._scaled_mm`` can run (`llmquant.nn.fp8_linear`): E4M3
        weights per tensor or channel, E4M3 inputs per tensor (static or dynamic) or per token (dynamic); decided
        once, from the specs the layer was made with (the forward asks at every call)."""
        if self._supports_fp8 is None:
            w, a = self.weight_spec, self.input_spec
            fp8 = w is not None and a is not None and w.type == a.type == "float"
            self._fp8_blocks = (fp8 and w.granularity == "block" and w.block_shape == (FP8_BLOCK, FP8_BLOCK)
                                and a.granularity == "group" and a.group_size == FP8_BLOCK and a.dynamic)
            self._supports_fp8 = self._fp8_blocks or (fp8 and w.granularity in ("tensor", "channel")
                                                      and a.granularity in ("tensor", "token"))
        return self._supports_fp8

    @property
    def supports_weight_only_int8(self) -> bool:
        """Whether this layer is a weight-only int8 one (W8A16: symmetric 8-bit integer weights per tensor, per
        channel or in groups of a multiple of 16 columns, a float input), whose decode rows the int8 runtime runs on
        the decode op, or on the AVX2 op, where one runs."""
        w = self.weight_spec
        groups_fit = w is not None and (w.granularity in ("tensor", "channel") or (
            w.granularity == "group" and w.group_size is not None and w.group_size % WEIGHT_ONLY_GROUP_MULTIPLE == 0
            and self.in_features % w.group_size == 0))
        return (self.input_spec is None and w is not None and w.type == "int" and w.bits == 8 and w.symmetric
                and groups_fit and not self.packed)

    def _weight_only_int8_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """(x @ W_q^T) * s_w + b by the decode op (`weight_only_linear`) for a few float32 rows, or on a CPU with
        AVX2 but no VNNI or AMX by the AVX2 op (`avx2_weight_only`, the codes packed once), else None."""
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > WEIGHT_ONLY_MAX_ROWS or rows.dtype != torch.float32:
            return None
        spec = self.weight_spec
        group_size = (spec.group_size or 0) if spec is not None and spec.granularity == "group" else 0
        if (op := cpu_kernel(rows)) is not None:
            y = weight_only_linear(op, rows, self.weight, self.weight_scale, self.bias, group_size)
        elif (op := avx2_kernel(rows)) is not None:
            if self._weight_only_pack is None:
                self._weight_only_pack = avx2_weight_only_pack(self.weight, self.weight_scale, group_size)
            y = avx2_weight_only(op, rows, self._weight_only_pack, self.bias, self.out_features, group_size)
        else:
            return None
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def supports_int4(self) -> bool:
        """Whether this layer is a 2- to 4-bit weight-only (W4A16, W3A16, W2A16) one, which the integer runtime runs
        with the CPU's int4 kernel (`llmquant.nn.int4_linear`) where `int8_refusal` allows."""
        w = self.weight_spec
        return self.input_spec is None and w is not None and w.type == "int" and MIN_BITS <= w.bits <= 4

    def int8_refusal(self) -> str | None:
        """Why the kernel cannot run this (int8-, int4- or FP8-capable) layer where it is, or None: CUDA's
        ``_int_mm`` takes only multiples of 8 for both inner and output sizes (its minimum of 17 rows is met by
        padding); the int4 kernel runs on the CPU, in groups of a multiple of 32 columns (`int4_refusal`); FP8 GEMMs
        on CUDA 8.9+ (`fp8_refusal`); weight-only int8 where the decode op or the AVX2 op runs
        (`weight_only_refusal`)."""
        if self.supports_weight_only_int8:
            return weight_only_refusal(self.weight_scale.device)
        if self.supports_fp8:
            return fp8_refusal(self.weight_scale.device, self.in_features, self.out_features, self._fp8_blocks)
        if self.supports_int4:
            spec = self.weight_spec
            assert spec is not None
            group = spec.group_size if spec.granularity == "group" and spec.group_size else self.in_features
            return int4_refusal(spec.bits, group, self.in_features, self.out_features, self.weight_scale.device)
        if self.weight_scale.device.type == "cuda" and (self.in_features % 8 or self.out_features % 8):
            return (f"torch._int_mm on CUDA needs in and out features that are multiples of 8, not "
                    f"{self.in_features} x {self.out_features}")
        if self.weight_scale.device.type == "cuda" and self._input_groups % 8:
            return f"torch._int_mm on CUDA needs input groups of a multiple of 8 columns, not {self._input_groups}"
        return None

    def _int8_args(self) -> tuple:
        """The arguments of `llmquant.nn.int8_linear` after the weight and bias, built once (a decode step pays
        for every operation): the weight scale as a row (a weight in groups: ``[groups, out]``, the rows
        `input_grouped_linear` takes), the dynamic granularity ("token", "tensor" or None), the static scale, the code
        range, the clip (a ratio, or a grid searched at run time: `QuantSpec.clip`)."""
        if self._int8_call is None:
            spec = self.input_spec
            assert spec is not None
            static = None if spec.dynamic else self.input_scale.reshape(1, 1)
            grouped = self.weight_spec is not None and self.weight_spec.granularity == "group"
            weight_scale = (self.weight_scale.reshape(self.out_features, -1).t() if grouped
                            else self.weight_scale.reshape(1, -1))
            self._int8_call = (weight_scale, spec.granularity if spec.dynamic else None, static,
                               int(spec.qmin), int(spec.qmax), spec.clip)
        return self._int8_call

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = s_x * s_w * (x_q @ W_q^T) + b (`llmquant.nn.int8_linear`): int8 x int8 -> int32 on the int8 runtime,
        float32 codes (exact, see the module docstring) in the simulation; the same input codes in both."""
        rows = x.reshape(-1, self.in_features)
        rows = rows if rows.dtype == torch.float32 else rows.float()
        weight_scale, *input_args = self._int8_args()
        if self._input_groups:
            y = self._input_grouped_forward(x, rows, weight_scale, input_args)
        elif self.weight_spec is not None and self.weight_spec.granularity == "group":
            y = self._grouped_forward(rows, input_args)
        elif self.runtime == "int8":
            y = int8_linear(x, rows, self._int8_weight(), weight_scale, self.bias, *input_args,
                            asymmetric=not self.input_spec.symmetric)
        else:
            if self._float_codes is None:
                self._float_codes = codes_to_float(self._weight_codes())
            quantize = None if self.input_spec.symmetric else asymmetric_input_codes
            codes, scale = shared_input_codes(x, rows, *input_args, as_int8=False, quantize=quantize)
            y = scale_output(float_product(codes, self._float_codes), scale, weight_scale, self.bias)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)  # (a decode step pays for a no-op call too)

    def _input_grouped_forward(self, x: torch.Tensor, rows: torch.Tensor, weight_scale: torch.Tensor,
                               input_args: list) -> torch.Tensor:
        """Inputs per token in groups (`grouped_inputs_forward`): every group in one call of the decode op
        (`GroupedWeight`) or of the AVX2 op (`Avx2Weight`) where one runs, else one integer product per group of
        columns, int8 on the int8 runtime where ``torch._int_mm`` runs, float32 codes otherwise (the same bits); what
        it multiplies made once per runtime."""
        _, _, qmin, qmax, clip = input_args
        group_size = self._input_groups
        cached = self._input_group_weights
        if cached is None or cached[:2] != (self.runtime, group_size):
            self._input_group_weights = cached = (self.runtime, group_size, *self._input_group_operands(rows.device))
        integer, weight = cached[2:]
        return grouped_inputs_forward(x, rows, weight, integer, weight_scale, self.bias, group_size, qmin, qmax,
                                      clip, asymmetric=not self.input_spec.symmetric)

    def _input_group_operands(self, device: torch.device
                              ) -> tuple[bool, list[torch.Tensor] | Avx2Weight | GroupedWeight]:
        """Whether the grouped-input product is an integer one, and what it multiplies: on the int8 runtime the
        decode op's packed copy where its `grouped_gemm` runs (groups of a multiple of 4), the AVX2 op's panels where
        that op runs (even groups), else the weight's int8 codes in contiguous column groups where ``torch._int_mm``
        runs; otherwise (the simulation too) their float32 codes."""
        group_size = self._input_groups
        spec = self.weight_spec
        weight_group = group_size if spec is not None and spec.granularity == "group" else 0
        if self.runtime == "int8" and grouped_gemm_refusal(device, self.in_features, group_size) is None:
            codes = self.codes().to(torch.int8) if self.packed else self.weight
            return True, GroupedWeight.from_codes(codes, self.weight_scale, group_size)
        if (self.runtime == "int8" and group_size % 2 == 0
                and avx2_weight_refusal(device, self.in_features, weight_group) is None):
            weight = self._int8_weight()  # (where the AVX2 op runs: its panels, with the weight's group scales)
            assert isinstance(weight, Avx2Weight)
            return True, weight
        integer = self.runtime == "int8" and int_mm_refusal(device) is None
        codes = self.codes().to(torch.int8) if self.packed else self.weight
        codes = codes if integer else codes_to_float(codes)
        return integer, [group.contiguous() for group in codes.split(group_size, dim=1)]

    def _int4_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W4 (W3, W2) weight-only on the int8 runtime: the CPU's int4 kernel or a bfloat16 GEMM (`int4_linear`)."""
        y = int4_linear(x.reshape(-1, self.in_features), self._int4_prepared(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _int4_prepared(self) -> Int4Weight:
        """The int4 paths' tensors (`prepare_int4`), built on the first call; fewer than 4 bits are unpacked once
        into 4-bit fields."""
        if self._int4_weight is None:
            spec = self.weight_spec
            assert spec is not None and self.packed
            def grid(qparam: torch.Tensor) -> torch.Tensor:  # [out, groups] of a stored scale or zero point
                return qparam.reshape(-1, qparam.shape[-1]).float().expand(self.out_features, -1)
            scale = grid(self.weight_scale)
            zero = grid(self.weight_zero_point) if not spec.symmetric else torch.zeros_like(scale)
            # The 4-bit fields u = q - offset + 8 and their zero point: a 4-bit weight's packed fields as they are;
            # fewer bits' fields unpacked once and centred on the kernel's 8, which keeps its bfloat16 offsets
            # (8 - z) * s small (uncentred W2 fields put 6 s, rounded once for a whole group, on every weight)
            field_zero = zero + (FIELD_OFFSET - storage_offset(spec))
            centre = FIELD_OFFSET - 2 ** (spec.bits - 1)
            nibbles = (self.weight_packed.view(torch.uint8) if spec.bits == 4
                       else nibbles_of(unpack_fields(self.weight_packed, spec.bits, self.in_features) + centre))
            self._int4_weight = prepare_int4(nibbles, scale, field_zero, self.in_features)
        return self._int4_weight

    def _grouped_forward(self, rows: torch.Tensor, input_args: list) -> torch.Tensor:
        """W4A8, or W4A4 with inputs per token: one integer product per weight group (`grouped_linear`), int8 on the
        int8 runtime, float32 codes in the simulation (the same partial sums, exactly)."""
        spec = self.weight_spec
        assert spec is not None and spec.group_size is not None
        asymmetric = not self.input_spec.symmetric
        if self.runtime == "int8":
            return grouped_int8_linear(rows, self._int8_weight(), self.weight_scale, self.bias, spec.group_size,
                                       *input_args, asymmetric=asymmetric)
        codes, scale = (asymmetric_input_codes if asymmetric else input_codes)(rows, *input_args)
        if self._float_codes is None:
            self._float_codes = codes_to_float(self._weight_codes())
        groups = list(self._float_codes.split(spec.group_size, dim=1))
        return grouped_linear(codes, scale, groups, self.weight_scale, self.bias, float_product)

    # --- activation calibration -------------------------------------------------------------
    def start_observing(self) -> None:
        """Record input statistics on the next forwards (inputs pass unquantized meanwhile)."""
        if self.input_spec is not None and not self.input_spec.dynamic:
            self.observer = Observer(self.input_spec)

    @torch.no_grad()
    def stop_observing(self, ranks: Ranks = SINGLE) -> float | None:
        """Freeze the static input scale from what was observed (on every rank of ``ranks``); return its ratio to
        the scale of the observed minimum and maximum (1 for min-max, below 1 where the observer clipped: mse,
        percentile), or None without a static input."""
        if self.observer is None:
            return None
        self.observer.reduce(ranks)
        scale, zero = self.observer.qparams()
        self.input_scale.copy_(scale.reshape(1))
        if self.input_spec is not None and not self.input_spec.symmetric:
            self.input_zero_point.copy_(zero.reshape(1))
        full_range, _ = qparams_from_min_max(self.observer.min_vals, self.observer.max_vals, self.observer.spec)
        self.observer = None
        return float(scale.reshape(-1)[0] / full_range.reshape(-1)[0])

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.input_spec
        if spec is None:
            return x
        if self.observer is not None:
            self.observer.update(x)
            return x
        if spec.dynamic:
            return straight_through(x, shared_fake_quantize(x, spec))
        zero = None if spec.symmetric else self.input_zero_point
        return straight_through(x, shared_fake_quantize(x, spec, self.input_scale, zero))

    def _fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
        """FP8 W8A8 on the kernel runtime: ``torch._scaled_mm`` (`llmquant.nn.fp8_linear`)."""
        spec = self.input_spec
        assert spec is not None
        rows = x.reshape(-1, self.in_features)
        if self._fp8_blocks:
            y = fp8_block_linear(rows, self.weight, self.weight_scale, self.bias, spec)
        else:
            y = fp8_linear(rows, self.weight, self.weight_scale.reshape(1, -1), self.bias, spec,
                           None if spec.dynamic else self.input_scale)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _resolve_decode_rows(self) -> DecodeRows | Int4DecodeRows | Int16Rows | bool:
        """This layer's `DecodeRows` on the int8 runtime (a W8A8 layer whose codes the decode op makes) or its
        `Int4DecodeRows` (a W4 layer where the decode op runs) or `Int16Rows` (a W4 layer where the AVX2 op's
        `int16_linear` runs), else False; kept until the runtime, the input spec or
        the weight changes (`set_runtime`, `set_input_clip`, `drop_caches`)."""
        decode = False
        spec = self.weight_spec
        if (self.runtime == "int8" and self.supports_int8 and spec is not None and spec.granularity != "group"
                and not self._input_groups):  # (the decode op: per token or tensor, or static)
            weight_scale, *input_args = self._int8_args()
            decode = decode_rows(self._int8_weight(), weight_scale, self.bias, self.in_features, *input_args,
                                 asymmetric=not self.input_spec.symmetric) or False
        elif self.runtime == "int8" and self.supports_int4:
            decode = int4_decode_rows(self._int4_prepared(), self.bias, self.in_features) or False
        self._decode_rows = decode
        return decode

    def _learns_scales(self) -> bool:
        """Whether the weight's scales are being learned (they require a gradient, and autograd records:
        `llmquant.algorithms.scale_training`)."""
        scale = self._buffers.get("weight_scale")
        return scale is not None and scale.requires_grad and torch.is_grad_enabled()

    def _differentiable_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The simulation, differentiable: the inputs quantized straight through (`straight_through`), the weight
        made from its codes at every call (no float copy kept: its scales may be what is learned; the codes are
        unpacked once, `_weight_codes`). A weight with one scale per output row (per channel or per tensor) scales
        the product's columns instead, y = (x_q (q - z)^T) s + b, as the integer paths do: autograd then needs no
        gradient of the whole weight for the scales' (dL/ds = sum over tokens of dL/dy * x_q (q - z)^T), which takes
        a third of a Linear's products off a training step. The same function as the integer paths, up to float
        rounding."""
        inputs = self.quantize_input(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        spec = self.weight_spec
        assert spec is not None
        if self.code_offsets is not None:
            return F.linear(inputs, self._dequantize().to(x.dtype), bias)
        if spec.granularity not in ("channel", "tensor"):
            weight = dequantize(self._weight_codes(), *self.weight_qparams(), spec)
            return F.linear(inputs, weight.to(x.dtype), bias)
        codes = codes_to_float(self._weight_codes())
        if not spec.symmetric:
            codes = codes - self.weight_qparams()[1]
        y = F.linear(inputs, codes.to(x.dtype)) * self.weight_scale.reshape(-1).to(x.dtype)
        return y if bias is None else y + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._learns_scales():
            return self._differentiable_forward(x)
        decode = self._decode_rows if self._decode_rows is not None else self._resolve_decode_rows()
        if decode and x.numel() <= decode.max_values and self.observer is None:
            return decode(x) if x.dtype == torch.float32 else decode(x.float(), x).to(x.dtype)
        if self.observer is None and self.supports_int8:
            return self._integer_forward(x)
        if self.runtime == "int8" and self.observer is None and self.supports_fp8:
            return self._fp8_forward(x)
        if self.runtime == "int8" and self.supports_int4:
            return self._int4_forward(x)
        if (self.runtime == "int8" and self.supports_weight_only_int8
                and (y := self._weight_only_int8_forward(x)) is not None):
            return y
        weight = self.dequantized_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(self.quantize_input(x), weight, bias)

    def extra_repr(self) -> str:
        w = self.weight_spec.describe() if self.weight_spec else "float"
        a = self.input_spec.describe() if self.input_spec else "float"
        packed = ", packed" if self.packed else ""
        return f"in={self.in_features}, out={self.out_features}, weight={w}{packed}, input={a}, runtime={self.runtime}"


def set_input_clip(model: nn.Module, ratio: float) -> int:
    """Give every `QuantLinear` with a dynamic input quantizer the clip ratio ``ratio`` (`QuantSpec.clip_ratio`);
    return how many changed. (A static input scale was calibrated with its own ratio: left as it is.)"""
    changed = 0
    for module in model.modules():
        spec = module.input_spec if isinstance(module, QuantLinear) else None
        if spec is not None and spec.dynamic:
            module.set_input_spec(spec.model_copy(update={"clip_ratio": ratio, "clip_grid": None}))
            changed += 1
    return changed


def set_runtime(model: nn.Module, runtime: str, exact_only: bool = False) -> int:
    """Run every `QuantLinear` that can with ``runtime`` ("fake" or "int8"), and store the KV cache of the
    attentions with a `KVCacheQuantizer` as int8 or simulate it (`set_kv_cache_runtime`); return how many
    modules (QuantLinears and KV-cache quantizers) switched. An int8-capable layer the kernel refuses where it
    is (`QuantLinear.int8_refusal`) keeps the simulation, which computes the same function; the reason is logged
    once and kept on the layer (``int8_fallback``). ``exact_only``: only the integer products that give the
    simulation's bits (W8A8, W4A8, W4A4); weight-only layers (the int4 kernel's bfloat16, the W8A16 op's float32
    sums) and FP8 GEMMs keep the simulation (the engine's propagation: with `best_w3_g64.yaml` the bfloat16
    outputs fed to the next layer's GPTQ cost x1.1287 -> x1.1371 on pydoc, BENCHMARKS.md)."""
    if runtime not in ("fake", "int8"):
        from llmquant.errors import LlmquantError

        raise LlmquantError(f"unknown runtime '{runtime}'; allowed: fake, int8")
    switched = 0
    reasons: set[str] = set()
    for module in model.modules():
        if not isinstance(module, QuantLinear) or (
                runtime == "int8" and not (module.supports_int8 or (not exact_only and (
                    module.supports_int4 or module.supports_fp8 or module.supports_weight_only_int8)))):
            continue
        refusal = module.int8_refusal() if runtime == "int8" else None
        module.int8_fallback = refusal
        if refusal is not None:
            reasons.add(refusal)
            continue
        module.runtime = runtime
        module._decode_rows = None  # (resolved again for this runtime)
        switched += 1
    for reason in sorted(reasons):
        log.info("int8 runtime: some Linears keep the simulation: %s", reason)
    return switched + set_kv_cache_runtime(model, runtime)

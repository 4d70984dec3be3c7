"""The W4 weight-only CPU kernel (`llmquant.nn.int4_linear`): torch's int4 kernel for few rows, the dequantized
bfloat16 GEMM for more; both compute the layer's function in bfloat16, checked against a float64 reference of the
same bfloat16 inputs and against the float32 simulation; W3 and W2 weights run the same paths as 4-bit fields. On a
CPU with AVX2 but neither native bfloat16 products nor VNNI, every row count takes per-token int16 input codes and the
AVX2 op's exact integer products (`int16_linear`); where the AVX512-VNNI op runs, a few rows (decode steps) take its
float32 product of the stored 4-bit fields (`Int4DecodeRows`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import feign_cpu, feign_no_int8_instructions, make_model, needs_avx2, needs_gemv
from llmquant.nn import int4_linear, int8_gemv, int8_linear
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.quant import QuantSpec

BF16_EPS = 2.0**-8  # bfloat16's relative rounding step

SPECS = [
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64),
    QuantSpec(bits=4, symmetric=True, granularity="group", group_size=32),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128),
    QuantSpec(bits=4, symmetric=True, granularity="channel"),
    QuantSpec(bits=4, symmetric=False, granularity="tensor"),
    QuantSpec(bits=3, symmetric=False, granularity="group", group_size=64),
    QuantSpec(bits=2, symmetric=True, granularity="group", group_size=32),
]


def _layer(spec: QuantSpec, in_features: int = 256, out_features: int = 96) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(in_features, out_features), spec, None)


def _bf16_reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x and the dequantized weight rounded to bfloat16, multiplied in float64: what a bfloat16 kernel with float
    accumulation computes, up to its output's rounding."""
    weight = layer.dequantized_weight().to(torch.bfloat16).double()
    return x.to(torch.bfloat16).double() @ weight.t() + layer.bias.double()


@pytest.mark.parametrize("rows", [1, 3, int4_linear.DECODE_MAX_ROWS, int4_linear.DECODE_MAX_ROWS + 1, 200])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("native", [True, False], ids=["bf16_gemm", "float32_gemm"])  # (no AVX512-BF16 or AMX: False)
def test_int4_runtime_computes_the_layer_in_bfloat16(spec: QuantSpec, rows: int, native: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    feign_cpu(monkeypatch, avx512_bf16=native, amx=False)
    monkeypatch.setenv("LLMQUANT_GEMV", "0")  # (the bfloat16 paths, not int16_linear, on an AVX2 CPU)
    layer = _layer(spec)
    x = torch.randn(2, rows, 256)
    simulated = layer(x)
    assert set_runtime(layer, "int8") == 1 and layer.runtime == "int8"
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, rows, 96)
    scale = simulated.abs().max()
    # the bfloat16 rounding of the scales, the weights (GEMM path) and the output: a few steps of 2^-8
    assert (y.double() - _bf16_reference(layer, x)).abs().max() <= 4 * BF16_EPS * scale
    assert (y - simulated).abs().max() <= 4 * BF16_EPS * scale
    assert (y - simulated).abs().max() > 0  # a real kernel ran, not the simulation


@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: s.describe())
def test_both_paths_read_the_same_codes(spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQUANT_GEMV", "0")  # (torch's int4 kernel and the bfloat16 GEMM on any CPU)
    layer = _layer(spec, 512, 64)
    set_runtime(layer, "int8")
    x = torch.randn(8, 512)
    by_kernel = layer(x)
    monkeypatch.setattr(int4_linear, "DECODE_MAX_ROWS", 0)
    by_gemm = layer(x)
    assert (by_kernel - by_gemm).abs().max() <= 4 * BF16_EPS * by_kernel.abs().max()
    weight = layer._int4_weight
    assert weight is not None
    exact = layer.dequantized_weight()
    assert (int4_linear.dequantize_bf16(weight).float() - exact).abs().max() <= 2 * BF16_EPS * exact.abs().max()


FLOAT32_EPS = 2.0**-24  # float32's relative rounding step


def _op_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the C++ ops the W4 paths call from now on."""
    calls: list[str] = []

    def spy(kernel: object, name: str, *args: object) -> object:
        calls.append(name)
        return getattr(kernel, name)(*args)

    monkeypatch.setattr(int4_linear, "call_op", spy)
    return calls


@needs_gemv
@pytest.mark.parametrize("rows", [1, 2, 3, int4_linear.GEMV_MAX_ROWS])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_decode_rows_take_the_float32_product_of_the_stored_fields(spec: QuantSpec, rows: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to `GEMV_MAX_ROWS` rows the op multiplies float32 inputs by the 4-bit fields as stored: the simulation's
    x @ W_hat^T within float32 roundings (a float64 reference), far closer than the bfloat16 paths; the input's
    leading dimensions kept."""
    monkeypatch.setenv("LLMQUANT_GEMV", "1")
    calls = _op_calls(monkeypatch)
    layer = _layer(spec)
    x = torch.randn(1, rows, 256)
    x[..., 3] *= 40  # an outlier channel
    simulated = layer(x)
    set_runtime(layer, "int8")
    y = layer(x)
    assert calls == ["int4_gemv"] and y.dtype == torch.float32 and y.shape == (1, rows, 96)
    assert isinstance(layer._decode_rows, int4_linear.Int4DecodeRows)
    weight = layer.dequantized_weight().double()
    reference = x.double() @ weight.t() + layer.bias.double()
    magnitude = x.double().abs() @ weight.abs().t() + layer.bias.double().abs()  # (what the roundings scale with)
    assert ((y.double() - reference).abs() <= 64 * FLOAT32_EPS * magnitude).all()
    assert (y - simulated).abs().max() <= BF16_EPS / 256 * simulated.abs().max()
    assert id(layer._int4_weight.float_zero) in {id(t) for t in layer.runtime_caches()}
    rounded = x.bfloat16()
    assert torch.equal(layer(rounded), layer(rounded.float()).bfloat16())  # (other dtypes through a float32 copy)


@needs_gemv
def test_decode_rows_without_a_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQUANT_GEMV", "1")
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(256, 32, bias=False), SPECS[0], None)
    set_runtime(layer, "int8")
    x = torch.randn(2, 256)
    weight = layer.dequantized_weight().double()
    magnitude = x.double().abs() @ weight.abs().t()
    assert ((layer(x).double() - x.double() @ weight.t()).abs() <= 64 * FLOAT32_EPS * magnitude).all()
    assert isinstance(layer._decode_rows, int4_linear.Int4DecodeRows) and layer._decode_rows.bias is None


@needs_gemv
def test_more_rows_or_the_switch_leave_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `GEMV_MAX_ROWS` rows torch's int4 kernel multiplies (bfloat16 inputs); with ``LLMQUANT_GEMV=0`` when the
    runtime is set, the op stays off at any row count."""
    monkeypatch.setenv("LLMQUANT_GEMV", "1")
    calls = _op_calls(monkeypatch)
    layer = _layer(SPECS[0])
    set_runtime(layer, "int8")
    x = torch.randn(int4_linear.GEMV_MAX_ROWS + 1, 256)
    many = layer(x)
    few = layer(x[:1])
    assert calls == ["int4_gemv"] and 0 < (few - many[:1]).abs().max() <= 4 * BF16_EPS * many.abs().max()
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    set_runtime(layer, "int8")
    assert torch.equal(layer(x[:1]), many[:1]) and calls == ["int4_gemv"]  # (torch's kernel: rows are independent)


@pytest.fixture
def avx2_without_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU with AVX2 but neither VNNI nor AMX nor AVX512-BF16 (feigned where present)."""
    feign_no_int8_instructions(monkeypatch)
    monkeypatch.setenv("LLMQUANT_GEMV", "1")
    feign_cpu(monkeypatch, avx512_bf16=False)


def _int16_reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """`int16_linear`'s y in torch: per-token int16 codes, exact integer dots per group (int64), then the float32
    scaling in `grouped_linear`'s order."""
    rows = x.reshape(-1, layer.in_features)
    scale = rows.abs().amax(dim=1, keepdim=True).div_(int4_linear.INT16_QMAX)
    codes = rows.div(scale).round_().long()
    weight = layer._int4_weight
    group = weight.group_size
    fields = torch.stack((weight.nibbles & 15, weight.nibbles >> 4), -1).reshape(layer.out_features, -1).long()
    zero = weight.zero.squeeze(-1).float().long()  # (integral: the field zero points)
    weight_codes = (fields.view(layer.out_features, -1, group) - zero.unsqueeze(-1)).view(layer.out_features, -1)
    weight_scale = layer.weight_scale.reshape(-1, layer.weight_scale.shape[-1]).float().expand(layer.out_features, -1)
    y = int8_linear.grouped_linear(codes, scale, list(weight_codes.split(group, dim=1)), weight_scale, layer.bias,
                                   lambda a, b: (a @ b.T).float())
    return y.reshape(*x.shape[:-1], layer.out_features)


@needs_avx2
@pytest.mark.parametrize("rows", [1, 3, 100])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_w4_on_avx2_takes_int16_codes(spec: QuantSpec, rows: int, avx2_without_bfloat16: None) -> None:
    layer = _layer(spec)
    x = torch.randn(2, rows, 256)
    x[..., 3] *= 40  # an outlier channel, as LLMs' activations have
    simulated = layer(x)
    set_runtime(layer, "int8")
    y = layer(x)
    weight = layer._int4_weight
    assert weight.int16_weight is not None and weight.kernel_codes is None  # (no int4 kernel copy beside the panels)
    cached = {id(t) for t in layer.runtime_caches()}
    assert all(id(t) in cached for t in weight.int16_weight.tensors())  # (1 byte a weight, counted)
    assert y.dtype == torch.float32 and torch.equal(y, _int16_reference(layer, x))
    # each input off by at most 2^-16 of its row's largest value: far closer than the bfloat16 inputs' 2^-9 of each
    scale = simulated.abs().max()
    error = (y - simulated).abs().max()
    assert 0 < error <= BF16_EPS / 16 * scale
    assert error < (_bf16_reference(layer, x).float() - simulated).abs().max() / 4


@needs_avx2
def test_w4_layers_on_avx2_make_one_call_of_the_op(avx2_without_bfloat16: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each W4 layer's forward is resolved once into an `Int16Rows` and, at every row count, makes one call of the
    op (its int16 codes and products: `int16_linear`) with the two calls' bits; a bfloat16 input gives its float32
    copy's output, rounded."""
    calls = []
    def counted(op: object, name: str, *args: object) -> object:
        calls.append(name)
        return int8_gemv.call_op(op, name, *args)
    monkeypatch.setattr(int4_linear, "call_op", counted)
    layer = _layer(SPECS[0])
    set_runtime(layer, "int8")
    for shape in ((1, 1, 256), (2, 70, 256), (5, 256)):
        x = torch.randn(shape)
        y = layer(x)
        assert calls == ["int16_linear"] and isinstance(layer._decode_rows, int4_linear.Int16Rows)
        int16 = layer._int4_weight.int16_weight
        codes, scale = int8_gemv.int16_token_codes(int16.op, x.reshape(-1, 256))
        assert torch.equal(y, int16(codes, scale, layer.bias).view(*shape[:-1], 96))
        assert torch.equal(y, _int16_reference(layer, x))
        calls.clear()
    low = torch.randn(3, 256).to(torch.bfloat16)
    assert torch.equal(layer(low), layer(low.float()).to(torch.bfloat16))


@needs_avx2
@pytest.mark.parametrize("inner", [256, 13, 8])
def test_int16_codes_are_torchs(inner: int, avx2_without_bfloat16: None) -> None:
    op = int8_gemv.avx2_kernel(torch.empty(0))
    rows = torch.randn(6, inner) * torch.tensor([1e-3, 1.0, 1e3, 1.0, 1.0, 1.0]).unsqueeze(1)
    rows[3] = 0.0
    rows[4, :4] = torch.tensor([32767.0, 0.5, 1.5, -2.5])  # scale 1: ties rounded to even
    rows[4, 4:] = rows[4, 4:].clamp(-32767, 32767)
    rows[5, 1] = float("nan")
    codes, scale = int8_gemv.int16_token_codes(op, rows)
    expected_scale = rows.abs().amax(dim=1, keepdim=True).div_(int4_linear.INT16_QMAX)
    expected_scale.clamp_(min=torch.finfo(torch.float32).tiny)
    assert codes.dtype == torch.int16 and torch.equal(scale[:5], expected_scale[:5]) and scale[5].isnan()
    assert torch.equal(codes[:5], rows[:5].div(expected_scale[:5]).round_().to(torch.int16))
    assert codes[4, :4].tolist() == [32767, 0, 2, -2]
    with pytest.raises(RuntimeError, match=r"int16_token_codes: float32 rows \[n, in\]"):
        int8_gemv.int16_token_codes(op, rows.double())


@needs_avx2
def test_int16_path_is_off_where_it_could_overflow_or_is_switched_off(avx2_without_bfloat16: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    wide = _layer(QuantSpec(bits=4, symmetric=True, granularity="channel"), 4480, 16)  # 4480 * 32767 * 15 > 2^31
    set_runtime(wide, "int8")
    x = torch.randn(70, 4480)
    assert torch.allclose(wide(x), x.to(torch.bfloat16).float() @ wide.dequantized_weight().t() + wide.bias,
                          rtol=0, atol=4 * BF16_EPS * 4480 ** 0.5)
    assert wide._int4_weight.int16_weight is None and wide._int4_weight.kernel_codes is not None
    layer = _layer(SPECS[0])
    set_runtime(layer, "int8")
    for rows in (70, 2):
        x = torch.randn(rows, 256)
        monkeypatch.setenv("LLMQUANT_GEMV", "1")
        int16 = layer(x)
        monkeypatch.setenv("LLMQUANT_GEMV", "0")  # (read at every call): the bfloat16 values multiplied in float32
        weight_bf16 = int4_linear.dequantize_bf16(layer._int4_weight).float()
        expected = (x.to(torch.bfloat16).float() @ weight_bf16.t()).to(torch.bfloat16).float() + layer.bias
        assert torch.allclose(layer(x), expected, rtol=2 * BF16_EPS, atol=1e-6) and not torch.equal(layer(x), int16)


@pytest.mark.parametrize("bits", [3, 2])
def test_fewer_bits_run_as_4_bit_fields(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A W3 or W2 layer's fields, unpacked once into bytes of two 4-bit fields, are its codes (q minus its zero point
    in the field domain gives the stored code minus the stored zero); the copy is counted as a runtime cache."""
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    layer = _layer(QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=64), 256, 32)
    set_runtime(layer, "int8")
    assert layer.runtime == "int8" and layer.int8_fallback is None
    layer(torch.randn(1, 256))
    weight = layer._int4_weight
    fields = torch.stack((weight.nibbles & 15, weight.nibbles >> 4), -1).reshape(32, 256)
    centre = 8 - 2 ** (bits - 1)  # (centred on the int4 kernel's 8)
    assert centre <= fields.min() and fields.max() <= centre + 2**bits - 1 and weight.nibbles.shape == (32, 128)
    zero = weight.zero.float().squeeze(-1).repeat_interleave(64, dim=1)
    stored_zero = layer.weight_zero_point.float().repeat_interleave(64, dim=1)
    assert torch.equal(fields.float() - zero, layer.codes().float() - stored_zero)
    assert id(weight.nibbles) in {id(t) for t in layer.runtime_caches()}
    assert torch.equal(int4_linear.nibbles_of(fields), weight.nibbles)


def test_the_engines_exact_runtime_leaves_weight_only_layers_simulated() -> None:
    """`set_runtime(..., exact_only=True)`, the engine's switch for the layer it propagates: integer products that
    give the simulation's bits switch, the int4 kernel's bfloat16 layers do not (their outputs feed the next
    layer's GPTQ)."""
    weight_only = _layer(SPECS[0])
    integer = QuantLinear.from_linear(nn.Linear(256, 96), QuantSpec(bits=8, granularity="channel"),
                                      QuantSpec(bits=8, granularity="token", dynamic=True))
    model = nn.Sequential(weight_only, integer)
    assert set_runtime(model, "int8", exact_only=True) == 1
    assert weight_only.runtime == "fake" and integer.runtime == "int8"
    assert set_runtime(model, "int8") == 2 and weight_only.runtime == "int8"


def test_int4_caches_are_counted_and_dropped_with_the_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQUANT_GEMV", "0")  # (torch's int4 kernel on any CPU)
    layer = _layer(SPECS[0], 256, 96)
    set_runtime(layer, "int8")
    assert layer.runtime_caches() == []
    layer(torch.randn(1, 256))
    codes, scales = layer._int4_weight.kernel_codes, layer._int4_weight.kernel_scales
    assert codes.numel() * codes.element_size() == 96 * 256 // 2  # half a byte a weight
    cached = {id(t) for t in layer.runtime_caches()}
    assert id(codes) in cached and id(scales) in cached
    assert not any(t.untyped_storage().data_ptr() == layer.weight_packed.untyped_storage().data_ptr()
                   for t in layer.runtime_caches())  # the nibbles are a view of the state dict, not a cache
    layer.set_weight(torch.zeros(96, 256))
    assert layer._int4_weight is None
    assert torch.equal(layer(torch.randn(2, 256)), layer.bias.expand(2, 96))


@pytest.mark.parametrize(("spec", "shape", "reason"), [
    (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32), (64, 40), "multiple of 16, not 40"),
    (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16), (64, 32), "multiple of 32 input"),
    (QuantSpec(bits=5, symmetric=False, granularity="group", group_size=32), (64, 32), "2 to 4 bits, not 5-bit"),
])
def test_shapes_the_kernel_refuses_keep_the_simulation(spec: QuantSpec, shape: tuple[int, int], reason: str) -> None:
    layer = _layer(spec, *shape)
    x = torch.randn(3, shape[0])
    simulated = layer(x)
    set_runtime(layer, "int8")
    assert layer.runtime == "fake"
    in_features, out_features = shape
    group = spec.group_size or in_features
    assert reason in int4_linear.int4_refusal(spec.bits, group, in_features, out_features, torch.device("cpu"))
    assert layer.int8_fallback == (int4_linear.int4_refusal(spec.bits, group, *shape, torch.device("cpu"))
                                   if layer.supports_int4 else None)
    assert torch.equal(layer(x), simulated)


@pytest.mark.parametrize("scheme", ["w_uint4_per_group_asym", "w_uint3_per_group_asym"])
def test_w4_model_on_the_int4_kernel_keeps_its_logits(scheme: str, calib_ids: torch.Tensor,
                                                      eval_ids: torch.Tensor) -> None:
    import llmquant

    model = make_model("llama")
    llmquant.quantize(model, {"scheme": scheme, "group_size": 32}, calib=calib_ids, progress=False)
    with torch.no_grad():
        simulated = model(eval_ids).logits
        switched = set_runtime(model, "int8")
        assert switched == sum(isinstance(m, QuantLinear) for m in model.modules())
        kernel = model(eval_ids).logits
    assert (kernel - simulated).abs().max() <= 0.02 * simulated.abs().max()
    assert (kernel.argmax(-1) == simulated.argmax(-1)).float().mean() > 0.95

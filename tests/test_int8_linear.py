"""The W8A8 int8 linear (`llmquant.nn.int8_linear`): the eager and the compiled kernels give the simulation's bits,
for every input scale (per token, per tensor, static), with and without a bias, at decode and prefill shapes, with
oneDNN's product, the decode op (`llmquant.nn.int8_gemv`), the AVX2 op (on VNNI machines with their instructions
feigned absent) and ``torch._int_mm``; oneDNN's product and both ops are exact; Linears reading one tensor quantize it
once, and only while it is unchanged."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import torch

import llmquant
from conftest import (
    AVX2_OP_REFUSAL,
    GEMV_REFUSAL,
    feign_cpu,
    feign_no_int8_instructions,
    logits,
    make_model,
    needs_avx2,
    needs_gemv,
    relative_error,
)
from llmquant.nn import int8_gemv
from llmquant.nn import int8_linear as kernel
from llmquant.nn.kv_storage import cache_argument, returned_cache
from llmquant.nn.quant_linear import QuantLinear, set_input_clip, set_runtime
from llmquant.quant.primitives import fake_quantize, pairwise_row_sums
from llmquant.quant.scheme import W8A8_SCHEMES, scheme_from_name

W4A4_ASYM = "w_int4_per_channel_sym_a_uint4_per_token_asym_dynamic"
W4A4_ASYM_WGROUPS = "w_int4_per_group_sym_a_uint4_per_token_asym_dynamic"  # the weight in groups, inputs per token


def grouped_reference(codes: torch.Tensor, scale: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """What a grouped integer kernel computes, in float64: s_x * sum_g s_w,g * (x_q,g . w_q,g) + b (a weight per
    channel: one group)."""
    weight = layer.codes().double()
    w_scale = layer.weight_scale.double().reshape(layer.out_features, -1)
    group = layer.in_features // w_scale.shape[1]
    return sum((codes[:, g * group:(g + 1) * group].double() @ weight[:, g * group:(g + 1) * group].T) * w_scale[:, g]
               for g in range(w_scale.shape[1])) * scale.double() + layer.bias.double()


def _layer(scheme: str, bias: bool, group_size: int | None = None) -> QuantLinear:
    linear = torch.nn.Linear(96, 80, bias=bias)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(0))
    spec = scheme_from_name(scheme, group_size, None)
    layer = QuantLinear.from_linear(linear, spec.weights, spec.input_activations)
    if not spec.input_activations.dynamic:  # a calibrated static scale
        layer.start_observing()
        layer(torch.randn(64, 96, generator=torch.Generator().manual_seed(1)))
        layer.stop_observing()
    return layer


def _outputs(layer: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    set_runtime(layer, "fake")
    simulated = layer(x)
    set_runtime(layer, "int8")
    return simulated, layer(x)


@pytest.mark.parametrize("scheme", [s for s in W8A8_SCHEMES if "per_tensor_a" not in s or "static" in s])
@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize(("onednn", "gemv"), [("1", "1"), ("0", "0")])
def test_the_eager_int8_kernel_gives_the_simulations_bits(scheme: str, rows: int, onednn: str, gemv: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQUANT_ONEDNN", onednn)
    monkeypatch.setenv("LLMQUANT_GEMV", gemv)
    for bias in (False, True):
        layer = _layer(scheme, bias)
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3
        simulated, integer = _outputs(layer, x)
        assert torch.equal(simulated, integer), (scheme, rows, bias)


def test_the_compiled_int8_kernel_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQUANT_COMPILE", "1")
    monkeypatch.setenv("LLMQUANT_GEMV", "0")  # (the AVX2 op makes its codes and scales in one call: not compiled)
    monkeypatch.setattr(kernel, "COMPILE_MIN_ELEMENTS", 0)  # every call through torch.compile
    monkeypatch.setattr(kernel, "_compiled", None)
    monkeypatch.setattr(kernel, "_compile_off", None)
    for scheme in ("w_int8_per_channel_a_int8_per_token_dynamic", "w_int8_per_tensor_a_int8_per_tensor_static"):
        layer = _layer(scheme, bias=True)
        x = torch.randn(300, 96, generator=torch.Generator().manual_seed(2)) * 3
        simulated, integer = _outputs(layer, x)
        if kernel._compile_off is not None:
            pytest.skip(f"torch.compile cannot run here: {kernel._compile_off}")
        assert kernel._compiled is not None and torch.equal(simulated, integer), scheme


def test_a_failing_compiler_falls_back_to_the_eager_kernel_once(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setenv("LLMQUANT_COMPILE", "1")
    monkeypatch.setenv("LLMQUANT_GEMV", "0")  # (the AVX2 op makes its codes and scales in one call: not compiled)
    monkeypatch.setattr(kernel, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(kernel, "_compiled", None)
    monkeypatch.setattr(kernel, "_compile_off", None)
    monkeypatch.setattr(torch, "compile", lambda fn, **_: broken)
    layer = _layer("w_int8_per_channel_a_int8_per_token_dynamic", bias=False)
    x = torch.randn(20, 96, generator=torch.Generator().manual_seed(3))
    simulated, integer = _outputs(layer, x)
    assert torch.equal(simulated, integer)
    assert "torch.compile failed (RuntimeError: no C++ compiler found)" in caplog.text
    assert kernel._compile_off is not None and torch.equal(layer(x), integer)  # (not tried again)


@pytest.mark.parametrize("scheme", [*W8A8_SCHEMES[:4], "w_int4_per_group_sym_a_int8_per_token_dynamic",
                                    "w_int4_per_channel_sym_a_int4_per_token_dynamic", W4A4_ASYM, W4A4_ASYM_WGROUPS])
@pytest.mark.parametrize("rows", [1, 3, 300])
def test_without_vnni_or_amx_the_codes_multiply_as_float32_with_the_simulations_bits(
        scheme: str, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX2-only CPU: ``torch._int_mm`` is many times slower than float32 there and oneDNN's int8 product
    saturates, so the codes multiply as float32 (the weight's codes kept as float32, made once); same bits."""
    feign_no_int8_instructions(monkeypatch)
    monkeypatch.setenv("LLMQUANT_GEMV", "0")  # (the AVX2 op off: `test_without_vnni_or_amx_the_avx2_op_...`)
    monkeypatch.setattr(torch, "_int_mm", lambda *args: pytest.fail("torch._int_mm called"))
    assert kernel.onednn_refusal(torch.device("cpu")) == "the CPU has no VNNI or AMX int8 instructions"
    assert "VNNI or AMX" in kernel.int_mm_refusal(torch.device("cpu"))
    layer = _layer(scheme, bias=True, group_size=32)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3
    simulated, integer = _outputs(layer, x)
    assert torch.equal(simulated, integer)
    weight = layer._int8_weight()
    assert weight.float_codes is not None and torch.equal(weight.float_codes, weight.codes.float())
    first = weight.float_codes
    layer(x)
    assert weight.float_codes is first  # (made once, and counted in the layer's runtime memory)
    assert sum(tensor is first for tensor in layer.runtime_caches()) == 1
    monkeypatch.setenv("LLMQUANT_INT_MM", "1")
    assert kernel.int_mm_refusal(torch.device("cpu")) is None


def _avx2(monkeypatch: pytest.MonkeyPatch) -> object:
    """The AVX2 op of `llmquant.nn.int8_gemv`, where it runs (on a CPU with VNNI or AMX too, their absence feigned
    for the rest of the test)."""
    feign_no_int8_instructions(monkeypatch)
    monkeypatch.setenv("LLMQUANT_GEMV", "1")
    op = int8_gemv.avx2_kernel(torch.empty(0))
    assert op is not None, int8_gemv.avx2_gemv_refusal(torch.device("cpu"))  # (tools present: it must build)
    return op


@pytest.fixture
def avx2_op(monkeypatch: pytest.MonkeyPatch) -> object:
    return _avx2(monkeypatch)


def _code_cases(rows: int, inner: int, outputs: int, generator: torch.Generator
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """int8 input codes ``[rows, inner]`` and weight codes ``[outputs, inner]``: random, all 127, all -128."""
    def full(value: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.full((rows, inner), value, dtype=torch.int8),
                torch.full((outputs, inner), value, dtype=torch.int8))
    return {"random": (torch.randint(-128, 128, (rows, inner), generator=generator, dtype=torch.int8),
                       torch.randint(-128, 128, (outputs, inner), generator=generator, dtype=torch.int8)),
            "largest": full(127), "most negative": full(-128)}


def _avx2_product(op: object, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, group: int = 0) -> torch.Tensor:
    """y by the AVX2 op's `avx2_gemm` on the packed weight."""
    return int8_gemv.avx2_gemm(op, x, int8_gemv.avx2_gemm_pack(w, weight_scale, group), scale, bias, w.shape[0], group)


@needs_avx2
@pytest.mark.parametrize(("inner", "outputs"), [(576, 192), (96, 80), (100, 7), (8192, 9), (16, 1)])
def test_the_avx2_ops_product_is_exact_and_its_codes_are_torchs(inner: int, outputs: int, avx2_op: object) -> None:
    generator = torch.Generator().manual_seed(inner)
    unit = torch.ones(1, 1)
    for rows in (1, 2, 3, 6, 7, 11, 16, 100):  # (tiles of 6 rows: 1 to 6 rows in the last, widened from 7)
        for name, (x, w) in _code_cases(rows, inner, outputs, generator).items():
            exact = (x.long() @ w.long().T).float()  # (beyond 2^24, rounded once, as a promotion of int32 rounds)
            product = _avx2_product(avx2_op, x, w, unit, unit, None)
            assert product.dtype == torch.float32 and torch.equal(product, exact), (rows, name)
            for scale, weight_scale in ((torch.rand(rows, 1), torch.rand(1, outputs)), (torch.rand(1, 1), unit)):
                for bias in (None, torch.randn(outputs)):
                    expected = kernel.scale_output(exact.clone(), scale, weight_scale, bias)
                    y = _avx2_product(avx2_op, x, w, scale, weight_scale, bias)
                    assert torch.equal(y, expected), (rows, name, bias is None)
            for group in (g for g in (16, 4, inner // 2) if inner % g == 0):  # (of 4: one by one; of 50: a tail)
                scale, weight_scale = torch.rand(rows, 1, generator=generator), torch.rand(outputs, inner // group)
                bias = torch.randn(outputs, generator=generator)
                groups = list(w.long().split(group, dim=1))  # (exact dots: a float32 product rounds beyond 2^24)
                expected = kernel.grouped_linear(x.long(), scale, groups, weight_scale, bias,
                                                 lambda a, b: (a @ b.T).float())
                y = _avx2_product(avx2_op, x, w, scale, weight_scale, bias, group)
                assert torch.equal(y, expected), (rows, name, group)
        values = torch.randn(rows, inner, generator=generator) * torch.rand(rows, 1, generator=generator) * 10
        values[0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1 where |x| <= 127: ties rounded to even
        values[0] = values[0].clamp(-127, 127)
        for rows_in in (values, torch.zeros(rows, inner)):
            for qmin, qmax in ((-128, 127), (-8, 7)):  # (W8A8, W4A4)
                for clip in (1.0, 0.8, 0.3):
                    codes, scale = int8_gemv.token_codes(avx2_op, rows_in, qmax, qmin, clip)
                    expected_codes, expected_scale = kernel.int8_codes(rows_in, "token", None, qmin, qmax, clip)
                    assert torch.equal(codes, expected_codes) and torch.equal(scale, expected_scale), (qmax, clip)
                for static in (torch.ones(1, 1), torch.full((1, 1), 0.37), torch.full((1, 1), 0.05)):  # (clamped)
                    codes = int8_gemv.static_codes(avx2_op, rows_in, static, qmin, qmax)
                    expected_codes, _ = kernel.int8_codes(rows_in, None, static, qmin, qmax)
                    assert torch.equal(codes, expected_codes), (rows, qmax, static.item())


@needs_avx2
@pytest.mark.parametrize(("inner", "outputs"), [(256, 48), (96, 80), (100, 7)])
def test_the_avx2_ops_product_of_int16_codes_is_exact(inner: int, outputs: int, avx2_op: object) -> None:
    """int16 input codes (W4 on AVX2 CPUs, `llmquant.nn.int4_linear.int16_linear`) go to VPMADDWD as they are:
    the same exact sums and float32 scaling as int8 codes, at the extremes too (|x| * |w| * inner below 2^31)."""
    generator = torch.Generator().manual_seed(inner)
    for rows in (1, 5, 100):
        cases = {"random": torch.randint(-32767, 32768, (rows, inner), generator=generator, dtype=torch.int16),
                 "largest": torch.full((rows, inner), 32767, dtype=torch.int16),
                 "most negative": torch.full((rows, inner), -32767, dtype=torch.int16)}
        w = torch.randint(-128, 128, (outputs, inner), generator=generator, dtype=torch.int8)
        w[0] = -128
        for name, x in cases.items():
            scale, weight_scale = torch.rand(rows, 1, generator=generator), torch.rand(1, outputs, generator=generator)
            exact = (x.long() @ w.long().T).float()
            expected = kernel.scale_output(exact, scale, weight_scale, None)
            assert torch.equal(_avx2_product(avx2_op, x, w, scale, weight_scale, None), expected), (rows, name)
            group = inner // 2
            weight_scale = torch.rand(outputs, 2, generator=generator)
            expected = kernel.grouped_linear(x.long(), scale, list(w.long().split(group, dim=1)), weight_scale, None,
                                             lambda a, b: (a @ b.T).float())
            assert torch.equal(_avx2_product(avx2_op, x, w, scale, weight_scale, None, group), expected), (rows, name)
            # inputs per token in groups: a scale per row and group of columns, one per output (Atom's W4A4)
            scale, weight_scale = torch.rand(rows, 2, generator=generator), torch.rand(1, outputs, generator=generator)
            expected = kernel.input_grouped_linear(x.long(), scale, list(w.long().split(group, dim=1)), weight_scale,
                                                   None, lambda a, b: (a @ b.T).float())
            pack = int8_gemv.avx2_gemm_pack(w, weight_scale, 0)
            grouped = int8_gemv.avx2_gemm(avx2_op, x, pack, scale, None, outputs, 0, group)
            assert torch.equal(grouped, expected), (rows, name)


@needs_avx2
def test_the_avx2_op_names_what_is_wrong_with_its_arguments(avx2_op: object) -> None:
    codes, weight = torch.zeros(2, 32, dtype=torch.int8), torch.zeros(20, 32, dtype=torch.int8)
    pack = int8_gemv.avx2_gemm_pack(weight, torch.ones(1, 20), 0)
    with pytest.raises(RuntimeError, match="int8_gemm: the weight packed in panels of 16 outputs"):
        int8_gemv.avx2_gemm(avx2_op, codes[:, :30], pack, torch.ones(2, 1), None, 20)
    with pytest.raises(RuntimeError, match="int8_gemm: an even input width, in even groups dividing it"):
        int8_gemv.avx2_gemm(avx2_op, codes, pack, torch.ones(2, 1), None, 20, 3)
    with pytest.raises(RuntimeError, match="int8_gemm: one bias per output"):
        int8_gemv.avx2_gemm(avx2_op, codes, pack, torch.ones(2, 1), torch.zeros(19), 20)
    with pytest.raises(RuntimeError, match="int8_gemm: input groups of an even size dividing the inputs"):
        int8_gemv.avx2_gemm(avx2_op, codes, pack, torch.ones(2, 3), None, 20, 0, 12)
    with pytest.raises(RuntimeError, match=r"one per row \(per row and input group with input groups\)"):
        int8_gemv.avx2_gemm(avx2_op, codes, pack, torch.ones(2, 1), None, 20, 0, 16)
    with pytest.raises(RuntimeError, match=r"int8_gemm: contiguous int8 or int16 codes \[rows, in\]"):
        int8_gemv.avx2_gemm(avx2_op, codes.int(), pack, torch.ones(2, 1), None, 20)
    only = int8_gemv.avx2_weight_only_pack(weight, torch.ones(20, 1), 0)
    with pytest.raises(RuntimeError, match="weight_only_gemm: one bias per output"):
        int8_gemv.avx2_weight_only(avx2_op, torch.zeros(2, 32), only, torch.zeros(21), 20)


@pytest.fixture(params=["avx2", "vnni"])
def block_codes_op(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> object:
    """An op with `block_codes` (``block_codes.h``, compiled into both): the AVX2 op, or the VNNI decode op."""
    if request.param == "avx2":
        if AVX2_OP_REFUSAL is not None:
            pytest.skip(f"the AVX2 op cannot run here: {AVX2_OP_REFUSAL}")
        return _avx2(monkeypatch)
    refusal = int8_gemv.gemv_refusal(torch.device("cpu"))
    if refusal is not None:
        pytest.skip(f"the decode op does not run here: {refusal}")
    return int8_gemv.gemv_kernel()


@pytest.mark.parametrize("width", [32, 576, 7])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("clip", [1.0, 0.8, (1.0, 0.9, 0.8), (0.9, 0.85, 0.8, 0.75, 0.7)])
def test_the_ops_block_codes_are_torchs_with_a_searched_clip(width: int, asymmetric: bool, clip: object,
                                                             block_codes_op: object) -> None:
    """`block_codes` (either op): per-token 4-bit codes (asymmetric ones shifted by their zero points, or
    symmetric), with a clip ratio or a grid searched per block, the bits of torch's `asymmetric_int8_codes` /
    `int8_codes`: on Gaussian blocks, blocks with one outlier, all-zero blocks, blocks of one sign and values on
    rounding ties."""
    avx2_op = block_codes_op
    generator = torch.Generator().manual_seed(width)
    blocks = torch.randn(300, width, generator=generator)
    blocks[1:40, 0] *= 30  # (an outlier: the grid's ratios differ)
    blocks[40] = 0.0
    blocks[41:60] = blocks[41:60].abs()  # (one sign: the range starts at 0)
    blocks[60:80] = torch.randint(-16, 16, (20, width), generator=generator) * 0.5  # (ties of x / s)
    blocks[80:82] = torch.linspace(-7, 7, width)  # (x / s on every half step at the ratio 1)
    qmin, qmax = (0, 15) if asymmetric else (-8, 7)
    torch_codes = kernel.asymmetric_int8_codes if asymmetric else kernel.int8_codes
    expected_codes, expected_scale = torch_codes(blocks, "token", None, qmin, qmax, clip)
    codes, scale = int8_gemv.block_codes(avx2_op, blocks, qmin, qmax, clip, asymmetric)
    assert codes.dtype == torch.int8 and torch.equal(scale, expected_scale)
    assert torch.equal(codes, expected_codes)
    if clip == (1.0, 0.9, 0.8) and width >= 32:  # (the search chose more than one ratio: a real search)
        ratios = kernel.searched_clip(blocks, "token", clip, not asymmetric, qmin, qmax)
        assert ratios.unique().numel() > 1
    nan = blocks[:3].clone()
    nan[1, width // 2] = float("nan")
    _, scale = int8_gemv.block_codes(avx2_op, nan, qmin, qmax, clip, asymmetric)
    assert torch.isnan(scale[1]).all() and not torch.isnan(scale[[0, 2]]).any()


def test_clip_errors_are_summed_in_one_fixed_order() -> None:
    """`pairwise_row_sums`: the rows' sums (zeros padded to a power of two, halves added), the order the AVX2 op
    repeats; equal to the float64 sum within float32 rounding."""
    def padded_halves(values: torch.Tensor) -> torch.Tensor:  # the reference order, the zeros materialised
        padded = torch.nn.functional.pad(values, (0, (1 << (values.shape[1] - 1).bit_length()) - values.shape[1]))
        while padded.shape[1] > 1:
            padded = padded[:, : padded.shape[1] // 2] + padded[:, padded.shape[1] // 2 :]
        return padded

    values = torch.rand(50, 37, generator=torch.Generator().manual_seed(0))
    sums = pairwise_row_sums(values)
    assert sums.shape == (50, 1)
    assert torch.allclose(sums.double(), values.double().sum(1, keepdim=True), rtol=1e-6)
    assert torch.equal(sums, padded_halves(values))
    assert torch.equal(pairwise_row_sums(values[:, :1]), values[:, :1])
    for width in (2, 3, 32, 33, 576, 1536):
        values = torch.randn(9, width, generator=torch.Generator().manual_seed(width))
        assert torch.equal(pairwise_row_sums(values), padded_halves(values)), width


@needs_avx2
def test_the_avx2_ops_codes_of_a_row_with_a_nan_have_a_nan_scale(avx2_op: object) -> None:
    rows = torch.randn(3, 40)
    rows[1, 37] = float("nan")  # (in the one-by-one tail of 8-value steps)
    codes, scale = int8_gemv.token_codes(avx2_op, rows, 127, -128, 1.0)
    _, expected_scale = kernel.int8_codes(rows, "token", None, -128, 127)
    assert torch.isnan(scale[1]).all() and torch.equal(scale[[0, 2]], expected_scale[[0, 2]])
    assert torch.equal(codes[[0, 2]], kernel.int8_codes(rows[[0, 2]], "token", None, -128, 127)[0])


@needs_avx2
@pytest.mark.parametrize("scheme", [*W8A8_SCHEMES[:4], "w_int4_per_group_sym_a_int8_per_token_dynamic",
                                    "w_int4_per_channel_sym_a_int4_per_token_dynamic",
                                    "w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic", W4A4_ASYM_WGROUPS])
@pytest.mark.parametrize("rows", [1, 3, 300])
def test_without_vnni_or_amx_the_avx2_op_multiplies_with_the_simulations_bits(
        scheme: str, rows: int, avx2_op: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AVX2 op multiplies the int8 codes at every row count, packed in its panels once (no float32 copy of the
    weight), in one call; the same bits as the simulation. A decode step's few rows of symmetric per-token or static
    inputs take their codes in the same call (``token_linear``, ``static_linear``)."""
    calls: list[str] = []
    original = int8_gemv.call_op
    def counted(op: object, name: str, *args: object) -> object:
        calls.append(name if op is avx2_op else "")
        return original(op, name, *args)
    monkeypatch.setattr(int8_gemv, "call_op", counted)
    monkeypatch.setattr(torch, "_int_mm", lambda *args: pytest.fail("torch._int_mm called"))
    layer = _layer(scheme, bias=True, group_size=32)
    fresh = copy.deepcopy(layer)  # (the simulation below makes the float32 codes: not this one's)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3
    simulated, integer = _outputs(layer, x)
    assert torch.equal(simulated, integer)
    one_call = {"static": "static_linear", "per_token_dynamic": "token_linear"}  # (symmetric inputs)
    name = next((op for kind, op in one_call.items() if kind in scheme and "_a_int" in scheme and "group" not in scheme
                 and rows <= int8_gemv.GEMV_MAX_ROWS), None)
    assert calls == [name] if name else calls.count("int8_gemm") == 1 and "" not in calls
    set_runtime(fresh, "int8")
    assert torch.equal(fresh(x), integer)
    weight = fresh._int8_weight()
    assert isinstance(weight, kernel.Avx2Weight)
    fresh(x)
    assert fresh._int8_weight() is weight  # (packed once; a 4-bit weight not kept unpacked beside its panels)
    caches = fresh.runtime_caches()  # (a static scheme's calibration left its dequantized weight too)
    assert all(any(t is c for c in caches) for t in weight.tensors())
    assert fresh._integer_codes is None and fresh._float_codes is None
    if "group" not in scheme:
        assert layer._decode_rows and isinstance(layer._decode_rows.weight, kernel.Avx2Weight)


def test_the_avx2_op_refuses_where_it_does_not_belong(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    feign_cpu(monkeypatch, vnni=True)
    assert int8_gemv.avx2_gemv_refusal(cpu).startswith("the CPU has VNNI or AMX int8 instructions")
    assert int8_gemv.avx2_kernel(torch.empty(0)) is None
    assert int8_gemv.avx2_gemv_refusal(torch.device("meta")) == "not on the CPU"
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    assert int8_gemv.avx2_gemv_refusal(cpu) == "off (LLMQUANT_GEMV=0)"
    monkeypatch.setenv("LLMQUANT_GEMV", "1")
    feign_cpu(monkeypatch, vnni=False, amx=False, avx2=False)
    assert int8_gemv.avx2_gemv_refusal(cpu) == "the CPU has no AVX2 instructions"


@pytest.mark.parametrize("scheme", ["w_int4_per_group_sym_a_int8_per_token_dynamic",
                                    "w_int4_per_channel_sym_a_int4_per_token_dynamic"])
@pytest.mark.parametrize("rows", [1, 300])
@pytest.mark.parametrize("gemv", ["1", "0"])  # (one row: the decode op, one call for the 3 groups, where it runs)
def test_w4a8_and_w4a4_run_as_integer_products_with_the_simulations_bits(scheme: str, rows: int, gemv: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQUANT_GEMV", gemv)
    spec = scheme_from_name(scheme, 32, None)
    linear = torch.nn.Linear(96, 80, bias=True)
    layer = QuantLinear.from_linear(linear, spec.weights, spec.input_activations)
    assert layer.packed and layer.supports_int8
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3
    simulated, integer = _outputs(layer, x)
    assert torch.equal(simulated, integer)
    op_runs = gemv == "1" and int8_gemv.gemv_refusal(torch.device("cpu")) is None
    avx2_runs = gemv == "1" and int8_gemv.avx2_gemv_refusal(torch.device("cpu")) is None  # (every row count, packed)
    assert isinstance(layer._int8_weight(), kernel.Avx2Weight) == avx2_runs
    if "group" in scheme:  # every row count on the op's grouped_gemm, the weight kept packed only
        assert isinstance(layer._int8_weight(), kernel.GroupedWeight) == op_runs
        fresh = QuantLinear.from_linear(linear, spec.weights, spec.input_activations)
        set_runtime(fresh, "int8")
        assert torch.equal(fresh(x), integer)
        packed_only = op_runs or avx2_runs  # (either op keeps its packed copy only, not the codes too)
        assert (fresh._integer_codes is None) == packed_only
        if packed_only:
            assert fresh.runtime_caches() == fresh._int8_weight().tensors()
    elif not avx2_runs:
        assert (layer._int8_weight().row_sums is not None) == (op_runs and rows == 1)
    # what a grouped integer kernel computes, in float64: s_x * sum_g s_w,g * (x_q,g . w_q,g) + b
    qmax = spec.input_activations.qmax
    scale = x.abs().amax(-1, keepdim=True).double() / qmax
    codes = torch.round(x.double() / scale.float().double())
    expected = grouped_reference(codes, scale, layer)
    assert torch.allclose(integer.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("scheme", ["w_int4_per_group_sym_a_int8_per_token_dynamic",
                                    "w_int4_per_channel_sym_a_int4_per_token_dynamic", W4A4_ASYM,
                                    "w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic", W4A4_ASYM_WGROUPS])
def test_w4a8_and_w4a4_checkpoints_load_back_and_gptq_reconstructs_better_than_rtn(scheme: str, calib_ids: torch.Tensor,
                                                                 eval_ids: torch.Tensor, tmp_path) -> None:

    float_model = make_model("llama")
    seen: list[torch.Tensor] = []  # q_proj's input in layer 0 on the calibration ids: what GPTQ fits
    name = "model.layers.0.self_attn.q_proj"
    handle = float_model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    logits(float_model, calib_ids)
    handle.remove()
    x = torch.cat(seen).reshape(-1, 64)
    reference = x @ float_model.get_submodule(name).weight.T
    errors = {}
    for algo in ("rtn", "gptq"):
        model = llmquant.quantize(make_model("llama"), {"scheme": scheme, "group_size": 16, "algorithm": algo},
                                  calib=calib_ids, progress=False)
        errors[algo] = relative_error(reference, x @ model.get_submodule(name).dequantized_weight().T)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")  # the int8 runtime
    set_runtime(model, "int8")
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))
    assert errors["gptq"] < errors["rtn"], errors


@pytest.mark.parametrize("scheme", [W4A4_ASYM, W4A4_ASYM_WGROUPS])
@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize("gemv", ["1", "0"])
@pytest.mark.parametrize("clip", [1.0, 0.8, (0.9, 0.85, 0.8, 0.75, 0.7)])
def test_asymmetric_4bit_inputs_run_as_integer_products_with_the_simulations_bits(
        scheme: str, rows: int, gemv: str, clip: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """W4A4 with asymmetric inputs: each token's codes shifted by its zero point, c = q - z in [-15, 15], multiply
    as int8 (a weight per channel: a few rows on the decode op, where it runs, its `block_codes` making the codes);
    c * s is `fake_quantize`'s value bit for bit, so the simulation, the int8 runtime and s_x * sum_g s_w,g * (c_g .
    w_q,g) + b in float64 agree (the weight per channel, or in groups of 32: one product per group)."""
    monkeypatch.setenv("LLMQUANT_GEMV", gemv)
    layer = _layer(scheme, bias=True, group_size=32)
    searched = {"clip_grid": clip} if isinstance(clip, tuple) else {"clip_ratio": clip}  # (a grid: chosen per token)
    layer.set_input_spec(layer.input_spec.model_copy(update=searched))
    assert layer.supports_int8 and not layer.input_spec.symmetric and layer.input_spec.qmax == 15
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3 + 1.5  # (skewed: min != -max)
    simulated, integer = _outputs(layer, x)
    assert torch.equal(simulated, integer)
    decode_op_runs = gemv == "1" and (GEMV_REFUSAL is None or AVX2_OP_REFUSAL is None)  # (the VNNI op, or AVX2's)
    assert (layer._decode_rows is not False) == (decode_op_runs and scheme == W4A4_ASYM)
    codes, scale = kernel.asymmetric_input_codes(x, "token", None, 0, 15, clip)
    assert torch.equal(codes * scale, fake_quantize(x, layer.input_spec))
    assert codes.abs().max() <= 15 and torch.equal(codes, codes.round())
    expected = grouped_reference(codes, scale, layer)
    assert torch.allclose(integer.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize("gemv", ["1", "0"])
def test_symmetric_4bit_inputs_with_a_searched_clip_give_the_simulations_bits(rows: int, gemv: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """W4A4 per token with each token's clip ratio searched at run time (`QuantSpec.clip_grid`): an op's
    `block_codes` where one runs (decode rows and prefills), torch's operations elsewhere; the simulation's bits."""
    monkeypatch.setenv("LLMQUANT_GEMV", gemv)
    layer = _layer("w_int4_per_channel_sym_a_int4_per_token_dynamic", bias=True)
    layer.set_input_spec(layer.input_spec.model_copy(update={"clip_grid": (1.0, 0.9, 0.8)}))
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3
    x[:, 5] *= 20  # (an outlier channel: the ratios chosen differ from token to token)
    simulated, integer = _outputs(layer, x)
    assert torch.equal(simulated, integer)


def test_asymmetric_4bit_inputs_err_less_than_symmetric_ones() -> None:
    """16 levels over [min, max] against 15 over [-absmax, absmax]: on skewed inputs (a SiLU's outputs) and on
    symmetric ones (Gaussian, as after a Hadamard rotation) the asymmetric codes' squared error is lower."""
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(256, 576, generator=generator)
    for x, most in ((gaussian, 0.85), (torch.nn.functional.silu(gaussian * 2), 0.5)):
        errors = {}
        for scheme in ("w_int4_per_channel_sym_a_int4_per_token_dynamic", W4A4_ASYM):
            spec = scheme_from_name(scheme).input_activations
            errors[scheme] = float((fake_quantize(x, spec) - x).pow(2).mean())
        assert errors[W4A4_ASYM] < most * errors["w_int4_per_channel_sym_a_int4_per_token_dynamic"], errors


needs_onednn = pytest.mark.skipif(kernel.onednn_refusal(torch.device("cpu")) is not None,
                                  reason=f"oneDNN's int8 product does not run here: "
                                         f"{kernel.onednn_refusal(torch.device('cpu'))}")


@needs_onednn
@pytest.mark.parametrize(("rows", "inner", "outputs"), [(1, 8192, 16), (5, 4096, 64), (300, 1536, 80), (1, 576, 192)])
def test_onednns_product_is_the_exact_integer_product(rows: int, inner: int, outputs: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    cases = {"random": (torch.randint(-128, 128, (rows, inner), generator=generator, dtype=torch.int8),
                        torch.randint(-128, 128, (outputs, inner), generator=generator, dtype=torch.int8)),
             "largest": (torch.full((rows, inner), 127, dtype=torch.int8), torch.full((outputs, inner), 127,
                                                                                     dtype=torch.int8)),
             "most negative": (torch.full((rows, inner), -128, dtype=torch.int8),
                               torch.full((outputs, inner), 127, dtype=torch.int8))}
    for name, (x, w) in cases.items():
        exact = (x.long() @ w.long().T).float()  # (beyond 2^24, rounded once, as a promotion of int32 rounds)
        product = kernel.onednn_product(x, kernel.Int8Weight(w, True))
        assert product.dtype == torch.float32 and torch.equal(product, exact), name
        assert torch.equal(kernel.int8_matmul(x, w).float(), exact), name


def test_without_amx_onednn_is_refused_and_int_mm_multiplies(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU with VNNI but no AMX (an AMD EPYC with AVX512-VNNI): oneDNN would take its reference kernel, so the
    prefill's products are ``torch._int_mm``'s, with no oneDNN copy of the weights; the same bits."""
    if not int8_gemv.cpu_features().int8_instructions:
        pytest.skip("the CPU has no VNNI or AMX: the AVX2 op's or float32 products (tests above)")
    feign_cpu(monkeypatch, amx=False)
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    assert "no AMX" in kernel.onednn_refusal(torch.device("cpu"))
    monkeypatch.setattr(kernel, "onednn_product", lambda *args: pytest.fail("oneDNN's product called"))
    layer = _layer("w_int8_per_channel_a_int8_per_token_dynamic", bias=True)
    x = torch.randn(kernel.ONEDNN_MIN_ROWS + 1, 96)
    simulated, integer = _outputs(layer, x)
    assert torch.equal(simulated, integer) and not any(t.is_mkldnn for t in layer.runtime_caches())


@needs_onednn
def test_onednn_runs_from_its_row_count_and_is_packed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = kernel.Int8Weight(torch.randint(-127, 128, (80, 96), dtype=torch.int8), True)
    assert kernel.int8_product(torch.ones(1, 96, dtype=torch.int8), weight).dtype == torch.int32  # _int_mm
    assert weight.packed is None  # (nothing packed for a shape that does not use it)
    rows = kernel.ONEDNN_MIN_ROWS
    assert kernel.int8_product(torch.ones(rows, 96, dtype=torch.int8), weight).dtype == torch.float32  # oneDNN
    packed = weight.packed
    assert packed is not None
    kernel.int8_product(torch.ones(rows, 96, dtype=torch.int8), weight)
    assert weight.packed is packed
    monkeypatch.setattr(kernel, "ONEDNN_MIN_ROWS", 1)
    assert kernel.int8_product(torch.ones(1, 96, dtype=torch.int8), weight).dtype == torch.float32
    monkeypatch.setattr(kernel, "ONEDNN_MIN_ROWS", 128)
    layer = _layer("w_int8_per_channel_a_int8_per_token_dynamic", bias=False)
    set_runtime(layer, "int8")
    layer(torch.randn(rows, 96))
    assert [t.is_mkldnn for t in layer.runtime_caches()] == [True]  # oneDNN's copy: a runtime cache
    monkeypatch.setenv("LLMQUANT_ONEDNN", "0")
    layer.drop_caches()
    layer(torch.randn(rows, 96))
    assert layer.runtime_caches() == []  # _int_mm multiplies the stored codes


@needs_gemv
@pytest.mark.parametrize(("inner", "outputs"), [(576, 192), (96, 80), (300, 7), (8192, 16), (64, 1)])
def test_the_decode_ops_product_is_exact_and_its_codes_and_scaling_are_torchs(inner: int, outputs: int) -> None:
    decode_op = int8_gemv.gemv_kernel()
    assert decode_op is not None, int8_gemv.gemv_refusal(torch.device("cpu"))  # (tools present: it must build)
    generator = torch.Generator().manual_seed(inner)
    unit = torch.ones(1, 1)
    for rows in (1, 2, 5, 16, 100):  # (100: a prefill's rows, quantized in parallel blocks by the op)
        for name, (x, w) in _code_cases(rows, inner, outputs, generator).items():
            exact = (x.long() @ w.long().T).float()  # (beyond 2^24, rounded once, as a promotion of int32 rounds)
            product = int8_gemv.gemv_linear(decode_op, x, w, int8_gemv.weight_row_sums(w), unit, unit, None)
            assert product.dtype == torch.float32 and torch.equal(product, exact), (rows, name)
        values = torch.randn(rows, inner, generator=generator) * torch.rand(rows, 1, generator=generator) * 10
        values[0] = values[0].clamp(-100, 100)
        values[0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: ties, rounded to even (0, 2, -2)
        for rows_in in (values, torch.zeros(rows, inner)):
            for qmin, qmax in ((-128, 127), (-8, 7)):  # (W8A8, W4A4)
                for clip in (1.0, 0.95, 0.8, 0.3):  # (clipped: scale from clip * absmax, codes clamped to qmin..qmax)
                    codes, scale = int8_gemv.token_codes(decode_op, rows_in, qmax, qmin, clip)
                    expected_codes, expected_scale = kernel.int8_codes(rows_in, "token", None, qmin, qmax, clip)
                    assert torch.equal(codes, expected_codes) and torch.equal(scale, expected_scale), (qmax, clip)
                    codes, scale = int8_gemv.tensor_codes(decode_op, rows_in, qmax, qmin, clip)  # (one absmax)
                    expected_codes, expected_scale = kernel.int8_codes(rows_in, "tensor", None, qmin, qmax, clip)
                    assert torch.equal(codes, expected_codes) and torch.equal(scale, expected_scale), (qmax, clip)
                for static in (torch.ones(1, 1), torch.full((1, 1), 0.37), torch.full((1, 1), 0.05)):  # (clamped)
                    codes = int8_gemv.static_codes(decode_op, rows_in, static, qmin, qmax)
                    expected_codes, _ = kernel.int8_codes(rows_in, None, static, qmin, qmax)
                    assert torch.equal(codes, expected_codes), (rows, qmax, static.item())
        product = (torch.randint(-128, 128, (rows, inner), generator=generator).float()
                   @ torch.randint(-128, 128, (inner, outputs), generator=generator).float())
        scales = ((torch.rand(rows, 1), torch.rand(1, outputs)), (torch.rand(1, 1), torch.rand(1, 1)))
        integer = product.to(torch.int32)
        integer[0, 0] = 2**24 + 3  # (beyond float32's integers: rounded by the conversion as by torch's promotion)
        for scale, weight_scale in scales:
            for bias in (None, torch.randn(outputs)):
                for found in (product, integer):  # oneDNN's float32 product, torch._int_mm's int32 one
                    expected = kernel.scale_output(found.clone(), scale, weight_scale, bias)
                    scaled = int8_gemv.scale_product(decode_op, found.clone(), scale, weight_scale, bias)
                    assert scaled.dtype == torch.float32 and torch.equal(scaled, expected), (rows, bias is None)


@needs_gemv
def test_the_decode_op_runs_up_to_its_row_count_and_keeps_its_row_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer("w_int8_per_channel_a_int8_per_token_dynamic", bias=True)
    set_runtime(layer, "int8")
    x = torch.randn(int8_gemv.GEMV_MAX_ROWS + 1, 96)
    layer(x)
    assert layer.runtime_caches() == []  # torch._int_mm beyond the row count
    layer(x[:int8_gemv.GEMV_MAX_ROWS])
    sums = layer._int8_weight().row_sums
    assert sums is not None and torch.equal(sums, layer.weight.sum(1, dtype=torch.int32, keepdim=True))
    assert [t is sums for t in layer.runtime_caches()] == [True]
    layer(x[:1])
    assert layer._int8_weight().row_sums is sums  # made once
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    assert int8_gemv.gemv_refusal(torch.device("cpu")) == "off (LLMQUANT_GEMV=0)"
    layer.drop_caches()
    layer(x[:1])
    assert layer.runtime_caches() == []


def _decode_logits(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(ids, use_cache=True)
        seen = [out.logits]
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, **{cache_argument(model): returned_cache(out)}, use_cache=True)
            seen.append(out.logits)
    return seen


# (clipped inputs: the op's codes clamp them too)
@pytest.mark.parametrize(("inputs", "clip"), [("token", None), ("token", 0.9), ("static", None)])
@pytest.mark.parametrize("gemv", ["1", "0", pytest.param("avx2", marks=needs_avx2)])  # (avx2: VNNI and AMX feigned off)
def test_decode_steps_on_the_int8_runtime_give_the_simulations_logits(gemv: str, inputs: str, clip: float | None,
                                                                      calib_ids: torch.Tensor,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if gemv == "avx2":
        feign_no_int8_instructions(monkeypatch)
    monkeypatch.setenv("LLMQUANT_GEMV", "0" if gemv == "0" else "1")
    scheme = {"token": "w_int8_per_channel_a_int8_per_token_dynamic",
              "static": "w_int8_per_channel_a_int8_per_tensor_static"}[inputs]
    recipe = {"scheme": scheme, "activation_clip": clip}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    prompt = calib_ids[:2, :12]
    set_runtime(model, "fake")
    simulated = _decode_logits(model, prompt, 4)
    set_runtime(model, "int8")
    calls = _counting_codes(monkeypatch)
    op_calls: list[str] = []
    call_op = int8_gemv.call_op
    monkeypatch.setattr(int8_gemv, "call_op", lambda op, name, *args: op_calls.append(name) or call_op(op, name, *args))
    integer = _decode_logits(model, prompt, 4)
    assert all(torch.equal(a, b) for a, b in zip(simulated, integer, strict=True))
    layers = model.config.num_hidden_layers
    uses_avx2 = gemv != "0" and int8_gemv.avx2_gemv_refusal(torch.device("cpu")) is None
    # per token q/k/v once, o, gate/up once, down (static: each Linear under its own scale), for the prompt and 4
    # steps; where the AVX2 op runs, a step's 2 rows take their codes in the product's call (`avx2_token_linear`,
    # `avx2_static_linear`), each Linear's own
    codes = 4 if inputs == "token" else 7
    assert len(calls) == codes * layers * (1 if uses_avx2 else 5)
    assert op_calls.count(f"{inputs}_linear") == (7 * layers * 4 if uses_avx2 else 0)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    uses_gemv = gemv == "1" and int8_gemv.gemv_refusal(torch.device("cpu")) is None
    assert (getattr(layer._int8_weight(), "row_sums", None) is not None) == uses_gemv
    assert bool(layer._decode_rows and isinstance(layer._decode_rows.weight, kernel.Avx2Weight)) == uses_avx2


def test_without_a_compiler_the_decode_op_is_refused_once_and_torch_multiplies(monkeypatch: pytest.MonkeyPatch,
                                                                              caplog: pytest.LogCaptureFixture
                                                                              ) -> None:
    monkeypatch.setattr(int8_gemv, "_kernel", None)
    monkeypatch.setattr(int8_gemv, "_build_error", None)
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert int8_gemv.gemv_kernel() is None
    reason = "no C++ compiler (no-such-compiler) to build it"
    if int8_gemv.gemv_refusal(torch.device("cpu")) not in (reason, "the CPU has no AVX512-VNNI instructions"):
        pytest.fail(int8_gemv.gemv_refusal(torch.device("cpu")))
    layer = _layer("w_int8_per_channel_a_int8_per_token_dynamic", bias=True)
    simulated, integer = _outputs(layer, torch.randn(1, 96))
    assert torch.equal(simulated, integer) and getattr(layer._int8_weight(), "row_sums", None) is None  # (no op)

    def failing(**_kwargs: object) -> object:
        raise RuntimeError("Error building extension 'llmquant_int8_gemv'")

    from torch.utils import cpp_extension
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(int8_gemv, "_build_error", None)
    monkeypatch.setattr(int8_gemv, "tool_refusal", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", failing)
    assert int8_gemv.gemv_kernel() is None
    assert int8_gemv._build_error == ("building int8_gemv.cpp failed (RuntimeError: Error building extension "
                                      "'llmquant_int8_gemv')")
    assert "torch._int_mm runs instead" in caplog.text


@pytest.mark.skipif(not int8_gemv.cpu_features().avx2, reason="no AVX2 here")
def test_where_the_avx2_op_cannot_be_built_the_codes_multiply_as_float32(monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """No compiler, or a failed build (logged once, kept as the reason): the float32 product of the codes, the
    simulation's bits."""
    feign_no_int8_instructions(monkeypatch)
    monkeypatch.setenv("LLMQUANT_GEMV", "1")
    monkeypatch.setattr(int8_gemv, "_avx2_kernel", None)
    monkeypatch.setattr(int8_gemv, "_avx2_build_error", None)
    monkeypatch.setenv("CXX", "no-such-compiler")
    cpu = torch.device("cpu")
    assert int8_gemv.avx2_kernel(torch.empty(0)) is None
    assert int8_gemv.avx2_gemv_refusal(cpu) == "no C++ compiler (no-such-compiler) to build it"

    def failing(**_kwargs: object) -> object:
        raise RuntimeError("Error building extension 'llmquant_int8_gemv_avx2'")

    from torch.utils import cpp_extension
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(int8_gemv, "tool_refusal", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", failing)
    assert int8_gemv.avx2_kernel(torch.empty(0)) is None
    assert int8_gemv.avx2_gemv_refusal(cpu) == ("building int8_gemv_avx2.cpp failed (RuntimeError: Error building "
                                                "extension 'llmquant_int8_gemv_avx2')")
    assert "the float32 product of the codes runs instead" in caplog.text
    layer = _layer("w_int8_per_channel_a_int8_per_token_dynamic", bias=True)
    fresh = copy.deepcopy(layer)
    x = torch.randn(3, 96)
    simulated, integer = _outputs(layer, x)
    set_runtime(fresh, "int8")
    assert torch.equal(simulated, integer) and torch.equal(fresh(x), integer)
    weight = fresh._int8_weight()
    assert isinstance(weight, kernel.Int8Weight) and weight.float_codes is not None


def _counting_codes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the input quantizations: torch's (`int8_codes`) and the decode op's (`token_codes`, `static_codes`,
    where it runs)."""
    calls: list[int] = []
    for name in ("int8_codes", "token_codes", "static_codes"):
        quantize = getattr(kernel, name)

        def counted(*args: object, quantize=quantize) -> object:
            calls.append(1)
            return quantize(*args)

        monkeypatch.setattr(kernel, name, counted)
    return calls


@pytest.mark.parametrize("op", [pytest.param("vnni", marks=needs_gemv), pytest.param("avx2", marks=needs_avx2)])
@pytest.mark.parametrize("scheme", ["w_int8_per_channel_a_int8_per_token_dynamic",
                                    "w_int8_per_tensor_a_int8_per_tensor_static"])
def test_decode_rows_keep_the_inputs_shape_and_the_simulations_bits(scheme: str, op: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to 4 rows of a W8A8 layer go through its `DecodeRows` (the op's codes and product, no reshape; on the AVX2
    op both in one call) with the simulation's bits, for inputs of any leading shape and non-contiguous
    ones, bfloat16 ones (as float32 copies), and after a new clip ratio (resolved again); 5 rows take
    `int8_linear`'s path (on the AVX2 op: `DecodeRows` at every row count), with the same bits."""
    if op == "avx2":
        _avx2(monkeypatch)
    layer = _layer(scheme, bias=True)
    shapes: list[tuple[int, ...]] = []
    original = kernel.DecodeRows.__call__
    monkeypatch.setattr(kernel.DecodeRows, "__call__",
                        lambda self, x, *source: shapes.append(tuple(x.shape)) or original(self, x, *source))
    generator = torch.Generator().manual_seed(5)
    inputs = [torch.randn(*shape, generator=generator) for shape in ((1, 1, 96), (2, 1, 96), (4, 96), (1, 2, 2, 96))]
    inputs.append(torch.randn(96, 3, generator=generator).t())  # [3, 96], not contiguous
    inputs.append(torch.randn(2, 96, generator=generator).bfloat16())
    with torch.no_grad():
        for x in inputs:
            simulated, integer = _outputs(layer, x)
            assert integer.shape == (*x.shape[:-1], 80) and integer.dtype == x.dtype
            assert torch.equal(simulated, integer)
        assert shapes == [tuple(x.shape) for x in inputs]
        every_row_count = int(op == "avx2")
        simulated, integer = _outputs(layer, torch.randn(5, 96, generator=generator))
        assert torch.equal(simulated, integer) and len(shapes) == len(inputs) + every_row_count
        if layer.input_spec.dynamic:
            assert set_input_clip(layer, 0.5) == 1 and layer._decode_rows is None
            simulated, integer = _outputs(layer, inputs[0] * 3)
            assert torch.equal(simulated, integer) and len(shapes) == len(inputs) + 1 + every_row_count
            assert layer._decode_rows.arguments[4] == 0.5


def test_linears_reading_one_tensor_quantize_it_once_per_forward(monkeypatch: pytest.MonkeyPatch,
                                                                 calib_ids: torch.Tensor,
                                                                 eval_ids: torch.Tensor) -> None:

    model = llmquant.quantize(make_model("llama"), "w_int8_per_channel_a_int8_per_token_dynamic", calib=calib_ids,
                              progress=False)
    set_runtime(model, "int8")
    calls = _counting_codes(monkeypatch)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        shared = model(eval_ids, use_cache=False).logits
    assert len(calls) == 4 * layers  # q/k/v once, o, gate/up once, down
    calls.clear()
    with torch.inference_mode():  # no version counter: nothing kept, every Linear quantizes
        alone = model(eval_ids, use_cache=False).logits
    assert len(calls) == 7 * layers and torch.equal(shared, alone)
    set_runtime(model, "fake")
    with torch.no_grad():
        assert torch.equal(model(eval_ids, use_cache=False).logits, shared)  # the simulation shares its codes too


@pytest.mark.parametrize("numbers", ["int8", "fp8"])
def test_shared_codes_follow_in_place_changes_and_the_quantizer(numbers: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linears reading one tensor (q/k/v, gate/up) quantize it once: the integer runtime's codes
    (`shared_input_codes`) and, for FP8 on a CPU, the simulation's values (`shared_fake_quantize`); the same outputs
    as each quantizing alone. Another quantizer (a clip ratio, a static scale) or an in-place change of the tensor
    quantizes again, and so does a tensor made under inference mode (no version counter)."""
    token, static = {"int8": ("w_int8_per_channel_a_int8_per_token_dynamic",
                              "w_int8_per_channel_a_int8_per_tensor_static"),
                     "fp8": ("w_fp8_per_channel_a_fp8_per_token_dynamic",
                             "w_fp8_per_tensor_a_fp8_per_tensor_static")}[numbers]
    first = _layer(token, bias=False)
    second = _layer(token, bias=True)
    clipped = _layer(token, bias=True)
    clipped.input_spec = clipped.input_spec.model_copy(update={"clip_ratio": 0.5})
    static = _layer(static, bias=True)
    for layer in (first, second, clipped, static):
        set_runtime(layer, "int8")  # (FP8 keeps the simulation on a CPU)
    calls = _counting_codes(monkeypatch) if numbers == "int8" else _counting_fake_quantize(monkeypatch)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = {name: layer(x.clone()) for name, layer in
                    (("second", second), ("clipped", clipped), ("static", static))}
        doubled = second(x.clone() * 2)
        calls.clear()
        first(x)
        assert torch.equal(second(x), expected["second"]) and len(calls) == 1  # shared
        assert torch.equal(clipped(x), expected["clipped"]) and len(calls) == 2  # another quantizer
        assert torch.equal(static(x), expected["static"]) and len(calls) == 3
        first(x)
        x.mul_(2)  # changed in place: quantized again
        assert torch.equal(second(x), doubled) and len(calls) == 5
    with torch.inference_mode():
        y = x.clone()
        first(y), second(y)
    assert len(calls) == 7


def _counting_fake_quantize(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the simulation's input quantizations (`simulated`: the E4M3 op or `fake_quantize`, as
    `llmquant.nn.quant_linear` calls it)."""
    import llmquant.nn.quant_linear as quant_linear

    calls: list[int] = []
    quantize = quant_linear.simulated
    monkeypatch.setattr(quant_linear, "simulated", lambda *args: calls.append(1) or quantize(*args))
    return calls


@pytest.mark.parametrize("rows", [1, 300])
def test_groups_the_grouped_gemm_cannot_take_keep_the_per_group_products(rows: int) -> None:
    """W4A8 in groups of 6 columns (not a multiple of 4: `grouped_gemm_refusal` says so) keeps its codes and the
    per-group path (the op's per-row product, or one torch._int_mm per group; on an AVX2 CPU the AVX2 op, which
    takes even groups), with the simulation's bits."""
    assert kernel.grouped_gemm_refusal(torch.device("cpu"), 96, 6) == (
        "groups of 6 columns (it takes multiples of 4 dividing the input)")
    spec = scheme_from_name("w_int4_per_group_sym_a_int8_per_token_dynamic", 6, None)
    layer = QuantLinear.from_linear(torch.nn.Linear(96, 80), spec.weights, spec.input_activations)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3
    simulated, integer = _outputs(layer, x)
    assert torch.equal(simulated, integer) and not isinstance(layer._int8_weight(), kernel.GroupedWeight)


@needs_gemv
@pytest.mark.parametrize(("rows", "outputs", "inner", "group"),
                         [(1, 80, 96, 32), (5, 80, 96, 32), (300, 80, 96, 32), (13, 17, 128, 64), (7, 33, 64, 4),
                          (64, 1536, 576, 64)])
def test_the_grouped_gemm_gives_the_simulations_bits(rows: int, outputs: int, inner: int, group: int) -> None:
    """The op's grouped_gemm (VPDPBUSD blocks of 6 rows by 32 outputs, the weight packed once) returns
    `grouped_linear`'s bits: 4-bit and full-range int8 codes (-128 included), per-row and per-tensor input scales,
    with and without a bias, outputs not a multiple of 16 and row counts not a multiple of 6."""
    op = int8_gemv.gemv_kernel()
    generator = torch.Generator().manual_seed(rows + outputs)
    x = torch.randint(-128, 128, (rows, inner), dtype=torch.int8, generator=generator)
    weight_scale, bias = torch.rand(outputs, inner // group, generator=generator), torch.randn(outputs,
                                                                                               generator=generator)
    for low, high in ((-8, 8), (-128, 128)):
        weight = torch.randint(low, high, (outputs, inner), dtype=torch.int8, generator=generator)
        pack = int8_gemv.grouped_pack(weight, weight_scale, group)
        groups = [part.contiguous() for part in weight.float().split(group, dim=1)]
        for scale in (torch.rand(rows, 1, generator=generator), torch.rand(1, 1, generator=generator)):
            for b in (None, bias):
                y = int8_gemv.grouped_gemm(op, x, pack, scale, b, outputs, group)
                assert torch.equal(y, kernel.grouped_linear(x.float(), scale, groups, weight_scale, b,
                                                            kernel.float_product))


@pytest.mark.parametrize("op", [pytest.param("vnni", marks=needs_gemv), pytest.param("avx2", marks=needs_avx2)])
@pytest.mark.parametrize(("rows", "inner", "outputs", "group"),
                         [(1, 576, 4099, 0), (3, 70, 13, 0), (4, 1536, 9, 0), (1, 576, 4099, 32), (3, 96, 13, 48),
                          (8, 1536, 17, 128)])
def test_the_weight_only_op_is_the_float_product_within_float32_roundings(rows: int, inner: int, outputs: int,
                                                                        group: int, op: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """(x @ W_q^T) * s_w + b from the int8 codes (one scale per output, or per output and group of ``group`` columns)
    agrees with float64 arithmetic as closely as float32 x @ dequantized(W_q)^T + b does (within 4x of the larger
    error of torch's product and of the sum taken term by term in order: torch's alone is as lucky as its CPU's
    kernel, 4x its error too tight for the AVX2 op on an AMX Xeon, 7.7e-5 against 6.5e-5), for inner sizes with a
    tail of 16 and outputs not a multiple of 8 (or 16), by the decode op and by the AVX2 op (its codes packed in
    panels)."""
    generator = torch.Generator().manual_seed(outputs + group)
    weight = torch.randn(outputs, inner, generator=generator)
    grouped = weight.reshape(outputs, -1, group or inner)
    scale = grouped.abs().amax(-1) / 127  # [out, groups]
    codes = torch.round(grouped / scale[..., None]).to(torch.int8).reshape(outputs, inner)
    x, bias = torch.randn(rows, inner, generator=generator), torch.randn(outputs, generator=generator)
    if op == "vnni":
        y = int8_gemv.weight_only_linear(int8_gemv.gemv_kernel(), x, codes, scale, bias, group)
    else:
        pack = int8_gemv.avx2_weight_only_pack(codes, scale, group)
        y = int8_gemv.avx2_weight_only(_avx2(monkeypatch), x, pack, bias, outputs, group)
    dequantized = (codes.reshape(outputs, -1, group or inner).double() * scale.double()[..., None]).reshape(outputs, -1)
    exact = x.double() @ dequantized.T + bias.double()
    simulated = x @ dequantized.float().T + bias
    in_order = torch.zeros(rows, outputs)
    for column in range(inner):
        in_order += x[:, column, None] * dequantized.float()[None, :, column]
    assert y.shape == (rows, outputs) and y.dtype == torch.float32
    errors = [(float32.double() - exact).abs().max().item() for float32 in (simulated, in_order + bias)]
    bound = 4 * max(*errors, 1e-7 * exact.abs().max().item())
    assert (y.double() - exact).abs().max().item() <= bound


W8A16_HEAD = {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "ignore": [],
              "overrides": [{"targets": ["lm_head"], "scheme": "w_int8_per_channel"}]}
W8A16_G32_HEAD = {**W8A16_HEAD, "overrides": [{"targets": ["lm_head"], "scheme": "w_int8_per_group_sym",
                                               "group_size": 32}]}


@pytest.mark.parametrize("op", [pytest.param("vnni", marks=needs_gemv), pytest.param("avx2", marks=needs_avx2)])
@pytest.mark.parametrize("recipe", [W8A16_HEAD, W8A16_G32_HEAD], ids=["per_channel", "group_32"])
def test_a_weight_only_int8_head_runs_its_decode_rows_on_the_op(recipe: dict, op: str, calib_ids: torch.Tensor,
                                                                eval_ids: torch.Tensor,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A head quantized weight-only to int8 (W8A16, by an override; per channel, or in groups of 32 columns) switches
    to the int8 runtime; its decode steps run on the op (counted; the decode op, or the AVX2 op where VNNI and AMX
    are absent, feigned) with the simulation's tokens and logits within float32 roundings; a forward of many rows
    keeps the simulation (the same logits)."""
    if op == "avx2":
        _avx2(monkeypatch)
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.supports_weight_only_int8
    assert model.lm_head.weight_scale.shape[1] == (1 if recipe is W8A16_HEAD else model.lm_head.in_features // 32)
    with torch.no_grad():
        simulated_logits = model(eval_ids, use_cache=False).logits
    simulated = generate_greedy(model, calib_ids[:1, :12])
    assert set_runtime(model, "int8") == 7 * 2 + 1
    assert model.lm_head.runtime == "int8"
    calls = []
    name = "weight_only_linear" if op == "vnni" else "avx2_weight_only"
    original = getattr(int8_gemv, name)
    monkeypatch.setattr(f"llmquant.nn.quant_linear.{name}", lambda *args: calls.append(1) or original(*args))
    with torch.no_grad():
        assert torch.equal(model(eval_ids, use_cache=False).logits, simulated_logits)  # (many rows: the simulation)
    assert not calls
    stored = generate_greedy(model, calib_ids[:1, :12])
    assert len(calls) == 8  # the prefill's last row and 7 decode steps
    assert torch.equal(stored.sequences, simulated.sequences)
    torch.testing.assert_close(torch.stack(stored.logits), torch.stack(simulated.logits), rtol=0, atol=1e-5)


def generate_greedy(model: torch.nn.Module, prompt: torch.Tensor):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


def test_int8_groups_of_32_store_a_weight_already_on_that_grid_exactly() -> None:
    """A weight that is d * q already (int8 q, |q| <= 127 reaching 127 in every group of 32, d a float16 per group:
    the default model's head, a GGUF Q8_0 tensor) comes back bit for bit from W8A16 in groups of 32 (min-max
    symmetric: s = absmax / 127 = d, q = round(w / s)): a head quantized so loses nothing; groups of 64 and per
    channel do lose."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (40, 96, 32), generator=generator)
    q[..., 0] = 127 * torch.where(torch.rand(40, 96, generator=generator) < 0.5, -1, 1)
    d = (torch.rand(40, 96, 1, generator=generator) * 0.01 + 1e-4).half().float()
    linear = torch.nn.Linear(96 * 32, 40, bias=False)
    linear.weight.data = (q * d).reshape(40, -1)
    for group, lossless in ((32, True), (64, False), (-1, False)):
        spec = scheme_from_name("w_int8_per_group_sym", group).weights
        layer = QuantLinear.from_linear(linear, spec, None)
        assert torch.equal(layer.dequantized_weight(), linear.weight) == lossless


def test_without_the_op_a_weight_only_int8_layer_keeps_the_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the decode op does not run (here: turned off), set_runtime leaves weight-only int8 layers simulated, with
    the reason on the layer."""
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32), scheme_from_name("w_int8_per_channel").weights, None)
    assert layer.supports_weight_only_int8
    assert set_runtime(layer, "int8") == 0
    assert layer.runtime == "fake" and layer.int8_fallback == "off (LLMQUANT_GEMV=0)"


@needs_gemv
def test_the_ops_calls_show_in_torch_profiler() -> None:
    """Under torch.profiler a decode row's calls of the op appear as ``llmquant::<name>`` ranges; outside it they run
    bare (the same output)."""
    from torch.profiler import ProfilerActivity, profile

    layer = _layer("w_int8_per_channel_a_int8_per_token_dynamic", bias=True)
    set_runtime(layer, "int8")
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        bare = layer(x)
        with profile(activities=[ProfilerActivity.CPU]) as result:
            profiled = layer(x.clone())
    names = {event.key for event in result.key_averages()}
    assert {"llmquant::token_codes", "llmquant::int8_gemv"} <= names
    assert torch.equal(bare, profiled)


@pytest.mark.parametrize("runtime", ["fake", "int8"])
def test_a_new_input_spec_takes_effect_on_the_next_call(runtime: str) -> None:
    """`QuantLinear.set_input_spec` rebuilds what the runtimes built from the input spec: None gives float inputs
    (the quantized weight times x), the old spec its outputs again (`scripts/lowbit_parts.py` relies on it)."""
    layer = _layer("w_int8_per_channel_a_int8_per_token_dynamic", bias=True)
    set_runtime(layer, runtime)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    quantized_inputs, spec = layer(x), layer.input_spec
    layer.set_input_spec(None)
    float_inputs = layer(x)
    torch.testing.assert_close(float_inputs, torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias))
    assert not torch.allclose(float_inputs, quantized_inputs, rtol=0, atol=1e-6)
    layer.set_input_spec(spec)
    assert torch.equal(layer(x), quantized_inputs)


@pytest.mark.parametrize(("scheme", "clip_grid"), [
    ("w_int8_per_channel_a_int8_per_token_dynamic", None),
    ("w_int4_per_group_sym_a_int8_per_token_dynamic", None),
    (W4A4_ASYM, (0.9, 0.85, 0.8, 0.75, 0.7)),
    (W4A4_ASYM_WGROUPS, (0.9, 0.85, 0.8, 0.75, 0.7)),
    ("w_int4_per_group_sym_a_uint4_per_group_asym_dynamic", (1.0, 0.95, 0.9, 0.85, 0.8)),
])
@pytest.mark.parametrize("rows", [1, 8, 512])
def test_two_threads_give_the_simulations_bits_on_the_default_models_shape(scheme: str, clip_grid: tuple | None,
                                                                           rows: int) -> None:
    """The suite runs on one thread (conftest); recipes and `llmquant bench` also run on two. A 576 -> 1536 Linear
    (the default model's gate_proj) gives the simulation's bits on two threads as on one, for each layout the
    recipes use, with their clip grids."""
    spec = scheme_from_name(scheme, 32, None)
    linear = torch.nn.Linear(576, 1536)
    torch.nn.init.normal_(linear.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    layer = QuantLinear.from_linear(linear, spec.weights, spec.input_activations)
    if clip_grid is not None:
        layer.set_input_spec(layer.input_spec.model_copy(update={"clip_grid": clip_grid}))
    assert layer.supports_int8
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)) * 3 + 0.5
    torch.set_num_threads(2)  # (the conftest fixture puts one thread back)
    simulated, two_threads = _outputs(layer, x)
    torch.set_num_threads(1)
    one_thread = layer(x)
    assert torch.equal(simulated, two_threads) and torch.equal(two_threads, one_thread), (scheme, rows)


def test_a_build_lock_left_by_a_stopped_build_is_removed_and_a_fresh_one_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """torch waits forever on the lock of a build that was stopped: one older than `STALE_LOCK_SECONDS` goes, with a
    warning; a fresh one (another process building the op now) stays."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "llmquant_some_op" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert not int8_gemv.drop_stale_lock("llmquant_some_op") and lock.exists()
    old = time.time() - int8_gemv.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING"):
        assert int8_gemv.drop_stale_lock("llmquant_some_op") and not lock.exists()
    assert "a build lock" in caplog.text and "a build stopped before it finished" in caplog.text
    assert not int8_gemv.drop_stale_lock("llmquant_some_op")
    from torch.utils import cpp_extension

    lock.touch()
    os.utime(lock, (old, old))
    monkeypatch.delattr(cpp_extension, "_get_build_directory")  # a torch without the private function: left alone
    assert not int8_gemv.drop_stale_lock("llmquant_some_op") and lock.exists()

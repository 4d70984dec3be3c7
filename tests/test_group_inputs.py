"""W4A4 with inputs per token in groups (`w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic`): each group of
``group_size`` consecutive inputs of a token is quantized on its own range (a scale and a zero point per group), so
a group errs no more than the whole token's range would make it, much less where a token's groups differ in size;
the recipe's ``group_size`` sets the groups (-1: per token), falls back to one that divides a Linear's inputs, and
the checkpoint goes through save and load to the same logits on both runtimes. The layer computes what an integer
kernel does, y = s_w * sum_g s_x,g * (x_q,g @ W_q,g^T) + b, and ``torch._int_mm`` group by group gives the
simulation's bits, as does the AVX2 op's one call for every group (its grouped codes, clip ratios searched per
group, in another)."""

from __future__ import annotations

import logging

import pytest
import torch

import llmquant
from conftest import AVX2_OP_REFUSAL, feign_no_int8_instructions, logits, make_model
from llmquant.errors import LlmquantError
from llmquant.model.model_map import detect_model_map
from llmquant.nn import int8_linear
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.quant.primitives import fake_quantize
from llmquant.quant.scheme import scheme_from_name
from llmquant.quant.spec import QuantSpec
from llmquant.recipe import Recipe

W4A4_GROUPS = "w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic"
W4A4_TOKENS = "w_int4_per_channel_sym_a_uint4_per_token_asym_dynamic"
W4A4_BOTH_GROUPS = "w_int4_per_group_sym_a_uint4_per_group_asym_dynamic"


def test_each_group_of_a_token_takes_its_own_range() -> None:
    spec = scheme_from_name(W4A4_GROUPS, 16).input_activations
    token_spec = scheme_from_name(W4A4_TOKENS).input_activations
    assert (spec.granularity, spec.group_size, spec.bits, spec.symmetric, spec.dynamic) == ("group", 16, 4, False, True)
    x = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(0))
    expected = torch.cat([fake_quantize(x[..., i:i + 16], token_spec) for i in range(0, 64, 16)], dim=-1)
    assert torch.equal(fake_quantize(x, spec), expected)
    assert scheme_from_name(W4A4_GROUPS).input_activations.group_size == 64  # the default group size
    assert scheme_from_name(W4A4_GROUPS, -1).input_activations == token_spec  # -1: per token


def test_groups_err_less_than_whole_tokens() -> None:
    """Gaussian tokens: a group's range is narrower than its token's. Tokens whose groups differ in size (one group
    8x the others): the smaller groups no longer take the large one's step, their error falls by its squared ratio."""
    spec = scheme_from_name(W4A4_GROUPS, 16).input_activations
    token_spec = scheme_from_name(W4A4_TOKENS).input_activations
    generator = torch.Generator().manual_seed(1)
    gaussian = torch.randn(256, 128, generator=generator)
    sizes = torch.tensor([1.0, 8.0, 0.5, 2.0, 1.0, 0.25, 4.0, 1.0]).repeat_interleave(16)
    uneven = gaussian * sizes

    def error(x: torch.Tensor, quantizer: object, channels: torch.Tensor | None = None) -> float:
        squared = (fake_quantize(x, quantizer) - x).pow(2)
        return float(squared.sum() if channels is None else squared[:, channels].sum())

    assert error(gaussian, spec) < 0.8 * error(gaussian, token_spec)
    assert error(uneven, spec) < 0.25 * error(uneven, token_spec)
    small = sizes <= 1.0
    assert error(uneven, spec, small) < 0.05 * error(uneven, token_spec, small)


def test_a_group_size_that_does_not_divide_the_inputs_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model("llama")
    hidden = model.config.hidden_size
    recipe = Recipe.build(scheme=W4A4_GROUPS, group_size=hidden * 3 // 4)  # 48 of 64: 32 divides them
    with caplog.at_level(logging.WARNING):
        plan = recipe.resolve(model, detect_model_map(model))
    spec = plan.linears["model.layers.0.self_attn.q_proj"].input_activations
    assert spec.granularity == "group" and hidden % spec.group_size == 0 and spec.group_size == hidden // 2
    assert "does not divide" in caplog.text


def test_a_w4a4kv4_recipe_with_input_groups_saves_and_loads_to_the_same_logits(calib_ids: torch.Tensor,
                                                                             eval_ids: torch.Tensor,
                                                                             tmp_path) -> None:
    recipe = {"scheme": W4A4_GROUPS, "group_size": 16, "kv_cache": "int4_per_token_asym", "algorithm": "gptq",
              "gptq": {"quantized_inputs": True}, "activation_clip_grid": [1.0, 0.9, 0.8],
              "pre_opts": [{"name": "quarot", "rotations": ["R2", "R3", "R4"]}]}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.input_spec is not None]
    assert layers and all(m.input_spec.granularity == "group" and m.input_spec.group_size == 16 for m in layers)
    assert all(m.supports_int8 for m in layers)  # (the kernel's order on both runtimes: no float function)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")  # the int8 runtime
    spec = loaded.get_submodule("model.layers.0.mlp.down_proj").input_spec
    assert (spec.granularity, spec.group_size, spec.clip_grid) == ("group", 16, (1.0, 0.9, 0.8))
    set_runtime(model, "fake")
    expected = logits(model, eval_ids)
    assert torch.isfinite(expected).all()
    assert torch.equal(expected, logits(loaded, eval_ids))
    tokens = llmquant.quantize(make_model("llama"), {**recipe, "scheme": W4A4_TOKENS}, calib=calib_ids,
                               progress=False)
    assert not torch.equal(logits(tokens, eval_ids), expected)  # (the groups are not the tokens)


def _float_linear(in_features: int) -> torch.nn.Linear:
    """The float layer `_grouped_layer` quantizes: columns of different sizes, so that a group's scale differs from
    its row's."""
    linear = torch.nn.Linear(in_features, 80)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        linear.weight.mul_(torch.linspace(0.2, 3.0, in_features))
    return linear


def _grouped_layer(input_spec: QuantSpec, weight_bits: int = 4, in_features: int = 96,
                   weight_group: int | None = None) -> QuantLinear:
    """A layer with inputs per ``input_spec``, its weight per channel or (``weight_group``) in groups of columns."""
    linear = _float_linear(in_features)
    grain = {"granularity": "group", "group_size": weight_group} if weight_group else {"granularity": "channel"}
    weight_spec = QuantSpec(bits=weight_bits, symmetric=True, **grain)
    return QuantLinear.from_linear(linear, weight_spec, input_spec)


GROUPED_INPUTS = {
    "uint4 asym": scheme_from_name(W4A4_GROUPS, 32).input_activations,
    "uint4 asym, clip grid": scheme_from_name(W4A4_GROUPS, 16).input_activations.model_copy(
        update={"clip_grid": (1.0, 0.9, 0.8)}),
    "int8 sym": QuantSpec(bits=8, symmetric=True, granularity="group", group_size=32, dynamic=True),
}


@pytest.mark.parametrize("name", GROUPED_INPUTS)
@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize("weight_groups", [False, True])
def test_grouped_inputs_compute_the_kernels_sum_of_group_products(name: str, rows: int, weight_groups: bool) -> None:
    """The simulation: y = s_w * sum_g s_x,g * (x_q,g @ W_q,g^T) + b with the codes of `fake_quantize`'s groups
    (with the weight in the same groups: y = sum_g (s_x,g * (x_q,g @ W_q,g^T)) * s_w,g + b), equal in exact
    arithmetic to fq(x) @ dequant(W)^T + b (float rounding apart: relative 1e-5)."""
    spec = GROUPED_INPUTS[name]
    layer = _grouped_layer(spec, weight_bits=8 if spec.bits == 8 else 4,
                           weight_group=spec.group_size if weight_groups else None)
    assert layer.supports_int8
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3
    set_runtime(layer, "fake")
    y = layer(x)
    reference = torch.nn.functional.linear(fake_quantize(x, spec), layer.dequantized_weight(), layer.bias)
    assert torch.allclose(y, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    group = spec.group_size
    expected = sum(torch.nn.functional.linear(fake_quantize(x[:, i:i + group], spec.model_copy(
        update={"granularity": "token", "group_size": None})), layer.dequantized_weight()[:, i:i + group])
        for i in range(0, 96, group)) + layer.bias
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _counted_products_and_layer(name: str, weight_groups: bool, monkeypatch: pytest.MonkeyPatch
                                ) -> tuple[list[int], QuantLinear]:
    """The calls of ``torch._int_mm`` from here on (an entry each), and a layer with the inputs of
    ``GROUPED_INPUTS[name]``, its weight per channel or in the inputs' groups."""
    calls: list[int] = []
    int_mm_op = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *args: calls.append(1) or int_mm_op(*args))
    spec = GROUPED_INPUTS[name]
    return calls, _grouped_layer(spec, weight_bits=8 if spec.bits == 8 else 4,
                                 weight_group=spec.group_size if weight_groups else None)


@pytest.mark.parametrize("name", GROUPED_INPUTS)
@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize(("int_mm", "avx2"), [("0", "0"), ("1", "0"), ("0", "1")])
@pytest.mark.parametrize("weight_groups", [False, True])
def test_grouped_inputs_on_the_int8_runtime_give_the_simulations_bits(name: str, rows: int, int_mm: str, avx2: str,
                                                                      weight_groups: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch._int_mm`` group by group (``LLMQUANT_INT_MM=1`` where the CPU has no VNNI: it runs, slowly), the float32
    product of the codes where it is refused, or, on a CPU with AVX2 but neither VNNI nor AMX (their absence feigned
    where they are), every group in one call of the AVX2 op on its panels of the weight (no codes kept beside them):
    the simulation's bits each way; never the decode op's rows (per-token codes). (``LLMQUANT_GEMV=0`` turns the
    decode op's `grouped_gemm` off: the next test.)"""
    monkeypatch.setenv("LLMQUANT_INT_MM", int_mm)
    monkeypatch.setenv("LLMQUANT_GEMV", avx2)
    if avx2 == "1":
        if AVX2_OP_REFUSAL is not None:
            pytest.skip(f"the AVX2 op cannot run here: {AVX2_OP_REFUSAL}")
        feign_no_int8_instructions(monkeypatch)
    calls, layer = _counted_products_and_layer(name, weight_groups, monkeypatch)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3
    set_runtime(layer, "fake")
    simulated = layer(x)
    assert set_runtime(layer, "int8") == 1
    assert torch.equal(layer(x), simulated)
    assert layer._decode_rows is False
    on_avx2_op = avx2 == "1"
    assert isinstance(layer._input_group_weights[3], int8_linear.Avx2Weight) == on_avx2_op
    assert bool(calls) == (not on_avx2_op and int8_linear.int_mm_refusal(x.device) is None)
    if on_avx2_op:
        assert layer.runtime_caches() == layer._int8_weight().tensors() and layer._integer_codes is None


@pytest.mark.parametrize("name", GROUPED_INPUTS)
@pytest.mark.parametrize("rows", [1, 3, 7, 300])
@pytest.mark.parametrize("weight_groups", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_inputs_on_the_decode_op_give_the_simulations_bits(name: str, rows: int, weight_groups: bool,
                                                                   bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU with AVX512-VNNI every group in one call of the decode op's `grouped_gemm` (its codes by the op's
    `block_codes`), the weight per channel or in the inputs' groups, packed once (its packed copy the only runtime
    cache): the simulation's bits at every row count (6-row blocks and the rows left), no ``torch._int_mm``."""
    refusal = int8_linear.grouped_gemm_refusal(torch.device("cpu"), 96, 16)
    if refusal is not None:
        pytest.skip(f"the decode op's grouped_gemm does not run here: {refusal}")
    calls, layer = _counted_products_and_layer(name, weight_groups, monkeypatch)
    if not bias:
        layer.bias = None
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3 + 0.5
    set_runtime(layer, "fake")
    simulated = layer(x)
    assert set_runtime(layer, "int8") == 1
    assert torch.equal(layer(x), simulated)
    weight = layer._input_group_weights[3]
    assert isinstance(weight, int8_linear.GroupedWeight) and not calls
    assert layer.runtime_caches() == weight.tensors() and layer._integer_codes is None


def test_input_groups_that_do_not_divide_the_inputs_keep_the_simulations_error() -> None:
    """A layer made with groups that do not divide its inputs (a recipe falls back before: the test above) is not run
    group by group on a guess: the simulation's quantizer says what is wrong."""
    layer = _grouped_layer(scheme_from_name(W4A4_GROUPS, 64).input_activations, in_features=96)
    assert not layer.supports_int8
    with pytest.raises(LlmquantError, match="group_size 64 does not divide the last dimension 96"):
        layer(torch.randn(4, 96))


def test_grouped_inputs_on_the_int8_runtime_keep_the_codes_shared_by_q_k_v() -> None:
    """q/k/v read one tensor: its grouped codes are made once, and not handed to a per-token layer."""
    spec = GROUPED_INPUTS["uint4 asym"]
    first, second = _grouped_layer(spec), _grouped_layer(spec)
    tokens = _grouped_layer(scheme_from_name(W4A4_TOKENS).input_activations)
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(3))
    for layer in (first, second, tokens):
        set_runtime(layer, "int8")
    first(x)
    kept = int8_linear._last_codes.entry
    assert kept is not None and kept.result[1].shape == (8, 3)
    second(x)
    assert int8_linear._last_codes.entry is kept
    tokens(x)
    assert int8_linear._last_codes.entry.result[1].shape == (8, 1)


def test_a_weight_in_the_inputs_groups_runs_their_products_and_errs_less_than_per_channel() -> None:
    """`w_int4_per_group_sym_a_uint4_per_group_asym_dynamic`: the weight in the inputs' groups of columns, a scale per
    output and group (Atom's weights and activations). Its weight errs less than per channel on columns of different
    sizes; a weight in other groups than its inputs has no integer product: the simulation, fq(x) @ dequant(W)^T."""
    scheme = scheme_from_name(W4A4_BOTH_GROUPS, 32)
    assert (scheme.weights.granularity, scheme.weights.group_size) == ("group", 32)
    assert scheme.input_activations == scheme_from_name(W4A4_GROUPS, 32).input_activations
    assert scheme_from_name(W4A4_BOTH_GROUPS, -1).weights.granularity == "channel"  # -1: per channel and token
    grouped = _grouped_layer(scheme.input_activations, weight_group=32)
    channel = _grouped_layer(scheme.input_activations)
    assert grouped.supports_int8 and grouped.weight_scale.numel() == 80 * 3
    reference = channel.dequantized_weight()  # (both from the same float weight)
    linear = _float_linear(96)
    assert (grouped.dequantized_weight() - linear.weight).norm() < 0.8 * (reference - linear.weight).norm()
    mismatched = _grouped_layer(scheme.input_activations, weight_group=16)
    assert not mismatched.supports_int8
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(4))
    expected = torch.nn.functional.linear(fake_quantize(x, scheme.input_activations), mismatched.dequantized_weight(),
                                          mismatched.bias)
    assert torch.equal(mismatched(x), expected)


def test_a_w4a4kv4_recipe_with_weight_and_inputs_in_groups_saves_and_loads_to_the_same_logits(
        calib_ids: torch.Tensor, eval_ids: torch.Tensor, tmp_path) -> None:
    recipe = {"scheme": W4A4_BOTH_GROUPS, "group_size": 16, "kv_cache": "int4_per_token_asym", "algorithm": "gptq",
              "gptq": {"quantized_inputs": True, "asymmetric": 0.25}, "activation_clip_grid": [1.0, 0.9],
              "weight_observer": "mse", "pre_opts": [{"name": "quarot", "rotations": ["R2", "R3", "R4"]}]}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.input_spec is not None]
    assert layers and all(m.weight_spec.granularity == "group" and m.weight_spec.group_size == 16
                          and m.input_spec.group_size == 16 and m.supports_int8 for m in layers)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")  # the int8 runtime
    set_runtime(model, "fake")
    expected = logits(model, eval_ids)
    assert torch.isfinite(expected).all()
    assert torch.equal(expected, logits(loaded, eval_ids))

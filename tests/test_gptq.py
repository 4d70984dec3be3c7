"""GPTQ: lower output error than round to nearest, the same codes as the OBS formulation, values on
their grid, static groups under activation order, dead inputs, errors, and the pipeline stages."""

from __future__ import annotations

import pytest
import torch

import llmquant
import llmquant.algorithms.gptq as gptq_module
from conftest import logits, make_model, relative_error
from llmquant.algorithms.gptq import GPTQ, HessianAccumulator, gptq_quantize
from llmquant.errors import LlmquantError
from llmquant.nn.quant_linear import QuantLinear
from llmquant.parallel import Ranks
from llmquant.quant import QuantSpec, dequantize, fake_quantize
from llmquant.quant.observers import observe_once
from llmquant.quant.primitives import quantize_blocks, to_blocks

OUT, IN = 128, 256
SPECS = [
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64),
    QuantSpec(bits=4, symmetric=True, granularity="channel"),
    QuantSpec(bits=3, symmetric=False, granularity="group", group_size=64),
    QuantSpec(bits=8, symmetric=True, granularity="channel"),
]
GROUP32 = SPECS[0]


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """x = z A with one fixed random A (a Hessian far from diagonal) and four outlier channels."""
    mixing = torch.randn(features, features, generator=torch.Generator().manual_seed(99)) / features**0.5
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(seed)) @ mixing
    x[:, :4] *= 10.0
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    accumulator = HessianAccumulator(x.shape[-1])
    accumulator.add_batch(x)
    return accumulator.hessian


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [OUT, IN], calibration and held-out inputs (same distribution), calibration Hessian."""
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))
    calib, held_out = correlated_inputs(2048, IN, 1), correlated_inputs(2048, IN, 2)
    return weight, calib, held_out, hessian_of(calib)


def distinct_values_per_block(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    ordered = to_blocks(x, spec).sort(dim=1).values
    return 1 + (ordered.diff(dim=1) != 0).sum(dim=1)


def output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    return float((x @ quantized.T - x @ weight.T).norm())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order_static"])
def test_gptq_beats_round_to_nearest_on_calibration_and_held_out_inputs(layer: tuple, spec: QuantSpec,
                                                                        act_order: bool) -> None:
    weight, calib, held_out, hessian = layer
    result = gptq_quantize(weight, hessian, spec, block_size=48, act_order=act_order, static_groups=act_order)
    rtn = fake_quantize(weight, spec)
    for x in (calib, held_out):  # measured GPTQ / RTN: 0.48 .. 0.58
        assert output_error(x, weight, result.weight) < 0.75 * output_error(x, weight, rtn)


def _obs_reference(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The OBS form (the paper's eqs. 2-3) in float64: after each column, fold it out of H^-1 explicitly."""
    w = weight.double().clone()
    hinv = torch.linalg.inv(hessian + 0.01 * torch.diag(hessian).mean() * torch.eye(len(hessian), dtype=hessian.dtype))
    scale, zero = observe_once(w, spec)
    codes = torch.zeros_like(w)
    for j in range(w.shape[1]):
        c = quantize_blocks(w[:, j : j + 1], scale, zero, spec)
        codes[:, j] = c[:, 0]
        w[:, j:] -= (w[:, j : j + 1] - (c - zero) * scale) / hinv[j, j] @ hinv[j : j + 1, j:]
        hinv -= hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return codes


@pytest.mark.parametrize("block_size", [1, 5, 16, 1000])
def test_the_cholesky_form_with_lazy_batches_gives_the_codes_of_the_obs_form(block_size: int) -> None:
    """Two forms of the same algorithm, both in float64 (where different orders of the same sums round alike)."""
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hessian = hessian_of(correlated_inputs(512, 32, 4))
    spec = QuantSpec(bits=4, granularity="channel")
    result = gptq_quantize(weight, hessian, spec, block_size=block_size)
    assert torch.equal(result.codes.double(), _obs_reference(weight, hessian, spec))


def test_the_inverse_factor_from_one_cholesky_is_the_references(layer: tuple) -> None:
    """U = J M^-1 J (M the Cholesky factor of J H J) is chol(H^-1, upper), as the reference computes it."""
    _, _, _, hessian = layer
    damped = hessian + 0.01 * torch.diag(hessian).mean() * torch.eye(IN, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    factor = gptq_module._inverse_hessian_cholesky([hessian.flip(0, 1).clone()], 0.01)
    assert torch.equal(factor, factor.triu()) and bool((factor.diagonal() > 0).all())
    torch.testing.assert_close(factor, reference, rtol=1e-9, atol=1e-12)


def test_dynamic_groups_do_not_depend_on_the_block_size(layer: tuple) -> None:
    """The lazy batch update only regroups sums: in float64 every block size gives the same codes."""
    weight, _, _, hessian = layer
    whole = gptq_quantize(weight.double(), hessian, GROUP32, block_size=IN)
    for block_size in (7, 48):  # groups straddling blocks take the pending lazy update into account
        result = gptq_quantize(weight.double(), hessian, GROUP32, block_size=block_size)
        assert torch.equal(result.codes, whole.codes)
        assert torch.allclose(result.scale, whole.scale, rtol=1e-10)


@pytest.mark.parametrize("spec", [*SPECS, QuantSpec(bits=4, granularity="tensor"),
                                  QuantSpec(bits=8, symmetric=False, granularity="group", group_size=64),
                                  QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32,
                                            observer="mse")], ids=lambda s: f"{s.describe()}-{s.observer}")
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order_static"])
def test_gptq_weights_lie_on_their_grid(layer: tuple, spec: QuantSpec, act_order: bool) -> None:
    weight, _, _, hessian = layer
    result = gptq_quantize(weight, hessian, spec, block_size=48, act_order=act_order, static_groups=act_order)
    n_blocks = to_blocks(weight, spec).shape[0]
    assert result.scale.shape == result.zero.shape == (n_blocks, 1)
    assert result.codes.shape == weight.shape and not result.codes.is_floating_point()
    assert spec.qmin <= int(result.codes.min()) and int(result.codes.max()) <= spec.qmax
    assert result.weight.dtype == weight.dtype and result.weight.shape == weight.shape
    assert torch.equal(result.weight, dequantize(result.codes, result.scale, result.zero, spec))
    assert int(distinct_values_per_block(result.weight, spec).max()) <= 2**spec.bits
    assert result.error > 0.0
    stored = QuantLinear(IN, OUT, False, spec, None)  # what a checkpoint keeps gives back the same weight
    stored.set_weight(result.weight, (result.scale, result.zero))
    assert torch.equal(stored.codes().to(torch.int32), result.codes.to(torch.int32))
    assert torch.equal(stored.dequantized_weight(), result.weight)


def test_activation_order_keeps_the_static_groups_of_the_original_weights(layer: tuple) -> None:
    weight, _, _, hessian = layer
    plain = gptq_quantize(weight, hessian, GROUP32, static_groups=True)
    ordered = gptq_quantize(weight, hessian, GROUP32, act_order=True, static_groups=True)
    static_scale, static_zero = observe_once(weight, GROUP32)
    for result in (plain, ordered):
        assert torch.equal(result.scale, static_scale) and torch.equal(result.zero, static_zero)
    assert torch.equal(ordered.weight, dequantize(ordered.codes, static_scale, static_zero, GROUP32))
    assert not torch.equal(ordered.codes, plain.codes)  # the order did change the rounding


def test_activation_order_with_dynamic_groups_is_refused(layer: tuple) -> None:
    weight, _, _, hessian = layer
    with pytest.raises(LlmquantError, match="static_groups"):
        gptq_quantize(weight, hessian, GROUP32, act_order=True)


def test_dead_inputs_get_zero_weights_and_no_nan() -> None:
    x = correlated_inputs(256, 64, 1)
    x[:, 5] = 0.0
    hessian = hessian_of(x)
    before = hessian.clone()
    weight = torch.randn(8, 64)
    for spec in (QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=4, granularity="group", group_size=16)):
        for act_order in (False, True):
            result = gptq_quantize(weight, hessian, spec, act_order=act_order, static_groups=act_order)
            assert torch.isfinite(result.weight).all() and (result.weight[:, 5] == 0).all()
    assert torch.equal(hessian, before)  # the caller's Hessian is left alone
    everything_dead = gptq_quantize(weight, torch.zeros(64, 64, dtype=torch.float64), QuantSpec(bits=4))
    assert (everything_dead.weight == 0).all()


def test_a_group_size_that_does_not_divide_in_features_is_a_one_line_error() -> None:
    spec = QuantSpec(bits=4, granularity="group", group_size=48)
    with pytest.raises(LlmquantError) as raised:
        gptq_quantize(torch.randn(8, 128), torch.eye(128), spec)
    message = str(raised.value)
    assert "\n" not in message and "48" in message and "in_features 128" in message


def test_a_failed_cholesky_retries_with_more_dampening_then_raises() -> None:
    weight = torch.randn(8, 32)
    v = torch.nn.functional.normalize(torch.randn(32, 1, dtype=torch.float64), dim=0)
    barely_indefinite = torch.eye(32, dtype=torch.float64) - 1.05 * v @ v.T  # eigenvalue -0.05: 1% damp fails
    result = gptq_quantize(weight, barely_indefinite, QuantSpec(bits=4, granularity="channel"))
    assert torch.isfinite(result.weight).all()
    with pytest.raises(LlmquantError, match="not positive definite") as raised:
        gptq_quantize(weight, -torch.eye(32), QuantSpec(bits=4, granularity="channel"))
    assert "\n" not in str(raised.value)


def test_hessian_of_two_batches_equals_the_hessian_of_their_concatenation() -> None:
    x = torch.randn(300, 16)
    two, one = HessianAccumulator(16), HessianAccumulator(16)
    two.add_batch(x[:100].reshape(4, 25, 16))  # [..., in_features] is flattened to tokens
    two.add_batch(x[100:])
    one.add_batch(x)
    assert two.tokens == one.tokens == 300
    assert two.hessian.dtype == torch.float64
    # float32 products (entries ~2): float32 rounding, ~1e-7 relative
    torch.testing.assert_close(two.hessian, one.hessian, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.hessian, 2 * x.double().T @ x.double() / 300, rtol=1e-5, atol=1e-6)
    exact = HessianAccumulator(16)
    exact.add_batch(x.double())  # float64 inputs keep float64 products
    torch.testing.assert_close(exact.hessian, 2 * x.double().T @ x.double() / 300, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("family", "scheme"), [("llama", "w_uint4_per_group_asym"), ("opt", "w_int4_per_group_sym")])
def test_gptq_in_the_pipeline_beats_round_to_nearest(
    family: str, scheme: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor
) -> None:
    errors = {}
    for name, extra in (("rtn", {}), ("gptq", {"algorithm": "gptq"}),
                        ("gptq-float-hessians", {"algorithm": "gptq", "gptq": {"true_sequential": False}})):
        model = make_model(family)
        ref_calib, ref_eval = logits(model, calib_ids), logits(model, eval_ids)
        llmquant.quantize(model, {"scheme": scheme, "group_size": 32, **extra}, calib=calib_ids, progress=False)
        errors[name] = (relative_error(ref_calib, logits(model, calib_ids)),
                        relative_error(ref_eval, logits(model, eval_ids)))
    for gptq in ("gptq", "gptq-float-hessians"):
        assert errors[gptq][0] < errors["rtn"][0] and errors[gptq][1] < errors["rtn"][1]


def test_without_true_sequential_each_hessian_comes_from_the_float_layer(calib_ids: torch.Tensor,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """true_sequential=False: o_proj's Hessian is that of its input in the float layer, not of its input
    behind the quantized q/k/v (the default). Compared on the Hessians themselves (the same sums batched
    differently agree to float rounding), not on codes, where one flip at a rounding boundary moves the rest."""
    model = make_model("llama")
    attention = model.model.layers[0].self_attn
    seen = []
    handle = attention.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    logits(model, calib_ids)
    handle.remove()
    expected = hessian_of(seen[0])
    used: list[torch.Tensor] = []
    original = gptq_module.gptq_quantize

    def spy(weight: torch.Tensor, hessian: torch.Tensor, *args: object, **kwargs: object):
        used.append(hessian.clone())
        return original(weight, hessian, *args, **kwargs)

    monkeypatch.setattr(gptq_module, "gptq_quantize", spy)
    difference = {}
    for true_sequential in (True, False):
        used.clear()
        model = make_model("llama")
        llmquant.quantize(model, {"scheme": "w_uint4_per_group_asym", "group_size": 32, "algorithm": "gptq",
                                  "gptq": {"true_sequential": true_sequential}}, calib=calib_ids, progress=False)
        o_proj = used[1]  # layer 0's sweeps: q/k/v stacked, then o_proj, gate/up, down_proj
        difference[true_sequential] = float((o_proj - expected).norm() / expected.norm())
    assert difference[False] < 1e-5
    assert difference[True] > 1e-3


def test_gptq_quantizes_the_layer_stage_by_stage(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    llmquant.quantize(model, {"scheme": "w_int8_per_channel_a_int8_per_tensor_static", "algorithm": "gptq"},
                      calib=calib_ids, progress=False)
    assert model.llmquant_manifest.layers[0]["gptq_stages"] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def _stacked_and_separate(layer: tuple, spec: QuantSpec, act_order: bool, dtype: torch.dtype) -> tuple[list, list]:
    """The three parts of the weight (q/k/v-like) swept once with rows stacked, and each swept alone."""
    weight, calib, _, _ = layer
    parts = [p.to(dtype) for p in (weight[:80], weight[80:96], weight[96:])]
    accumulator = HessianAccumulator(IN)
    accumulator.add_batch(calib.to(dtype))
    stacked = GPTQ(parts, accumulator).quantize(spec, block_size=48, act_order=act_order)
    alone = [gptq_quantize(part, accumulator.hessian, spec, block_size=48, act_order=act_order,
                           static_groups=act_order) for part in parts]
    return stacked, alone


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]], ids=lambda s: s.describe())
def test_stacked_weights_get_the_codes_of_separate_sweeps(layer: tuple, spec: QuantSpec, act_order: bool) -> None:
    """q/k/v (or gate/up) share a Hessian: one sweep of their stacked rows is the separate sweeps, exactly. In
    float64 the two orders of the same sums round alike, so every code is equal (in float32 one code on a rounding
    boundary may flip on some BLAS and, through GPTQ's error feedback, move the codes after it)."""
    stacked, alone = _stacked_and_separate(layer, spec, act_order, torch.float64)
    for (w, (scale, zero)), single in zip(stacked, alone, strict=True):
        assert torch.equal(w, single.weight)
        assert torch.allclose(scale, single.scale, rtol=1e-12) and torch.equal(zero, single.zero)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]], ids=lambda s: s.describe())
def test_stacked_sweeps_in_float32_reconstruct_as_well_as_separate_ones(layer: tuple, spec: QuantSpec,
                                                                         act_order: bool) -> None:
    """In float32 (the pipeline's precision) what must hold on any machine is the objective: the stacked and the
    separate sweeps reconstruct the calibration outputs ||X (W - Q)^T|| equally well, to 2% (sweeps whose float32
    codes differ by 10-16% after a 1e-3 perturbation of H stayed within 0.8% of each other here)."""
    weight, calib, _, _ = layer
    stacked, alone = _stacked_and_separate(layer, spec, act_order, torch.float32)
    parts = (weight[:80], weight[80:96], weight[96:])
    for part, (w, _), single in zip(parts, stacked, alone, strict=True):
        error_stacked, error_alone = output_error(calib, part, w), output_error(calib, part, single.weight)
        assert error_stacked == pytest.approx(error_alone, rel=0.02)


def test_weights_quantized_per_tensor_are_not_stacked(layer: tuple) -> None:
    weight, calib, _, _ = layer
    accumulator = HessianAccumulator(IN)
    accumulator.add_batch(calib)
    with pytest.raises(LlmquantError, match="per tensor cannot be stacked"):
        GPTQ([weight[:64], weight[64:]], accumulator).quantize(QuantSpec(bits=8, granularity="tensor"))


def test_weights_quantized_per_tensor_go_through_gptq_one_linear_at_a_time(calib_ids: torch.Tensor,
                                                                            eval_ids: torch.Tensor) -> None:
    """One scale per weight: each Linear is its own sweep (it was refused with a split of zero scale rows)."""
    model = make_model("llama")
    reference = logits(model, eval_ids)
    llmquant.quantize(model, {"scheme": "w_int8_per_tensor_a_int8_per_tensor_static", "algorithm": "gptq"},
                      calib=calib_ids, progress=False)
    assert model.model.layers[0].self_attn.q_proj.weight_scale.shape == (1,)
    assert relative_error(reference, logits(model, eval_ids)) < 0.1


def test_a_kept_inverse_factor_gives_the_same_sweep_and_the_budgets_follow_the_working_memory() -> None:
    """Sweeps that read one Hessian share its factorization (`inverse_factor`): the same codes as each computing
    its own. The round and sweep sizes follow the working memory, within their fixed bounds."""
    torch.manual_seed(0)
    x, weight = torch.randn(256, IN), torch.randn(24, IN)
    hessian = 2 * x.T.double() @ x.double() / x.shape[0]
    for act_order in (False, True):
        factor = gptq_module.inverse_factor(hessian, 0.01, act_order)
        own = gptq_quantize(weight, hessian, GROUP32, act_order=act_order, static_groups=act_order)
        kept = gptq_quantize(weight, hessian, GROUP32, act_order=act_order, static_groups=act_order, factor=factor)
        assert torch.equal(own.codes, kept.codes) and torch.equal(own.weight, kept.weight)
        assert own.error == pytest.approx(kept.error, rel=1e-12)
    assert gptq_module.hessian_budget(None) == gptq_module.ROUND_HESSIAN_BYTES
    assert gptq_module.hessian_budget(2**20) == 2**19 and gptq_module.hessian_budget(2**40) == (
        gptq_module.ROUND_HESSIAN_BYTES)
    assert gptq_module.sweep_rows(2048, None) == gptq_module.MAX_SWEEP_ROWS
    assert gptq_module.sweep_rows(2048, 0) == 1  # (`stacked_sweeps` still takes one Linear whole)
    assert gptq_module.sweep_rows(1024, 96 * 2**20) == 1024  # a quarter of 96 MiB at 24 bytes a weight


def test_every_rank_plans_with_the_least_working_memory() -> None:
    """In several processes the rounds of experts and the sweeps must be the same on every rank (their Hessians are
    reduced together): each plans with the least working memory of all, or the fixed bounds where one cannot tell."""

    class OtherRankHas(Ranks):  # rank 0 of two, the other one reporting ``value``
        def __init__(self, value: float) -> None:
            super().__init__(0, 2)
            self.value = value

        def min(self, tensor: torch.Tensor) -> torch.Tensor:
            return torch.minimum(tensor, torch.tensor([self.value], dtype=tensor.dtype))

    assert OtherRankHas(100.0).least(5000) == 100
    assert OtherRankHas(100.0).least(50) == 50
    assert OtherRankHas(100.0).least(None) is None
    assert OtherRankHas(-1.0).least(5000) is None  # the other rank cannot tell
    assert Ranks().least(5000) == 5000  # one process: its own

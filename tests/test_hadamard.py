"""Hadamard matrices and the fast transform (llmquant.quant.hadamard): exact orthogonality, fast == dense."""

from __future__ import annotations

import math

import pytest
import torch

from llmquant.errors import LlmquantError
from llmquant.quant.hadamard import (
    _GF,
    _WILLIAMSON,
    _core_matrix,
    _jacobsthal,
    _prime_power,
    constructible_orders,
    fast_hadamard_transform,
    hadamard_kronecker_factors,
    hadamard_matrix,
    hadamard_plan,
    is_constructible,
    kronecker_transform,
    largest_constructible_divisor,
    orthogonal_fallback,
    orthogonal_for,
    paley_hadamard,
)
from llmquant.quant.rotation import Rotation

SEEDS = [4, 12, 20, 36, 40, 52, 60, 108, 140, 156, 172]
CORES = sorted({*SEEDS, 28, 44, 148})
EXPECTED_CORE = {
    12: "paley1(q=11)",
    20: "paley1(q=19)",
    28: "paley1(q=27)",
    36: "paley2(q=17)",
    44: "paley1(q=43)",
    52: "paley2(q=25)",
    60: "paley1(q=59)",
    108: "paley1(q=107)",
    140: "paley1(q=139)",
    148: "paley2(q=73)",
    156: "williamson(t=39)",
    172: "williamson(t=43)",
}


def _assert_hadamard_exact(h: torch.Tensor, n: int) -> None:
    hi = h.to(torch.int64)
    assert h.shape == (n, n)
    assert torch.equal(hi.abs(), torch.ones(n, n, dtype=torch.int64))
    assert torch.equal(hi @ hi.T, n * torch.eye(n, dtype=torch.int64))


def _rows_of_h(n: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows of H_n = H_m (x) H_{2^k} from the definition, without the dense matrix.

    H[(a, b), (a', b')] = H_m[a, a'] * (-1)^popcount(b & b') (Sylvester's matrix in closed form).
    """
    plan = hadamard_plan(n)
    size = 1 << plan.k
    a, b = rows // size, rows % size
    cols = torch.arange(n)
    a2, b2 = cols // size, cols % size
    core = _core_matrix(plan.m)[a[:, None], a2[None, :]]
    both = b[:, None] & b2[None, :]
    parity = torch.zeros_like(both)
    for bit in range(max(plan.k, 1)):
        parity ^= (both >> bit) & 1
    return core * (1 - 2 * parity).to(torch.float64)


# ------------------------------------------------------------------------------------------------ matrices, exact


@pytest.mark.parametrize("m", CORES)
def test_core_orders_are_exact_hadamard(m: int) -> None:
    _assert_hadamard_exact(hadamard_matrix(m), m)
    plan = hadamard_plan(m)
    assert plan.m * 2**plan.k == m
    if m in EXPECTED_CORE:
        assert (plan.m, plan.k, plan.construction) == (m, 0, EXPECTED_CORE[m])
    assert hadamard_plan(40).m == 20 and hadamard_plan(40).k == 1
    assert hadamard_plan(4).construction == "sylvester" and hadamard_plan(4).k == 2


def test_every_reached_core_and_paley_order_up_to_200_is_exact() -> None:
    cores = constructible_orders(200)
    assert set(CORES) - {4, 40} <= set(cores)  # 4 = 1 * 2^2 and 40 = 20 * 2 are not cores
    for m in cores:
        _assert_hadamard_exact(hadamard_matrix(m), m)
    paley = []
    for q in range(3, 200, 2):
        pe = _prime_power(q)
        order = q + 1 if q % 4 == 3 else 2 * (q + 1)
        if pe is not None and order <= 200:
            _assert_hadamard_exact(paley_hadamard(q), order)
            paley.append(q)
    assert {9, 25, 27, 49, 81, 43, 73} <= set(paley)  # prime powers, not only primes


@pytest.mark.parametrize(("p", "e"), [(3, 2), (5, 2), (3, 3), (7, 2), (3, 4)])
def test_finite_field_and_jacobsthal(p: int, e: int) -> None:
    gf, q = _GF(p, e), p**e
    for x in range(1, q):  # GF(q)* is a group: every non-zero element has exactly one inverse
        assert sum(gf.mul(x, y) == 1 for y in range(1, q)) == 1
    jac = _jacobsthal(q)
    ones = torch.ones(q, q, dtype=torch.int64)
    assert torch.equal(jac @ jac.T, q * torch.eye(q, dtype=torch.int64) - ones)
    assert torch.equal(jac.sum(1), torch.zeros(q, dtype=torch.int64))
    assert torch.equal(jac.T, jac if q % 4 == 1 else -jac)


@pytest.mark.parametrize("t", sorted(_WILLIAMSON))
def test_williamson_quadruples(t: int) -> None:
    total = torch.zeros(t, t, dtype=torch.int64)
    for row in _WILLIAMSON[t]:
        r = torch.tensor([1 if s == "+" else -1 for s in row])
        assert r.numel() == t and torch.equal(r[1:], r[1:].flip(0))  # symmetric circulant
        c = r[(torch.arange(t)[None, :] - torch.arange(t)[:, None]) % t]
        total += c @ c
    assert torch.equal(total, 4 * t * torch.eye(t, dtype=torch.int64))


# -------------------------------------------------------------------------------------------- fast transform


@pytest.mark.parametrize("m", CORES)
def test_fast_transform_orthogonal_up_to_2_pow_14(m: int) -> None:
    """Every size m * 2^k, k <= 14, without a dense matrix: random and basis vectors, norms and the inverse."""
    gen = torch.Generator().manual_seed(m)
    for k in range(15):
        n = m * 2**k
        n_random, n_basis = (2, 2) if n <= 1 << 18 else (1, 1)  # few vectors for the large sizes
        x = torch.zeros(n_random + n_basis, n, dtype=torch.float64)
        x[:n_random] = torch.randn(n_random, n, generator=gen, dtype=torch.float64)
        cols = [n - 1, int(torch.randint(n, (1,), generator=gen))][:n_basis]
        x[range(n_random, n_random + n_basis), cols] = 1.0
        y = fast_hadamard_transform(x)
        assert float((y.norm(dim=-1) / x.norm(dim=-1) - 1).abs().max()) < 1e-10
        # a basis vector e_j becomes column j of H / sqrt(n): every entry is +-1 / sqrt(n)
        assert float((y[n_random:].abs() * math.sqrt(n) - 1).abs().max()) < 1e-10
        assert float((fast_hadamard_transform(y, n, transpose=True) - x).abs().max()) < 1e-10


def test_fast_equals_dense_up_to_4096() -> None:
    sizes = {n for n in range(1, 257) if is_constructible(n)}
    sizes |= {m * 2**k for m in CORES for k in range(11) if m * 2**k <= 4096}
    sizes |= {576, 1536}
    gen = torch.Generator().manual_seed(0)
    for n in sorted(sizes):
        h = hadamard_matrix(n)
        x = torch.randn(3, n, generator=gen, dtype=torch.float64)
        ref = x @ h.T / math.sqrt(n)
        torch.testing.assert_close(fast_hadamard_transform(x), ref, rtol=0, atol=1e-12 * math.sqrt(n))
        torch.testing.assert_close(
            fast_hadamard_transform(x, transpose=True), x @ h / math.sqrt(n), rtol=0, atol=1e-12 * math.sqrt(n)
        )
        y32 = fast_hadamard_transform(x.float())
        assert y32.dtype == torch.float32
        assert float((y32.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize(("n", "m", "k"), [(576, 36, 4), (1536, 12, 7), (14336, 28, 9), (18944, 148, 7)])
def test_named_sizes_against_rows_of_the_definition(n: int, m: int, k: int) -> None:
    plan = hadamard_plan(n)
    assert (plan.m, plan.k) == (m, k)
    assert plan.online_flops_per_vector == n * k + n * m
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, generator=gen, dtype=torch.float64)
    rows = torch.cat([torch.tensor([0, n - 1]), torch.randint(n, (6,), generator=gen)])
    h_rows = _rows_of_h(n, rows)
    if n <= 2048:
        torch.testing.assert_close(h_rows, hadamard_matrix(n)[rows], rtol=0, atol=0)
    ref = x @ h_rows.T / math.sqrt(n)
    torch.testing.assert_close(fast_hadamard_transform(x)[:, rows], ref, rtol=0, atol=1e-11)
    y32 = fast_hadamard_transform(x.float())[:, rows].double()
    assert float((y32 - ref).norm() / ref.norm()) < 1e-5


def test_kronecker_core() -> None:
    plan = hadamard_plan(1904)
    assert (plan.m, plan.k, plan.construction) == (1904, 0, "kronecker(28,68)")
    x = torch.randn(2, 1904, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = fast_hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-10, atol=0)
    torch.testing.assert_close(fast_hadamard_transform(y, transpose=True), x, rtol=0, atol=1e-12)


def test_dtypes_and_shapes() -> None:
    x = torch.randn(2, 3, 576, generator=torch.Generator().manual_seed(2))
    ref = x.double() @ hadamard_matrix(576).T / 24.0
    assert fast_hadamard_transform(x).shape == x.shape
    y = fast_hadamard_transform(x.bfloat16())
    assert y.dtype == torch.bfloat16 and float((y.double() - ref).abs().max()) < 0.05
    y64 = fast_hadamard_transform(x, dtype=torch.float64)
    assert y64.dtype == torch.float32
    torch.testing.assert_close(y64.double(), ref, rtol=1e-6, atol=1e-6)
    xg = x.double().requires_grad_()
    (fast_hadamard_transform(xg) * ref).sum().backward()  # d/dx <x H^T / sqrt(n), r> = r H / sqrt(n)
    torch.testing.assert_close(xg.grad, fast_hadamard_transform(ref, transpose=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(fast_hadamard_transform(xg).detach(), fast_hadamard_transform(x.double()))
    with pytest.raises(LlmquantError, match="n=512"):
        fast_hadamard_transform(x, 512)
    with pytest.raises(LlmquantError):
        fast_hadamard_transform(torch.ones(4, dtype=torch.int64))


# ------------------------------------------------------------------------------------- errors and fallbacks


@pytest.mark.parametrize("n", [3, 6, 10, 15, 188, 668, 376])
def test_non_constructible_sizes_raise_one_line(n: int) -> None:
    assert not is_constructible(n)
    with pytest.raises(LlmquantError) as info:
        hadamard_plan(n)
    msg = str(info.value)
    assert "\n" not in msg and f"n={n}" in msg and "orthogonal_fallback" in msg
    with pytest.raises(LlmquantError, match=f"n={n}"):
        hadamard_matrix(n)


def test_six_times_power_of_two_reduces_to_paley_12() -> None:
    # 6 * 64 = 384 = 12 * 32: constructible (only n = 6 itself has no Hadamard matrix).
    assert hadamard_plan(6 * 64).m == 12 and hadamard_plan(6 * 64).k == 5


@pytest.mark.parametrize("n", [3, 6, 188, 376, 30])
@pytest.mark.parametrize("kind", ["block_diagonal", "random"])
def test_fallbacks_are_orthonormal(n: int, kind: str) -> None:
    q = orthogonal_fallback(n, kind, seed=3)  # type: ignore[arg-type]
    assert q.dtype == torch.float64 and q.shape == (n, n)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    m, desc = orthogonal_for(n, kind)  # type: ignore[arg-type]
    assert m.shape == (n, n) and kind in desc
    if kind == "random":
        assert torch.equal(q, orthogonal_fallback(n, "random", seed=3))
        assert not torch.equal(q, orthogonal_fallback(n, "random", seed=4))
    else:
        d = largest_constructible_divisor(n)
        assert torch.equal(q[:d, :d] * math.sqrt(d), hadamard_matrix(d)) and not q[:d, d:].any()


def test_orthogonal_for_prefers_hadamard() -> None:
    assert largest_constructible_divisor(188) == 4 and largest_constructible_divisor(376) == 8
    q, desc = orthogonal_for(172, "random")
    torch.testing.assert_close(q, hadamard_matrix(172) / math.sqrt(172), rtol=0, atol=0)
    assert "williamson(t=43)" in desc
    with pytest.raises(LlmquantError, match="n=188"):
        orthogonal_for(188)


@pytest.mark.parametrize("n", [1, 2, 12, 64, 256, 576, 1536, 11008, 14336])
def test_kronecker_factors_multiply_to_the_hadamard_matrix_and_transform_like_the_fast_one(n: int) -> None:
    factors = hadamard_kronecker_factors(n, largest=16)
    assert all(f.shape[0] <= max(16, hadamard_plan(n).m) for f in factors)
    product = factors[0]
    for factor in factors[1:]:
        product = torch.kron(product, factor)
    assert torch.equal(product, hadamard_matrix(n))
    x = torch.randn(3, 2, n, dtype=torch.float64)
    fast = fast_hadamard_transform(x)
    torch.testing.assert_close(kronecker_transform(x, hadamard_kronecker_factors(n), n ** -0.5), fast,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [64, 1536])
def test_online_rotation_applies_the_rotation_in_float32(n: int) -> None:
    from llmquant.nn.online_rotation import OnlineRotation

    rotation = Rotation(n)
    x = torch.randn(4, n)
    torch.testing.assert_close(OnlineRotation(rotation)(x), rotation.apply(x.double()).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [64, 576, 1536])
@pytest.mark.parametrize("randomize", [False, True])
def test_the_float32_scoring_rotation_is_apply_to_float32_rounding(n: int, randomize: bool) -> None:
    """`Rotation.apply_float32` (the smoothing searches' candidates): within 4e-6 of the largest value of `apply`'s
    float64 result cast to float32 (seen: 1.5e-6 at n = 1536), on rows with an outlier channel 1000x the others;
    another kind is `apply`."""
    rotation = Rotation(n, "hadamard", randomize, 5)
    x = torch.randn(300, n, generator=torch.Generator().manual_seed(n))
    x[:, 7] *= 1000
    fast, exact = rotation.apply_float32(x), rotation.apply(x.double()).float()
    assert fast.dtype == torch.float32 and float((fast - exact).abs().max() / exact.abs().max()) < 4e-6
    block = Rotation(n, "block_diagonal")
    assert torch.equal(block.apply_float32(x), block.apply(x))


@pytest.mark.parametrize("n", [64, 192, 576, 1536])
def test_an_online_randomized_hadamard_gives_the_float64_transforms_values(n: int) -> None:
    """A randomized Hadamard online (QuaRot's R3 to R6) multiplies by its +-1 Kronecker factors in float64: the same
    float32 values as `Rotation.apply`'s butterfly, bit for bit (sums of +-x are exact in float64 here, then one
    multiplication by 1 / sqrt(n)), at 1, 8 and 512 rows, with an outlier channel 1000x the others; an input that
    needs gradients keeps `Rotation.apply`."""
    from llmquant.nn.online_rotation import OnlineRotation

    rotation = Rotation(n, "hadamard", True, 3)
    online = OnlineRotation(rotation)
    generator = torch.Generator().manual_seed(n)
    for rows in (1, 8, 512):
        x = torch.randn(rows, n, generator=generator) * torch.rand(rows, 1, generator=generator) * 10
        x[:, 3] *= 1000
        assert torch.equal(online(x), rotation.apply(x.double()).float())
    x = torch.randn(2, n, requires_grad=True)
    online(x).sum().backward()
    expected = rotation.apply(torch.ones(2, n, dtype=torch.float64), inverse=True).float()  # (d sum(x Q) / dx = 1 Q^T)
    assert x.grad is not None and torch.allclose(x.grad, expected, atol=1e-5)


def test_linears_reading_one_tensor_share_its_rotation_and_nothing_else_does() -> None:
    """q/k/v (and gate/up) rotate their shared input once (`rotated_once`): three Linears with equal rotations get
    the same rotated tensor and the outputs of separate rotations; another rotation, a changed input, a result
    changed in place, gradients being recorded, and hooks on a rotation module each rotate anew."""
    from torch import nn

    from llmquant.nn.online_rotation import attach_input_rotation

    torch.manual_seed(0)
    linears = [nn.Linear(64, 16) for _ in range(4)]
    for linear in linears[:3]:
        attach_input_rotation(linear, Rotation(64, "hadamard", True, 5))
    attach_input_rotation(linears[3], Rotation(64, "hadamard", True, 6))  # another seed: another rotation
    seen: list[torch.Tensor] = []
    for linear in linears:
        linear.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(3, 64)
    with torch.no_grad():
        outputs = [linear(x) for linear in linears]
        assert seen[0] is seen[1] is seen[2] and seen[3] is not seen[0]
        for linear, y in zip(linears, outputs, strict=True):
            assert torch.equal(y, nn.functional.linear(linear.input_rotation(x), linear.weight, linear.bias))
        x.mul_(2.0)  # the same tensor, changed
        linears[0](x)
        assert seen[-1] is not seen[0] and torch.equal(seen[-1], linears[0].input_rotation(x))
        seen[-1].add_(1.0)  # the kept result, changed by a consumer
        linears[1](x)
        assert torch.equal(seen[-1], linears[1].input_rotation(x))
    linears[0](x)
    linears[1](x)
    assert seen[-1] is not seen[-2]  # gradients recorded: nothing kept
    recorded: list[torch.Tensor] = []  # a hook on a rotation module (smoothing's statistics, `patterns._record`)
    linears[1].input_rotation.register_forward_pre_hook(lambda module, args: recorded.append(args[0]))
    with torch.no_grad():
        linears[0](x)
        linears[1](x)
    assert recorded and recorded[-1] is x and seen[-1] is not seen[-2]  # it runs, on a rotation of its own


def test_a_shared_rotation_is_let_go_with_its_input() -> None:
    """The kept rotation of a tensor (`rotated_once`) goes when that tensor does, not at the next rotation."""
    import gc

    from torch import nn

    from llmquant.nn import online_rotation

    linear = nn.Linear(64, 16)
    online_rotation.attach_input_rotation(linear, Rotation(64, "hadamard", True, 5))
    with torch.no_grad():
        x = torch.randn(3, 64)
        linear(x)
        assert online_rotation._last_rotation.entry is not None
        del x
        gc.collect()
    assert online_rotation._last_rotation.entry is None

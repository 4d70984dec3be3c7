"""Hadamard matrices of many orders and a fast normalised Hadamard transform (for QuaRot-style rotations).

A Hadamard matrix of order n is an n x n matrix H with entries +-1 and H H^T = n I, so H / sqrt(n) is
orthogonal. Rotating weights and activations by it spreads outliers over all channels (QuaRot, Ashkboos et
al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"; QuIP#, Tseng et al. 2024).

Every order this module builds is written n = m * 2^k and

    H_n = H_m (x) H_{2^k}                                   (Kronecker product, H_m the outer factor)

where H_{2^k} = H_2 (x) ... (x) H_2, H_2 = [[1, 1], [1, -1]] (Sylvester 1867; symmetric) and the "core" H_m
(m = 1 or 4 | m) comes from, in this order of preference:

- Paley construction I (Paley 1933, "On orthogonal matrices"): order q + 1 for a prime power q = 3 (mod 4);
- Paley construction II (Paley 1933): order 2(q + 1) for a prime power q = 1 (mod 4);
- Williamson's construction (Williamson 1944, "Hadamard's determinant theorem and the sum of four squares")
  from four symmetric circulant +-1 matrices A, B, C, D of order t with A^2 + B^2 + C^2 + D^2 = 4t I, for the
  tabulated t in `_WILLIAMSON` (orders 156 = 4 * 39 and 172 = 4 * 43);
- a Kronecker product H_a (x) H_b of two constructible orders a * b = m.

For each n the plan takes the smallest m (largest k) that has a core. Paley needs the quadratic character of
GF(q) for prime powers q = p^e: a small polynomial-basis finite field is implemented below (an irreducible
polynomial of degree e over GF(p) is found by exhaustive search).

Sizes without a construction (odd n > 1, n = 2 (mod 4) with n > 2, or an unreached core such as 188 = 4 * 47)
raise `LlmquantError`; `orthogonal_fallback` gives a block-diagonal Hadamard or a seeded random orthogonal
matrix instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Literal

import torch

from llmquant.errors import LlmquantError

FallbackKind = Literal["block_diagonal", "random"]

# Williamson quadruples: first rows of the symmetric circulant matrices A, B, C, D of order t, as +/- strings.
# Sequence data only, as tabulated in SageMath, src/sage/combinat/matrices/hadamard_matrix.py
# (function `williamson_type_quadruples_smallcases`), which gives the sources:
#   t = 39: S. London, "Constructing New Turyn Type Sequences, T-Sequences and Hadamard Matrices",
#           PhD thesis, University of Illinois at Chicago, 2013;
#   t = 43: M. Hall Jr., "Combinatorial Theory", 2nd ed., Wiley, 1983 (Williamson matrices table).
# Both are verified numerically (H H^T = 4t I) when first built and in tests/test_hadamard.py.
_WILLIAMSON: dict[int, tuple[str, str, str, str]] = {
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Small number theory and finite fields GF(p^e)
# ----------------------------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime, e >= 1; None if q is not a prime power (trial division)."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of a(x) mod f(x) over GF(p); coefficients low degree first, f monic."""
    a = [c % p for c in a]
    deg_f = len(f) - 1
    for top in range(len(a) - 1, deg_f - 1, -1):
        c = a[top]
        if c:
            shift = top - deg_f
            for i, fc in enumerate(f):
                a[shift + i] = (a[shift + i] - c * fc) % p
    return a[:deg_f] + [0] * max(0, deg_f - len(a))


def _monic_polys(p: int, degree: int) -> list[list[int]]:
    """All monic polynomials of the given degree over GF(p), coefficients low degree first."""
    polys = []
    for code in range(p**degree):
        coeffs = [(code // p**i) % p for i in range(degree)]
        polys.append([*coeffs, 1])
    return polys


def _is_irreducible(f: list[int], p: int) -> bool:
    """f monic of degree e is irreducible over GF(p) iff no monic polynomial of degree 1..e//2 divides it."""
    e = len(f) - 1
    for d in range(1, e // 2 + 1):
        for g in _monic_polys(p, d):
            if not any(_poly_mod(f, g, p)):
                return False
    return True


class _GF:
    """GF(p^e) in the polynomial basis: element x in [0, q) has base-p digits = coefficients of x(t) mod f(t)."""

    def __init__(self, p: int, e: int) -> None:
        self.p, self.e, self.q = p, e, p**e
        self.modulus = [0, 1] if e == 1 else next(f for f in _monic_polys(p, e) if _is_irreducible(f, p))

    def digits(self, x: int) -> list[int]:
        return [(x // self.p**i) % self.p for i in range(self.e)]

    def from_digits(self, d: list[int]) -> int:
        return sum((c % self.p) * self.p**i for i, c in enumerate(d))

    def mul(self, x: int, y: int) -> int:
        if self.e == 1:
            return (x * y) % self.p
        a, b = self.digits(x), self.digits(y)
        prod = [0] * (2 * self.e - 1)
        for i, ai in enumerate(a):
            for j, bj in enumerate(b):
                prod[i + j] += ai * bj
        return self.from_digits(_poly_mod(prod, self.modulus, self.p))

    def sub_table(self) -> torch.Tensor:
        """[q, q] int64 table of x - y (digit-wise subtraction mod p)."""
        digits = torch.tensor([self.digits(x) for x in range(self.q)], dtype=torch.int64)
        powers = self.p ** torch.arange(self.e, dtype=torch.int64)
        return (((digits[:, None, :] - digits[None, :, :]) % self.p) * powers).sum(-1)

    def quadratic_character(self) -> torch.Tensor:
        """chi(x) = 0 if x = 0, +1 if x is a non-zero square, -1 otherwise (q odd), as an int64 vector."""
        chi = torch.full((self.q,), -1, dtype=torch.int64)
        chi[0] = 0
        squares = {self.mul(x, x) for x in range(1, self.q)}
        chi[sorted(squares)] = 1
        if len(squares) != (self.q - 1) // 2:  # GF(q)* is cyclic of even order: exactly half are squares
            raise AssertionError(f"GF({self.q}) arithmetic is inconsistent: {len(squares)} squares")
        return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix Q[i, j] = chi(x_i - x_j) over GF(q) (int64): Q J = 0, Q Q^T = q I - J, Q^T = chi(-1) Q."""
    pe = _prime_power(q)
    if pe is None or pe[0] == 2:
        raise ValueError(f"Paley constructions need an odd prime power q, got {q}")
    gf = _GF(*pe)
    return gf.quadratic_character()[gf.sub_table()]


def paley_hadamard(q: int) -> torch.Tensor:
    """Paley's Hadamard matrix for an odd prime power q (int64 entries +-1).

    - q = 3 (mod 4), construction I, order q + 1: S = [[0, 1^T], [-1, Q]] is skew with S S^T = q I, and
      H = I + S.
    - q = 1 (mod 4), construction II, order 2(q + 1): C = [[0, 1^T], [1, Q]] is a symmetric conference matrix
      (C C^T = q I), and H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]].
    """
    jac = _jacobsthal(q)
    ones = torch.ones(q, 1, dtype=torch.int64)
    zero = torch.zeros(1, 1, dtype=torch.int64)
    if q % 4 == 3:
        s = torch.cat([torch.cat([zero, ones.T], 1), torch.cat([-ones, jac], 1)], 0)
        return torch.eye(q + 1, dtype=torch.int64) + s
    c = torch.cat([torch.cat([zero, ones.T], 1), torch.cat([ones, jac], 1)], 0)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    d2 = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(c, h2) + torch.kron(torch.eye(q + 1, dtype=torch.int64), d2)


def _circulant(row: torch.Tensor) -> torch.Tensor:
    """C[i, j] = row[(j - i) mod t]."""
    t = row.numel()
    idx = (torch.arange(t)[None, :] - torch.arange(t)[:, None]) % t
    return row[idx]


def williamson_hadamard(t: int) -> torch.Tensor:
    """Williamson's Hadamard matrix of order 4t from the tabulated quadruple (int64).

    H = [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]] with A, B, C, D symmetric circulant
    (so pairwise commuting) and A^2 + B^2 + C^2 + D^2 = 4t I give H H^T = 4t I (Williamson 1944).
    """
    if t not in _WILLIAMSON:
        raise ValueError(f"no Williamson quadruple tabulated for t={t} (have {sorted(_WILLIAMSON)})")
    a, b, c, d = (_circulant(torch.tensor([1 if s == "+" else -1 for s in row])) for row in _WILLIAMSON[t])
    return torch.cat(
        [
            torch.cat([a, b, c, d], 1),
            torch.cat([-b, a, -d, c], 1),
            torch.cat([-c, d, a, -b], 1),
            torch.cat([-d, -c, b, a], 1),
        ],
        0,
    )


# ----------------------------------------------------------------------------------------------------------------
# Plans: how an order is built
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HadamardPlan:
    """How H_n is built: n = m * 2^k, H_n = H_m (x) H_{2^k}, with `construction` naming the core H_m.

    `online_flops_per_vector` estimates the cost of `fast_hadamard_transform` on one vector: n * k adds for the
    k butterfly stages plus n * m multiply-adds for the dense core product (the core part is 0 when m = 1).
    """

    n: int
    m: int
    k: int
    construction: str
    online_flops_per_vector: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "online_flops_per_vector", self.n * self.k + (self.n * self.m if self.m > 1 else 0))

    def describe(self) -> str:
        if self.m == 1:
            return f"sylvester(2^{self.k})"
        return self.construction if self.k == 0 else f"{self.construction} (x) sylvester(2^{self.k})"


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@cache
def _core_construction(m: int) -> str | None:
    """Name of the construction of a core of order m (1 or a multiple of 4), or None if none is reached."""
    if m == 1:
        return "sylvester"
    if m % 4:
        return None
    q = m - 1
    if q % 4 == 3 and _prime_power(q) is not None:
        return f"paley1(q={q})"
    q = m // 2 - 1
    if q % 4 == 1 and _prime_power(q) is not None:
        return f"paley2(q={q})"
    if m // 4 in _WILLIAMSON:
        return f"williamson(t={m // 4})"
    for a in range(3, math.isqrt(m) + 1):
        b, r = divmod(m, a)
        if r or _is_power_of_two(a) or _is_power_of_two(b):
            continue
        if is_constructible(a) and is_constructible(b):
            return f"kronecker({a},{b})"
    return None


def _two_adic(n: int) -> tuple[int, int]:
    """(odd, v) with n = odd * 2^v."""
    v = (n & -n).bit_length() - 1
    return n >> v, v


@lru_cache(maxsize=4096)
def _plan_or_none(n: int) -> HadamardPlan | None:
    if n < 1:
        return None
    odd, v = _two_adic(n)
    for j in range(v + 1):  # smallest core m = odd * 2^j first, i.e. the most butterfly stages
        m = odd << j
        name = _core_construction(m)
        if name is not None:
            return HadamardPlan(n=n, m=m, k=v - j, construction=name)
    return None


def _fallback_hint(n: int) -> str:
    return (
        f"fallbacks: orthogonal_fallback({n}, 'block_diagonal') ({n // largest_constructible_divisor(n)} "
        f"Hadamard blocks of order {largest_constructible_divisor(n)}) or orthogonal_fallback({n}, 'random')"
    )


def _no_construction_error(n: int) -> LlmquantError:
    if n < 1:
        return LlmquantError(f"Hadamard order must be a positive integer, got n={n}")
    odd, v = _two_adic(n)
    if v == 0:
        why = "odd n > 1 has no Hadamard matrix"
    elif v == 1:
        why = "n = 2 (mod 4) with n > 2 has no Hadamard matrix"
    else:
        cores = ", ".join(str(odd << j) for j in range(2, v + 1))
        why = (
            f"n = {odd} * 2^{v} and no core of order {cores} is reached by Paley I/II, "
            f"Williamson (t in {sorted(_WILLIAMSON)}) or Kronecker products"
        )
    return LlmquantError(f"no Hadamard matrix construction for n={n}: {why}; {_fallback_hint(n)}")


def hadamard_plan(n: int) -> HadamardPlan:
    """The plan n = m * 2^k (smallest constructible core m) and the core's construction; raises if none."""
    plan = _plan_or_none(n)
    if plan is None:
        raise _no_construction_error(n)
    return plan


def is_constructible(n: int) -> bool:
    """Whether `hadamard_matrix(n)` can be built by this module."""
    return _plan_or_none(n) is not None


def constructible_orders(limit: int, cores_only: bool = True) -> list[int]:
    """Orders n <= limit this module builds; with cores_only, only the m-cores (n with plan k = 0, plus 1)."""
    out = []
    for n in range(1, limit + 1):
        plan = _plan_or_none(n)
        if plan is not None and (not cores_only or plan.m == n):
            out.append(n)
    return out


def largest_constructible_divisor(n: int) -> int:
    """The largest d | n with a Hadamard matrix here (at least 1)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return max(d for d in {*small, *(n // d for d in small)} if is_constructible(d))


# ----------------------------------------------------------------------------------------------------------------
# Matrices
# ----------------------------------------------------------------------------------------------------------------


def _build_core(m: int, name: str) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    if name.startswith("paley1") or name.startswith("paley2"):
        q = m - 1 if name.startswith("paley1") else m // 2 - 1
        return paley_hadamard(q)
    if name.startswith("williamson"):
        return williamson_hadamard(m // 4)
    if name.startswith("kronecker"):
        a, b = (int(s) for s in name[len("kronecker(") : -1].split(","))
        return torch.kron(hadamard_matrix(a).to(torch.int64), hadamard_matrix(b).to(torch.int64))
    raise AssertionError(f"unknown construction {name!r}")


@lru_cache(maxsize=64)
def _core_matrix(m: int) -> torch.Tensor:
    """The cached float64 core H_m, checked once: entries +-1 and H_m H_m^T = m I exactly.

    The check runs in float64, which is exact here: every entry of H_m H_m^T is an integer of size <= m < 2^53.
    """
    name = _core_construction(m)
    if name is None:
        raise _no_construction_error(m)
    h = _build_core(m, name).to(torch.float64)
    if h.shape != (m, m) or not bool((h.abs() == 1).all()) or not torch.equal(h @ h.T, m * torch.eye(m).double()):
        raise AssertionError(f"construction {name} did not give a Hadamard matrix of order {m}")
    return h


def _sylvester(size: int) -> torch.Tensor:
    """H_{2^k} = H_2 (x) ... (x) H_2 (float64, symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.kron(h2, h)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """H_n = H_m (x) H_{2^k} (float64 entries +-1, not normalised), H_n H_n^T = n I. Raises LlmquantError."""
    plan = hadamard_plan(n)
    core = _core_matrix(plan.m)
    if plan.k == 0:
        return core.clone()
    return torch.kron(core, _sylvester(1 << plan.k))


def orthogonal_fallback(n: int, kind: FallbackKind, seed: int = 0) -> torch.Tensor:
    """An orthonormal n x n float64 matrix for any n >= 1.

    - "block_diagonal": I_{n/d} (x) H_d / sqrt(d) with d the largest constructible divisor of n (only mixes
      channels within blocks of d; d = 1 gives the identity).
    - "random": Q from the QR decomposition of a seeded Gaussian matrix G = Q R, with the columns' signs fixed by
      sign(diag(R)) so Q is Haar distributed (Mezzadri 2007, "How to generate random matrices from the classical
      compact groups").
    """
    if n < 1:
        raise LlmquantError(f"orthogonal_fallback needs n >= 1, got n={n}")
    if kind == "block_diagonal":
        d = largest_constructible_divisor(n)
        return torch.kron(torch.eye(n // d, dtype=torch.float64), hadamard_matrix(d) / math.sqrt(d))
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1.0
        return q * signs
    raise LlmquantError(f"unknown fallback kind {kind!r}: use 'block_diagonal' or 'random'")


def orthogonal_for(n: int, fallback: FallbackKind | None = None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(H_n / sqrt(n), description) if constructible, else the fallback (or LlmquantError when fallback is None)."""
    plan = _plan_or_none(n)
    if plan is not None:
        return hadamard_matrix(n) / math.sqrt(n), f"hadamard({n} = {plan.describe()})"
    if fallback is None:
        raise _no_construction_error(n)
    matrix = orthogonal_fallback(n, fallback, seed=seed)
    if fallback == "block_diagonal":
        d = largest_constructible_divisor(n)
        return matrix, f"block_diagonal({n // d} x hadamard({d}))"
    return matrix, f"random_orthogonal(n={n}, seed={seed})"


def hadamard_kronecker_factors(n: int, largest: int = 128) -> tuple[torch.Tensor, ...]:
    """Float64 +-1 matrices F_1, ..., F_r with H_n = F_1 (x) ... (x) F_r: the core H_m (when m > 1), then
    Sylvester blocks H_{2^j} of at most ``largest`` rows (H_{2^(a+b)} = H_{2^a} (x) H_{2^b})."""
    plan = hadamard_plan(n)
    factors = [_core_matrix(plan.m)] if plan.m > 1 else []
    k, step = plan.k, max(1, int(math.log2(largest)))
    while k > 0:
        factors.append(_sylvester(1 << min(k, step)))
        k -= min(k, step)
    return tuple(factors) if factors else (torch.ones(1, 1, dtype=torch.float64),)


def kronecker_transform(x: torch.Tensor, factors: tuple[torch.Tensor, ...], scale: float = 1.0) -> torch.Tensor:
    """y = scale * (F_1 (x) ... (x) F_r) v for every vector v along x's last dimension, one matrix product per
    factor (the index of v read as digits (i_1, ..., i_r), i_1 the most significant), in the factors' dtype.

    The same result as `fast_hadamard_transform` with the factors of `hadamard_kronecker_factors`, at matrix
    product speed: O(n * sum(sizes)) multiply-adds instead of O(n log n) adds, but a few large products
    instead of 2 log2(n) memory-bound passes, which is faster on a CPU for the sizes of online rotations.
    """
    n = x.shape[-1]
    rows = x.numel() // max(n, 1)
    y = x.reshape(rows, n).to(factors[0].dtype)
    before = 1
    for i, factor in enumerate(factors):
        size = factor.shape[0]
        after = n // (before * size)
        if i == 0 and scale != 1.0:
            factor = factor * scale
        if after == 1:  # the last digit: a plain product on the right
            y = y.reshape(-1, size) @ factor.T
        else:
            y = torch.matmul(factor, y.reshape(rows * before, size, after))
        before *= size
    return y.reshape(x.shape)


@lru_cache(maxsize=32)
def normalized_kronecker_factors(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """H_n's Kronecker factors (`hadamard_kronecker_factors`) in float32 on ``device``, the first one carrying the
    1/sqrt(n) normalisation, for `kronecker_transform` (built once per size and device)."""
    first, *rest = hadamard_kronecker_factors(n)
    return tuple(f.float().to(device) for f in (first / math.sqrt(n), *rest))


# ----------------------------------------------------------------------------------------------------------------
# Fast transform
# ----------------------------------------------------------------------------------------------------------------


def fast_hadamard_transform(
    x: torch.Tensor, n: int | None = None, *, transpose: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Apply the normalised Hadamard matrix along the last dimension of x.

    With H = hadamard_matrix(n) (n = x.shape[-1] by default) this returns

        y = x @ H^T / sqrt(n)     (each row vector v becomes H v / sqrt(n)),    or
        y = x @ H / sqrt(n)       with transpose=True, the inverse of the former (H^T H = n I).

    Writing the last index as i = a * 2^k + b (a < m, b < 2^k), H = H_m (x) H_{2^k} acts as
    Y = H_m X H_{2^k} on the [m, 2^k] view X of a vector: H_{2^k} (symmetric) is applied as k butterfly stages
    (u, v) -> (u + v, u - v), O(n k) adds, and H_m (or H_m^T) as one dense m x m product, O(n m).
    Computes in `dtype` (default: float64 for float64 input, else float32) and returns x's dtype. Uses two
    preallocated buffers; when x requires grad (and grad mode is on) it takes an out-of-place path instead.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise LlmquantError(f"fast_hadamard_transform: last dimension is {x.shape[-1]}, expected n={n}")
    if not x.is_floating_point():
        raise LlmquantError(f"fast_hadamard_transform needs a floating-point tensor, got {x.dtype}")
    plan = hadamard_plan(n)
    compute = dtype if dtype is not None else (torch.float64 if x.dtype == torch.float64 else torch.float32)
    size = 1 << plan.k
    y = x.reshape(-1, n).to(compute)  # read-only: the first stage writes into a fresh buffer
    rows = y.shape[0]
    if torch.is_grad_enabled() and x.requires_grad:  # out-of-place ops, so autograd can follow
        h = 1
        while h < size:
            pairs = y.reshape(-1, 2, h)
            y, h = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1), 2 * h
        y = y.reshape(rows, plan.m, size)
        if plan.m > 1:
            core = _core_matrix(plan.m).to(device=y.device, dtype=compute)
            y = (core.T if transpose else core) @ y
        return (y.reshape(x.shape) * (1.0 / math.sqrt(n))).to(x.dtype)
    buffers = [torch.empty(y.shape, dtype=compute, device=y.device) for _ in range(2)]  # ping-pong, no aliasing of x
    h = 1
    while h < size:  # stage with half-width h: I (x) H_2 (x) I_h on each length-2^k segment
        out = buffers[1] if y is buffers[0] else buffers[0]
        src, dst = y.reshape(-1, 2, h), out.view(-1, 2, h)
        torch.add(src[:, 0], src[:, 1], out=dst[:, 0])
        torch.sub(src[:, 0], src[:, 1], out=dst[:, 1])
        y, h = out, 2 * h
    out = buffers[1] if y is buffers[0] else buffers[0]
    if plan.m > 1:
        core = _core_matrix(plan.m).to(device=y.device, dtype=compute)
        core = core.T if transpose else core
        y = torch.matmul(core, y.reshape(rows, plan.m, size), out=out.view(rows, plan.m, size))
    elif plan.k == 0:  # n = 1: H = [1]
        y = out.copy_(y)
    y = y.reshape(x.shape).mul_(1.0 / math.sqrt(n))
    return y.to(x.dtype)

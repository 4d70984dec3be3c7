"""One thread: a Hadamard rotation of rows by `Rotation.apply` (the float64 butterfly), by the float64 Kronecker
products, and by `Rotation.apply_float32` (float32 Kronecker products), medians of 7; whether the float64 products
give the butterfly's float32 values, and the float32 path's largest difference relative to the largest value.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quantize_profile_2026-12-05/rotation_timing.py
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from llmquant.quant.hadamard import hadamard_kronecker_factors, kronecker_transform
from llmquant.quant.rotation import Rotation


def median_ms(run: Callable[[], object], repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main() -> None:
    torch.set_num_threads(1)
    for n, rows in ((576, 1024), (576, 1536), (1536, 576), (576, 192), (1536, 1024)):
        rotation = Rotation(kind="hadamard", n=n)
        x = torch.randn(rows, n)
        factors = hadamard_kronecker_factors(n)

        def products64(x: torch.Tensor = x, factors: tuple = factors, n: int = n) -> torch.Tensor:
            return kronecker_transform(x.double(), factors).mul_(1 / math.sqrt(n)).float()

        exact, fast = rotation.apply(x), rotation.apply_float32(x)
        print(n, rows, f"butterfly64 {median_ms(lambda r=rotation, x=x: r.apply(x)):.2f} ms",
              f"kron64 {median_ms(products64):.2f}",
              f"apply_float32 {median_ms(lambda r=rotation, x=x: r.apply_float32(x)):.2f}",
              "kron64==butterfly", torch.equal(exact, products64()),
              f"apply_float32 maxrel {float((fast - exact).abs().max() / exact.abs().max()):.1e}")


if __name__ == "__main__":
    main()

"""The AVX2 op's `avx2_gemm` built from an earlier commit's source (tiles of 3 rows) against this checkout's (tiles of
6), and float32's F.linear, at the default model's shapes, by rows: each call on the next of 6 weights, the three
alternating, medians of 10 rounds; every product checked against the float32 product of the codes (the same bits).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/speed_2026-12-07_epyc_avx2_after/tiles_ab.py [REV]
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from llmquant.nn import int8_gemv

SOURCES = ("int8_gemv_avx2.cpp", "block_codes.h", "int8_ops_common.h")
SHAPES = ((576, 1536), (1536, 576), (576, 576), (576, 192))


def op_at(revision: str) -> object:
    """The AVX2 op built from ``revision``'s sources, under its own name."""
    folder = Path(tempfile.mkdtemp())
    for name in SOURCES:
        text = subprocess.run(["git", "show", f"{revision}:src/llmquant/nn/{name}"], check=True, capture_output=True,
                              text=True).stdout
        (folder / name).write_text(text)
    return cpp_extension.load(name=f"avx2_op_{revision}", sources=[str(folder / SOURCES[0])],
                              extra_cflags=int8_gemv.AVX2_FLAGS, extra_ldflags=["-fopenmp"])


def main() -> None:
    revision = sys.argv[1] if len(sys.argv) > 1 else "12e722f"
    feigned = dataclasses.replace(int8_gemv.cpu_features(), vnni=False, amx=False)
    int8_gemv.cpu_features = lambda: feigned  # (this process only: the op where it can run)
    ops = {"tiles of 3": op_at(revision), "tiles of 6": int8_gemv.avx2_kernel(torch.empty(0))}
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 4, 8, 16, 64, 512):
        for inputs, outputs in SHAPES:
            compare(ops, rows, inputs, outputs, generator)


def compare(ops: dict[str, object], rows: int, inputs: int, outputs: int, generator: torch.Generator) -> None:
    """One shape: every op's product checked, then timed against float32's, alternating."""
    weights = [torch.randint(-128, 128, (outputs, inputs), generator=generator, dtype=torch.int8) for _ in range(6)]
    floats = [w.float() for w in weights]
    s_x, s_w = torch.rand(rows, 1) + 0.5, torch.rand(1, outputs) + 0.5
    packs = [int8_gemv.avx2_gemm_pack(w, s_w, 0) for w in weights]
    x = torch.randint(-128, 128, (rows, inputs), generator=generator, dtype=torch.int8)
    x_float = x.float()
    expected = (x_float @ floats[0].T).mul_(s_x * s_w)
    calls = {"float32": lambda i: torch.nn.functional.linear(x_float, floats[i])}
    for name, op in ops.items():
        assert torch.equal(int8_gemv.avx2_gemm(op, x, packs[0], s_x, None, outputs), expected), name
        calls[name] = lambda i, op=op: int8_gemv.avx2_gemm(op, x, packs[i], s_x, None, outputs)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(12):
        for name, call in calls.items():
            start = time.perf_counter()
            for i in range(6):
                call(i)
            if round_ > 1:
                times[name].append((time.perf_counter() - start) / 6 * 1e6)
    us = {name: statistics.median(values) for name, values in times.items()}
    print(f"{rows:4d} rows, {inputs:5d} -> {outputs:5d}: " + ", ".join(
        f"{name} {value:9.1f} us" + ("" if name == "float32" else f" ({us['float32'] / value:4.2f}x)")
        for name, value in us.items()), flush=True)

if __name__ == "__main__":
    main()

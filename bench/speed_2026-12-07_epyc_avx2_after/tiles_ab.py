"""The AVX2 op's `avx2_gemm` built from an earlier commit's source (tiles of 3 rows) against this checkout's (tiles of
6), and float32's F.linear, at the default model's shapes, by rows: each call on the next of 6 weights, the three
alternating, medians of 10 rounds; every product checked against the float32 product of the codes (the same bits):
`scripts/runtime_profile.py`'s `avx2_shape`.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/speed_2026-12-07_epyc_avx2_after/tiles_ab.py [REV]
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

from llmquant.nn import int8_gemv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from runtime_profile import avx2_shape

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
            avx2_shape(ops, rows, inputs, outputs, 6, 10, generator)


if __name__ == "__main__":
    main()

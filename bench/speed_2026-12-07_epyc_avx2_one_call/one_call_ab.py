"""A decode step's Linears on an AVX2 CPU without VNNI, one call of the op each (BENCHMARKS.md "One call of the op a
Linear on AVX2"): the float32 default model, a checkpoint as the runtime now runs it and the same checkpoint as it ran
at 03d2703, decode steps (or, ``--prefill``, 512-token prefills) alternating, medians.

- W4 (W3, W2) weight-only: now each Linear's `Int16Rows`, one call of the op's ``int16_linear``; before, each call
  through `int4_linear` and `int16_linear`'s two calls from Python (``int16_token_codes``, ``int8_gemm``).
- W8A8 with per-token inputs or a static scale: now up to 4 rows one call of ``token_linear`` (`avx2_token_linear`) or
  ``static_linear`` (`avx2_static_linear`); before, the codes through `shared_input_codes` (static: torch's
  operations), then the product, two steps from Python.
- W8A8 with a static scale, more rows (a prefill): now the codes by the op's ``static_codes``; before, by torch's
  operations (`int8_codes`).

    PYTHONPATH=src .venv/bin/python bench/speed_2026-12-07_epyc_avx2_one_call/one_call_ab.py /tmp/ck/w4_g64 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

import llmquant
from llmquant.nn import int4_linear, int8_linear
from llmquant.nn.int8_gemv import int16_token_codes
from llmquant.nn.int8_linear import DecodeRows, int8_codes
from llmquant.nn.quant_linear import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from runtime_profile import alternating_prefills, alternating_steps

NOW = int4_linear.int16_linear, int8_linear.static_codes


def two_calls(rows: torch.Tensor, weight: int4_linear.Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`int16_linear` as it was at 03d2703: the codes, then the product, each a call of the op from Python."""
    codes, scale = int16_token_codes(weight.int16_weight.op, rows.float())
    return weight.int16_weight(codes, scale, bias)


def torch_static_codes(op: object, rows: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Static codes as the AVX2 path made them at 03d2703: torch's operations."""
    return int8_codes(rows, None, scale, qmin, qmax)[0]


def use(name: str) -> None:
    """The module functions of ``name``'s code (the records of its Linears are its own: `as_before`)."""
    int4_linear.int16_linear, int8_linear.static_codes = (two_calls, torch_static_codes) if name == "before" else NOW


def as_before(model: torch.nn.Module) -> None:
    """The Linears' records as 03d2703 had them (resolved by a first forward)."""
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    for module in model.modules():
        if isinstance(module, QuantLinear):
            if isinstance(module._decode_rows, int4_linear.Int16Rows):
                module._decode_rows = False  # (kept until set_runtime: every call through int4_linear)
            elif isinstance(module._decode_rows, DecodeRows):
                module._decode_rows = dataclasses.replace(module._decode_rows, one_call_values=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64, help="decode steps (or, --prefill, rounds)")
    parser.add_argument("--prefill", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {"float32": llmquant.load(None, device="cpu")[0], "now": llmquant.load(args.model, device="cpu")[0],
              "before": llmquant.load(args.model, device="cpu")[0]}
    as_before(models["before"])
    if args.prefill:
        what, medians = "512-token prefill", alternating_prefills(models, 1, args.steps, use)
    else:
        what, medians = "decode step after 512 tokens", alternating_steps(models, 1, args.steps, use)
    print(f"{args.model}, threads {args.threads}, batch 1, {what} (median of {args.steps}): "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
          + "; float32 / quantized: " + ", ".join(f"{name} {medians['float32'] / ms:.3f}"
                                                  for name, ms in medians.items() if name != "float32"))


if __name__ == "__main__":
    main()

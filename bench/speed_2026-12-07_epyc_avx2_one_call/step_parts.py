"""Where a decode step at batch 1 goes (BENCHMARKS.md "One call of the op a Linear on AVX2"): a checkpoint's (or, with
``float``, the float32 default model's) step after a 512-token prefill, whole, with the head's product replaced by a
kept tensor of zeros, and with every Linear's replaced so (what is left: norms, rotary, attention, the cache, Python),
the three alternating step by step, medians of 40; then 20 steps with the quantized Linears' calls and their ops'
calls timed (`call_op` of `llmquant.nn.int8_gemv`, `int4_linear` and `int8_linear`; the attention op's calls, made
from `llmquant.nn.causal_blocks`, are not counted).

    PYTHONPATH=src .venv/bin/python bench/speed_2026-12-07_epyc_avx2_one_call/step_parts.py /tmp/ck/w4_g64 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import llmquant
from llmquant.nn import int4_linear, int8_gemv, int8_linear
from llmquant.nn.quant_linear import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from runtime_profile import cache_argument, returned_cache

MODES = ("whole", "without the head's product", "without any Linear's product")


def stubbed(real, mode: dict[str, str], head: int):
    """A Linear's forward that, as ``mode`` says, runs ``real`` or returns kept zeros of the output's shape."""
    zeros: dict[tuple, torch.Tensor] = {}

    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        kept = mode["now"] == MODES[0] or (mode["now"] == MODES[1] and self.out_features != head)
        if kept:
            return real(self, x)
        key = (*x.shape[:-1], self.out_features)
        return zeros.setdefault(key, torch.zeros(key))
    return forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = llmquant.load(None if args.model == "float" else args.model, device="cpu")[0]
    ids = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(0))
    mode = {"now": MODES[0]}
    head = model.lm_head.out_features
    real = {cls: cls.forward for cls in (QuantLinear, torch.nn.Linear)}
    for cls, forward in real.items():
        cls.forward = stubbed(forward, mode, head)
    times: dict[str, list[float]] = {name: [] for name in MODES}
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token, arg = returned_cache(out), out.logits[:, -1:].argmax(-1), cache_argument(model)
        for _ in range(40):
            for name in MODES:  # (each step adds a position to the cache: three a round)
                mode["now"] = name
                start = time.perf_counter()
                out = model(token, **{arg: cache}, use_cache=True)
                times[name].append(time.perf_counter() - start)
                cache = returned_cache(out)
        mode["now"] = MODES[0]
        print(f"{args.model}, threads {args.threads}, decode step at batch 1 after 512 tokens (medians of 40): "
              + ", ".join(f"{name} {statistics.median(values) * 1e3:.2f} ms" for name, values in times.items()))
        spent = {"Linears' calls": 0.0, "ops' calls": 0.0}

        def timed_linear(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            y = real[QuantLinear](self, x)
            spent["Linears' calls"] += time.perf_counter() - start
            return y

        def timed_op(op: object, name: str, *arguments: object) -> object:
            start = time.perf_counter()
            y = getattr(op, name)(*arguments)
            spent["ops' calls"] += time.perf_counter() - start
            return y

        QuantLinear.forward = timed_linear
        for module in (int8_gemv, int4_linear, int8_linear):
            module.call_op = timed_op
        start = time.perf_counter()
        for _ in range(20):
            cache = returned_cache(model(token, **{arg: cache}, use_cache=True))
        step = (time.perf_counter() - start) / 20
        print(f"20 steps: {step * 1e3:.2f} ms a step, of which " + ", ".join(
            f"{name} {total / 20 * 1e3:.2f} ms" for name, total in spent.items()))


if __name__ == "__main__":
    main()

"""Where the CPU runtime spends its time: the figures of BENCHMARKS.md's "Speed on a quiet machine".

    .venv/bin/python scripts/runtime_profile.py layer                 # W8A8 and W4 Linears against float32, by rows
    .venv/bin/python scripts/runtime_profile.py profile [--model DIR] [--attention blocks] [--batch 8]  # profiler
    .venv/bin/python scripts/runtime_profile.py compile --model DIR   # a prefill with and without LLMQUANT_COMPILE
    .venv/bin/python scripts/runtime_profile.py kernels --model DIR   # W8A8: oneDNN, torch._int_mm, the decode op
    .venv/bin/python scripts/runtime_profile.py kv --model KV_DIR --baseline DIR [--batch 8]  # the KV caches
    .venv/bin/python scripts/runtime_profile.py decode --model DIR [--batch 4]  # decode with the op and without
    .venv/bin/python scripts/runtime_profile.py prefill --model DIR [--batch 8]  # prefill with the op and without
    .venv/bin/python scripts/runtime_profile.py dequant             # the KV cache's and W4's dequantization
    .venv/bin/python scripts/runtime_profile.py ops                 # the decode op's scaling and KV update alone
    .venv/bin/python scripts/runtime_profile.py kvlayer             # one INT8 KV cache layer's decode step (any op)
    .venv/bin/python scripts/runtime_profile.py onednn              # oneDNN's int8 linear: its kernel, its time
    .venv/bin/python scripts/runtime_profile.py prefetch --model DIR  # the op's prefetch of weight rows, on / off
    .venv/bin/python scripts/runtime_profile.py rows                # the op's row rules: DecodeRows, W4A8, W8A16
    .venv/bin/python scripts/runtime_profile.py avx2                # the AVX2 op against float32, by rows
    python scripts/runtime_profile.py fp8 [--device cuda]             # FP8 W8A8 on torch._scaled_mm, by rows
    .venv/bin/python scripts/runtime_profile.py groups              # W4A4 with inputs in groups, by rows
    .venv/bin/python scripts/runtime_profile.py rotation            # a randomized online Hadamard, by rows
    .venv/bin/python scripts/runtime_profile.py shared --model DIR  # online rotations shared by q/k/v, gate/up, or not
    .venv/bin/python scripts/runtime_profile.py search              # the clip search and one SmoothQuant scoring
    .venv/bin/python scripts/runtime_profile.py attention [--batch 8]  # causal prefill attention: sdpa, blocks, the op
    .venv/bin/python scripts/runtime_profile.py decodeattention --model DIR [--batch 8]  # decode: sdpa or the op
    .venv/bin/python scripts/runtime_profile.py machine             # int8 and float32 product rates, copy rates
    .venv/bin/python scripts/runtime_profile.py w4rows              # W4 Linears: the decode op against torch's kernel

``--threads`` (default 2). ``layer`` times ``QuantLinear`` on the int8 runtime (per-channel int8 weights with
per-token int8 inputs; 4-bit weights in groups of 64, alone and with per-token int8 inputs) and ``nn.Linear`` at 1
to 512 rows, medians of 200 calls;
run it against an older commit with
``git worktree add /tmp/old REV && PYTHONPATH=/tmp/old/src .venv/bin/python scripts/runtime_profile.py layer``.
``profile`` prints the top operators by self CPU time of one 512-token prefill at batch 1 (the last logit only, as
generation computes it) and of 8 decode steps, for a checkpoint or (no ``--model``) the float32 default model.
``kernels`` (a W8A8 checkpoint) times oneDNN's product, ``torch._int_mm`` and (up to 8 rows, where it runs) the decode
op of `llmquant.nn.int8_gemv` on every layer's codes, by projection and rows (each call on the next layer's weight,
as in a forward: the median over 5 sweeps of the per-layer mean), then a 512-token prefill and 16 decode steps at
batch 1 with ``_int_mm`` only, with the rows rule of `llmquant.nn.int8_linear.int8_product` (oneDNN from 128 rows,
the decode op up to 2), and with oneDNN at every shape, alternating (each after one untimed generation that packs
the weights again), 8 rounds after a warm-up one, medians.
``compile`` alternates 5 prefills of the checkpoint at ``--batch`` with the compiled kernel and without it.
``fp8`` times an FP8 per-channel / per-token `QuantLinear` on ``torch._scaled_mm`` (forced onto the operator even on
the CPU, where `set_runtime` keeps the simulation) and its simulation against the float Linear (float32 on the CPU,
bfloat16 on CUDA), at the default model's shapes and, on CUDA, Llama-3-8B's.
``groups`` times the W4A4 Linear with inputs per token in groups of 32 and 64 (clip grid 1.0 .. 0.8; one integer
product per group, `llmquant.nn.int8_linear.input_grouped_linear`) against fake-quantized inputs times the
dequantized weight (the same function in another order of float32 operations) and the float32 Linear.
``rotation`` times a randomized Hadamard online (`OnlineRotation`: its signs and +-1 Kronecker factors in float64)
against `Rotation.apply` (the float64 butterfly) at 64, 192, 576 and 1536 columns, 1, 8 and 512 rows, medians of
200 calls (21 at 512 rows).
``search`` times two searches of quantization (not of inference): `searched_clip_ratios` (a grid of five, 4-bit,
per token or in blocks of 32) on random rows of the default model's widths, and one `quantized_group_error` of a
q/k/v group of its shapes behind an online Hadamard (4-bit per-token inputs with a clip grid, weights in groups of
32, 2048 tokens), medians of 15 and 7 calls; it prints the ratios' and the error's checksums, which another commit's
code (``PYTHONPATH`` into a ``git worktree``, as for ``layer``) must match.
``attention`` times a causal prefill's attention at the default model's heads (9 query and 3 KV heads of 64) from
128 to 4,096 positions (767 and 768: either side of `MAX_POSITIONS`) at ``--batch``, the query laid out as transformers
passes it: torch's sdpa (``is_causal``) against one sdpa call per block (`sdpa_blocks`) and the op
(`causal_block_attention`, where it runs) in blocks of 32, 64 (`BLOCK`) and 128 query rows, alternating, medians of
15 rounds after an untimed one, with the largest difference from sdpa's output; beside them sdpa without a mask (the
whole square) and sdpa (causal) on the same values in bfloat16.
``machine`` times ``torch._int_mm`` against float32's ``F.linear`` at the default model's shapes (512 and 4096 rows)
and a copy of 64 and 8 MiB: the rates that tell two CPUs of one name apart.
``kv`` prefills 512 tokens at ``--batch`` in two checkpoints that differ only by the INT8 KV cache (the same scheme
with and without it; the first loaded twice: its attention reading the int8 codes at decode steps, and reading the
dequantized cache; the second too: the int8 runtime's float stores, `FloatCacheLayer`, and transformers' layers),
then times 64 decode steps of each, alternating step by step, and prints the medians and the mean
time per step of the KV cache's work (the cache layers' updates, the attention functions, the INT8 cache's pre-hooks).
``decode`` does the same for the float32 model and a W8A8 checkpoint with and without the decode op of
`llmquant.nn.int8_gemv` (``LLMQUANT_GEMV``), and the checkpoints of ``--also`` with it; ``prefill`` alternates
prefills of the float32 model and of the checkpoint with the op (its input codes and its scaling of oneDNN's
products) and with torch's operations.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import llmquant
from llmquant.evaluation.bench import median_seconds
from llmquant.nn.attention_choice import ATTENTIONS
from llmquant.nn.int8_gemv import kv_kernel
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.kv_storage import (
    FloatCacheLayer,
    Int8CacheLayer,
    cache_argument,
    returned_cache,
    set_kv_cache_runtime,
)
from llmquant.nn.online_rotation import OnlineRotation
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.quant.primitives import fake_quantize
from llmquant.quant.rotation import Rotation
from llmquant.quant.scheme import scheme_from_name

SHAPES = ((576, 1536), (1536, 576), (576, 576))  # the default model's gate/up, down and q/o projections


def median_us(call: Callable[[], object], repeats: int = 200) -> float:
    return median_seconds(call, repeats, warmups=10) * 1e6


def layer() -> None:
    """W8A8 (int8 GEMM), W4 g64 asymmetric (int4 kernel / bfloat16 GEMM; int16 on AVX2) and W4A8 g64 (int8 products
    by group) Linears against float32, by rows."""
    for name, group in (("w_int8_per_channel_a_int8_per_token_dynamic", None), ("w_uint4_per_group_asym", 64),
                        ("w_int4_per_group_sym_a_int8_per_token_dynamic", 64)):
        scheme = scheme_from_name(name, group_size=group)
        for inputs, outputs in SHAPES:
            linear = torch.nn.Linear(inputs, outputs, bias=False)
            quantized = QuantLinear.from_linear(linear, scheme.weights, scheme.input_activations)
            set_runtime(quantized, "int8")
            for rows in (1, 8, 16, 32, 64, 512):
                x = torch.randn(rows, inputs)
                with torch.no_grad():
                    float_us = median_us(lambda linear=linear, x=x: linear(x))
                    quantized_us = median_us(lambda quantized=quantized, x=x: quantized(x))
                print(f"{name}: {inputs} -> {outputs}, {rows} rows: float32 {float_us:8.1f} us, quantized "
                      f"{quantized_us:8.1f} us, ratio {float_us / quantized_us:5.2f}")


def profile(model_dir: str | None, attention: str, batch: int, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    model, _ = llmquant.load(model_dir, device="cpu", attention=attention)
    ids = torch.randint(0, 1000, (batch, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, logits_to_keep=1)
        with profiler(activities=[ProfilerActivity.CPU]) as prefill:
            out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token, argument = returned_cache(out), out.logits[:, -1:].argmax(-1), cache_argument(model)
        for _ in range(3):
            cache = returned_cache(model(token, **{argument: cache}, use_cache=True))
        with profiler(activities=[ProfilerActivity.CPU]) as decode:
            for _ in range(8):
                cache = returned_cache(model(token, **{argument: cache}, use_cache=True))
    for what, result in ((f"prefill, 512 tokens, batch {batch}", prefill), (f"8 decode steps, batch {batch}", decode)):
        print(what)
        print(result.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def kernel_calls(layers: list[tuple[str, QuantLinear]]) -> None:
    """oneDNN, ``_int_mm`` and the decode op on every layer's weight, by projection and rows (`kernels`)."""
    from llmquant.nn import int8_gemv, int8_linear

    weights = {id(m): int8_linear.Int8Weight(m.weight, True) for _, m in layers}
    decode_op = int8_gemv.cpu_kernel(torch.empty(0))
    row_sums, unit = {id(m): int8_gemv.weight_row_sums(m.weight) for _, m in layers}, torch.ones(1, 1)
    kinds = list(dict.fromkeys(kind for kind, _ in layers))
    for rows in (1, 2, 4, 8, 64, 512):
        figures = []
        products = {"oneDNN": lambda x, m: int8_linear.onednn_product(x, weights[id(m)]),
                    "_int_mm": lambda x, m: torch._int_mm(x, m.weight.t())}
        if decode_op is not None and rows <= 8:
            products["decode op"] = lambda x, m: int8_gemv.gemv_linear(decode_op, x, m.weight, row_sums[id(m)], unit,
                                                                        unit, None)
        for kind in kinds:
            of_kind = [m for k, m in layers if k == kind]
            codes = [torch.randint(-127, 128, (rows, m.in_features), dtype=torch.int8) for m in of_kind]
            for label, product in products.items():
                sweeps = []
                for _ in range(5):
                    start = time.perf_counter()
                    for x, m in zip(codes, of_kind, strict=True):
                        product(x, m)
                    sweeps.append((time.perf_counter() - start) / len(of_kind))
                figures.append(f"{kind} {label} {statistics.median(sweeps) * 1e6:.0f}")
        print(f"{rows} rows (us a call): " + ", ".join(figures))


def kernels(model_dir: str) -> None:
    from llmquant.evaluation.bench import time_generation
    from llmquant.nn import int8_linear

    model, _ = llmquant.load(model_dir, device="cpu")
    layers = [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    kernel_calls(layers)
    ids = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(0))

    def generation(steps: int) -> tuple[float, float]:
        """Seconds of the prefill and of one decode step (the mean of ``steps``)."""
        prefill, decode = time_generation(model, ids, steps)
        return prefill, decode / max(steps, 1)

    rule = int8_linear.ONEDNN_MIN_ROWS
    modes = {"_int_mm only": ("0", rule, "0"), "rows rule": ("1", rule, "1"), "oneDNN always": ("1", 0, "0")}
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    for round_ in range(9):  # the first round warms up
        for mode, (flag, min_rows, gemv_flag) in modes.items():
            os.environ["LLMQUANT_ONEDNN"] = flag
            os.environ["LLMQUANT_GEMV"] = gemv_flag
            int8_linear.ONEDNN_MIN_ROWS = min_rows
            for _, m in layers:
                m.drop_caches()
            generation(1)  # (packs the weights again)
            if round_:
                times[mode].append(generation(16))
    for mode, results in times.items():
        print(f"{mode}: prefill {statistics.median(r[0] for r in results) * 1e3:.0f} ms, decode step "
              f"{statistics.median(r[1] for r in results) * 1e3:.1f} ms")


def compiled_against_eager(model_dir: str, batch: int) -> None:
    model, _ = llmquant.load(model_dir, device="cpu")
    ids = torch.randint(0, 1000, (batch, 512), generator=torch.Generator().manual_seed(0))

    def prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"1": [], "0": []}
    for flag in times:  # warm up both (the first compiled call compiles)
        os.environ["LLMQUANT_COMPILE"] = flag
        prefill()
    for _ in range(5):
        for flag in times:
            os.environ["LLMQUANT_COMPILE"] = flag
            times[flag].append(prefill())
    print(f"prefill of {batch} x 512 tokens: compiled {statistics.median(times['1']) * 1e3:.1f} ms, "
          f"eager {statistics.median(times['0']) * 1e3:.1f} ms")


def alternating_steps(models: dict[str, torch.nn.Module], batch: int, steps: int = 64,
                      before: Callable[[str], None] = lambda name: None) -> dict[str, float]:
    """Median milliseconds of a decode step of each model after a 512-token prefill at ``batch``, the models
    alternating step by step (the machine's slow and fast phases fall on all of them); ``before(name)`` runs
    before each of a model's steps, untimed."""
    ids = torch.randint(0, 1000, (batch, 512), generator=torch.Generator().manual_seed(0))
    state, times = {}, {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():
            out = model(ids, use_cache=True, logits_to_keep=1)
            state[name] = (returned_cache(out), out.logits[:, -1:].argmax(-1))
        for _ in range(steps):
            for name, model in models.items():
                cache, token = state[name]
                before(name)
                start = time.perf_counter()
                out = model(token, **{cache_argument(model): cache}, use_cache=True)
                times[name].append(time.perf_counter() - start)
                state[name] = (returned_cache(out), out.logits[:, -1:].argmax(-1))
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def decode_attention(model_dir: str, batch: int, steps: int = 48) -> None:
    """A checkpoint's decode steps with a float KV cache, its attention as transformers runs it (sdpa) and in blocks
    (`llmquant.nn.causal_blocks`: a decode step on the attention op where it runs), alternating step by step."""
    models = {choice: llmquant.load(model_dir, device="cpu", attention=choice)[0] for choice in ("model", "blocks")}
    medians = alternating_steps(models, batch, steps)
    model, blocks = medians["model"], medians["blocks"]
    print(f"decode step at batch {batch} after 512 tokens (median of {steps}): attention 'model' {model:.2f} ms, "
          f"'blocks' {blocks:.2f} ms ({model / blocks:.3f}x)")


PLAIN_LAYERS = "float KV, transformers' layers"


def kv_decode(model_dir: str, baseline_dir: str, batch: int, steps: int = 64) -> None:
    """Decode steps, alternating, of the same scheme with a float cache (``baseline_dir``: the int8 runtime's stores
    that grow in place, `FloatCacheLayer`, and transformers' own layers, which copy the cache at every step) and with
    the INT8 KV cache (``model_dir``) whose attention reads the int8 codes at decode steps (`Int8CacheLayer.attend`,
    where the decode op runs) or reads the dequantized cache (the check of `KVCacheQuantizer.passes_cache_untouched`
    pinned to False)."""
    models = {name: llmquant.load(path, device="cpu")[0] for name, path in (
        ("int8 KV", model_dir), ("int8 KV dequantized", model_dir), ("float KV", baseline_dir),
        (PLAIN_LAYERS, baseline_dir))}
    for module in models["int8 KV dequantized"].modules():
        if isinstance(module, KVCacheQuantizer):
            module.passes_cache_untouched = False
    set_kv_cache_runtime(models[PLAIN_LAYERS], "fake")  # (the int8 runtime's: `FloatCacheLayer`)
    with timed_cache_parts(models) as parts:
        medians = alternating_steps(models, batch, steps, before=parts.start)
    with torch.no_grad():
        cache = returned_cache(models["int8 KV"](torch.zeros(1, 4, dtype=torch.long), use_cache=True))
    stored = any(isinstance(layer, Int8CacheLayer) for layer in cache.layers)
    reads = [m.passes_cache_untouched for m in models["int8 KV"].modules() if isinstance(m, KVCacheQuantizer)]
    print(f"decode step at batch {batch} after 512 tokens (median of {steps}; int8 cache layers: {stored}; attention "
          f"over the codes: {all(reads) and kv_kernel(torch.empty(0)) is not None}): "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
          + "; float KV / int8 KV: " + ", ".join(f"{name.removeprefix('int8 KV').strip() or 'codes read'} "
                                                 f"{medians['float KV'] / ms:.3f}"
                                                 for name, ms in medians.items() if name.startswith("int8 KV"))
          + f"; {PLAIN_LAYERS} / float KV (the runtime's stores): {medians[PLAIN_LAYERS] / medians['float KV']:.3f}")
    print("the KV cache's work in a step (mean ms over the steps): " + "; ".join(
        f"{name}: " + ", ".join(f"{part} {ms:.3f}" for part, ms in parts.per_step(name).items())
        + f", all {sum(parts.per_step(name).values()):.3f}" for name in models))


class CacheParts:
    """Seconds of each part of the KV cache's work (the cache layers' updates, the attention functions, the INT8 cache's
    pre-hooks), by model: ``start(name)`` before each of a model's steps (`alternating_steps`' ``before``)."""

    def __init__(self, models: dict[str, torch.nn.Module]) -> None:
        self.seconds: dict[str, dict[str, float]] = {name: {} for name in models}
        self.steps: dict[str, int] = dict.fromkeys(models, 0)
        self.current: str | None = None
        self.depth = 0  # timed calls under way: one inside another (sdpa inside llmquant's wrapper) counts in the outer

    def start(self, name: str) -> None:
        self.current = name
        self.steps[name] += 1

    def timed(self, part: str, function: Callable) -> Callable:
        def call(*args, **kwargs):
            if self.depth:
                return function(*args, **kwargs)
            start, self.depth = time.perf_counter(), 1
            try:
                return function(*args, **kwargs)
            finally:
                self.depth = 0
                if self.current is not None:
                    totals = self.seconds[self.current]
                    totals[part] = totals.get(part, 0.0) + time.perf_counter() - start
        return call

    def per_step(self, name: str) -> dict[str, float]:
        return {part: total / max(self.steps[name], 1) * 1e3 for part, total in self.seconds[name].items()}


@contextlib.contextmanager
def timed_cache_parts(models: dict[str, torch.nn.Module]) -> Iterator[CacheParts]:
    """Time the cache layers' ``update`` (transformers' float layer, llmquant's INT8 one), each model's attention
    function (sdpa, or llmquant's wrapper with the INT8 layer's attention over its codes or sdpa inside: counted once,
    in the wrapper) and the INT8 cache's pre-hooks, the originals put back after."""
    parts = CacheParts(models)
    patched = [(Int8CacheLayer, "update", "INT8 layer update"), (DynamicLayer, "update", "float layer update"),
               (FloatCacheLayer, "update", "float store update")]
    originals = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in patched]
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    names = {model.config._attn_implementation for model in models.values()}
    functions = {name: mapping[name] for name in names}
    hooks = [(module._forward_pre_hooks, module._llmquant_kv_storage_hook.id)
             for model in models.values() for module in model.modules()
             if getattr(module, "_llmquant_kv_storage_hook", None) is not None]
    hook_functions = [(table, key, table[key]) for table, key in hooks]
    try:
        for owner, attribute, part in patched:
            setattr(owner, attribute, parts.timed(part, getattr(owner, attribute)))
        for name, function in functions.items():
            mapping[name] = parts.timed(f"attention ({name})", function)
        for table, key, function in hook_functions:
            table[key] = parts.timed("pre-hook", function)
        yield parts
    finally:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)
        mapping.update(functions)
        for table, key, function in hook_functions:
            table[key] = function


def prefill_scaling(model_dir: str, batch: int, rounds: int = 7) -> None:
    """Prefills of 512 tokens at ``batch``: the float32 default model, and a checkpoint with the decode op
    (``LLMQUANT_GEMV=1``: W8A8's oneDNN products scaled by its `scale_product`; on an AVX2 CPU without VNNI, its
    products, and W4 by `llmquant.nn.int4_linear.int16_linear`) and without it (``0``: torch's operations; W4 in
    bfloat16), alternating (the variable is read at every call), medians after a warm-up round."""
    quantized = llmquant.load(model_dir, device="cpu")[0]
    models = {"float32": llmquant.load(None, device="cpu")[0], "quantized, the op": quantized,
              "quantized, without the op": quantized}

    def switch(name: str) -> None:
        os.environ["LLMQUANT_GEMV"] = "0" if name.endswith("without the op") else "1"

    medians = alternating_prefills(models, batch, rounds, switch)
    os.environ.pop("LLMQUANT_GEMV")
    print(f"prefill of {batch} x 512 tokens (median of {rounds}): "
          + ", ".join(f"{name} {ms:.0f} ms" for name, ms in medians.items())
          + "; float32 / quantized: " + ", ".join(f"{name.removeprefix('quantized, ')} {medians['float32'] / ms:.2f}"
                                             for name, ms in medians.items() if name != "float32"))


def alternating_prefills(models: dict[str, torch.nn.Module], batch: int, rounds: int,
                         before: Callable[[str], None] = lambda name: None) -> dict[str, float]:
    """Median milliseconds of a 512-token prefill at ``batch`` of each model (the last logit only, as generation
    computes it), the models alternating, ``rounds`` rounds after a warm-up one; ``before(name)`` runs before each of
    a model's prefills, untimed."""
    ids = torch.randint(0, 1000, (batch, 512), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for name, model in models.items():
                before(name)
                start = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1)
                if round_:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def decode_steps(model_dir: str, batch: int, also: list[str], steps: int = 64) -> None:
    """The float32 default model and a W8A8 checkpoint with the decode op (`llmquant.nn.int8_gemv`), with it but
    through `llmquant.nn.int8_linear.int8_linear` at every call (each layer's `DecodeRows` off), and without it
    (``LLMQUANT_GEMV=0`` when its Linears are prepared: ``torch._int_mm``; for a W4 checkpoint on an AVX2 CPU, the
    AVX2 op's `int16_linear` against torch's int4 kernel; on a VNNI CPU, its `Int4DecodeRows` against torch's int4
    kernel, per call or off), and the checkpoints ``also`` with the op, decode steps alternating."""
    models = {"float32": llmquant.load(None, device="cpu")[0]}
    runs = [("decode op", "1", model_dir), ("decode op, per-call path", "1", model_dir),
            ("without the op", "0", model_dir)]
    for name, flag, path in runs + [(os.path.basename(path.rstrip("/")), "1", path) for path in also]:
        os.environ["LLMQUANT_GEMV"] = flag  # (read when a Linear first runs: the warm-up below)
        models[name] = llmquant.load(path, device="cpu")[0]
        if name.endswith("per-call path"):
            for module in models[name].modules():
                if isinstance(module, QuantLinear):
                    module._decode_rows = False  # (kept until set_runtime)
        with torch.no_grad():
            models[name](torch.zeros(batch, 4, dtype=torch.long))
    os.environ.pop("LLMQUANT_GEMV")
    medians = alternating_steps(models, batch, steps)
    print(f"decode step at batch {batch} after 512 tokens (median of {steps}): "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
          + "; float32 / quantized: " + ", ".join(f"{name} {medians['float32'] / ms:.3f}"
                                                   for name, ms in medians.items() if name != "float32"))


def w4_rows() -> None:
    """W4 g64 (asymmetric) Linears of the default model's 30 layers (random weights), each call on the next layer's
    weight as in a forward: the layer with its `Int4DecodeRows` (the VNNI op; here up to 8 rows, past the runtime's
    `GEMV_MAX_ROWS`) against the same layer through `int4_linear` (torch's int4 kernel, ``_decode_rows`` off), by
    rows, alternating, medians of 9 passes."""
    from llmquant.nn import int4_linear, int8_gemv

    if (refusal := int8_gemv.gemv_refusal(torch.device("cpu"))) is not None:
        raise SystemExit(f"the decode op does not run here: {refusal}")
    runtime_rows, int4_linear.GEMV_MAX_ROWS = int4_linear.GEMV_MAX_ROWS, 8
    try:
        _w4_passes(runtime_rows)
    finally:
        int4_linear.GEMV_MAX_ROWS = runtime_rows


def _w4_passes(runtime_rows: int) -> None:
    scheme = scheme_from_name("w_uint4_per_group_asym", group_size=64)
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    generator = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(30):
        for inputs, outputs in shapes:
            linear = torch.nn.Linear(inputs, outputs, bias=False)
            torch.nn.init.normal_(linear.weight, std=0.02, generator=generator)
            layers.append(QuantLinear.from_linear(linear, scheme.weights, None))
    set_runtime(torch.nn.Sequential(*layers), "int8")
    decode = [layer._resolve_decode_rows() for layer in layers]
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 5, 8):
            inputs = {width: torch.randn(rows, width) for width in (576, 1536)}
            passes: dict[str, list[float]] = {"op": [], "torch": []}
            for _ in range(10):
                for path in passes:
                    for layer, rows_decode in zip(layers, decode, strict=True):
                        layer._decode_rows = rows_decode if path == "op" else False
                    start = time.perf_counter()
                    for layer in layers:
                        layer(inputs[layer.in_features])
                    passes[path].append(time.perf_counter() - start)
            op_ms, torch_ms = (statistics.median(times[1:]) * 1e3 for times in passes.values())
            print(f"{rows} rows: a pass over {len(layers)} Linears, the op {op_ms:.2f} ms, torch's int4 kernel "
                  f"{torch_ms:.2f} ms ({torch_ms / op_ms:.2f}x; the runtime runs the op up to {runtime_rows} rows)")


def prefetch(model_dir: str, batch: int, steps: int = 64) -> None:
    """The decode op's prefetch of the next 8 weight rows (`set_prefetch`) on and off: its products at one row on
    the default model's shapes (W8A8 by `int8_gemv`; the head weight-only in groups of 32 by `weight_only_gemv`),
    each call on another of weights filling 300 MB (read from memory, as in a forward), alternating, medians of
    400 calls; then decode steps after 512 tokens at ``batch`` of a W8A8 checkpoint (loaded twice), on and off,
    alternating step by step."""
    from llmquant.nn import int8_gemv

    op = int8_gemv.cpu_kernel(torch.empty(0))
    if op is None:
        raise SystemExit(f"the decode op does not run here: {int8_gemv.gemv_refusal(torch.device('cpu'))}")
    shapes = [(1536, 576, "gate/up"), (576, 1536, "down"), (576, 576, "q/o"), (192, 576, "k/v"),
              (49152, 576, "head, weight-only g32")]
    for out, inner, name in shapes:
        on_us, off_us = _prefetch_product_us(op, out, inner, weight_only=name.startswith("head"))
        print(f"{name} ({out} x {inner}) at one row, from memory: prefetch {on_us:.1f} us, none {off_us:.1f} us "
              f"({off_us / on_us:.2f}x)")
    models = {label: llmquant.load(model_dir, device="cpu")[0] for label in ("prefetch", "none")}
    medians = alternating_steps(models, batch, steps, before=lambda label: op.set_prefetch(label == "prefetch"))
    op.set_prefetch(True)
    print(f"decode step at batch {batch} after 512 tokens (median of {steps}): prefetch {medians['prefetch']:.2f} "
          f"ms, none {medians['none']:.2f} ms ({medians['none'] / medians['prefetch']:.3f}x)")


def _prefetch_product_us(op: object, out: int, inner: int, weight_only: bool) -> tuple[float, float]:
    """Median microseconds of one row's product on ``out x inner`` int8 weights filling 300 MB, the op's prefetch on
    and off alternating (each on other weights): W8A8 (`int8_gemv`), or weight-only in groups of 32."""
    from llmquant.nn import int8_gemv

    generator = torch.Generator().manual_seed(0)
    count = max(2, 300_000_000 // (out * inner))
    weights = [torch.randint(-127, 128, (out, inner), dtype=torch.int8, generator=generator) for _ in range(count)]
    row, group_scale = torch.randn(1, inner), torch.rand(out, inner // 32)
    sums = [int8_gemv.weight_row_sums(weight) for weight in weights] if not weight_only else []
    codes, scale = int8_gemv.token_codes(op, row, 127, -128)
    weight_scale = torch.rand(1, out)

    def call(index: int) -> object:
        if weight_only:
            return int8_gemv.weight_only_linear(op, row, weights[index], group_scale, None, 32)
        return int8_gemv.gemv_linear(op, codes, weights[index], sums[index], scale, weight_scale, None)

    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(400):
        for on, index in ((True, repeat % count), (False, (repeat + count // 2) % count)):
            op.set_prefetch(on)
            start = time.perf_counter()
            call(index)
            times[on].append(time.perf_counter() - start)
    op.set_prefetch(True)
    return statistics.median(times[True]) * 1e6, statistics.median(times[False]) * 1e6


def rows_rules() -> None:
    """The measurements behind three row rules of the op, one thread or ``--threads``: a W8A8 192 x 576 Linear's hot
    1-row call (its input's codes already made) through `DecodeRows` and through `int8_linear` (medians of 20,000);
    W4A8 1536 x 576 in groups of 64 from memory at 1, 2 and 4 rows, the per-row op (`gemv_linear`) against
    `grouped_gemm`; the default model's head in groups of 32 at 1 to 16 rows, `weight_only_gemv` against float32's
    F.linear (`WEIGHT_ONLY_MAX_ROWS`)."""
    from llmquant.nn import int8_gemv

    op = int8_gemv.cpu_kernel(torch.empty(0))
    if op is None:
        raise SystemExit(f"the decode op does not run here: {int8_gemv.gemv_refusal(torch.device('cpu'))}")
    scheme = scheme_from_name("w_int8_per_channel_a_int8_per_token_dynamic")
    layer = QuantLinear.from_linear(torch.nn.Linear(576, 192, bias=False), scheme.weights, scheme.input_activations)
    set_runtime(layer, "int8")
    x = torch.randn(1, 1, 576)
    with torch.no_grad():
        timed = {}
        for name, decode in (("DecodeRows", None), ("int8_linear", False)):
            layer._decode_rows = decode  # (None: resolved at the next call; False: the per-call path)
            timed[name] = median_us(lambda: layer(x), 20000)
    print(f"W8A8 192 x 576, hot 1-row call: DecodeRows {timed['DecodeRows']:.1f} us, int8_linear "
          f"{timed['int8_linear']:.1f} us")
    out, inner, group = 1536, 576, 64
    count = 300_000_000 // (out * inner)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randint(-8, 8, (out, inner), dtype=torch.int8, generator=generator) for _ in range(count)]
    scale = torch.rand(out, inner // group)
    sums = [int8_gemv.weight_row_sums(w, group) for w in weights]
    packs = [int8_gemv.grouped_pack(w, scale, group) for w in weights]
    for rows in (1, 2, 4):
        codes, input_scale = int8_gemv.token_codes(op, torch.randn(rows, inner), 127, -128)
        times: dict[str, list[float]] = {"per-row op": [], "grouped_gemm": []}
        for repeat in range(400):
            for name, index in (("per-row op", repeat % count), ("grouped_gemm", (repeat + count // 2) % count)):
                start = time.perf_counter()
                if name == "per-row op":
                    int8_gemv.gemv_linear(op, codes, weights[index], sums[index], input_scale, scale, None, group)
                else:
                    int8_gemv.grouped_gemm(op, codes, packs[index], input_scale, None, out, group)
                times[name].append(time.perf_counter() - start)
        print(f"W4A8 {out} x {inner} g{group} from memory, {rows} rows: " + ", ".join(
            f"{name} {statistics.median(values) * 1e6:.1f} us" for name, values in times.items()))
    del weights, packs
    heads = [torch.randint(-127, 128, (49152, 576), dtype=torch.int8, generator=generator) for _ in range(4)]
    floats = [torch.randn(49152, 576) for _ in range(3)]
    head_scale = torch.rand(49152, 18)
    for rows in (1, 4, 8, 16, 32):
        x = torch.randn(rows, 576)
        times = {"weight_only_gemv": [], "F.linear": []}
        for repeat in range(12):
            start = time.perf_counter()
            int8_gemv.weight_only_linear(op, x, heads[repeat % 4], head_scale, None, 32)
            times["weight_only_gemv"].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.nn.functional.linear(x, floats[repeat % 3])
            times["F.linear"].append(time.perf_counter() - start)
        print(f"head 49152 x 576 g32, {rows} rows: " + ", ".join(
            f"{name} {statistics.median(values) * 1e3:.2f} ms" for name, values in times.items()))


def ops() -> None:
    """The decode op's (`llmquant.nn.int8_gemv`) calls alone against torch's: the scaling of a 512 x 1536 float32
    product (each call on a fresh copy, whose cost is printed too), the input codes of 512 rows (per token and static),
    a 576 -> 49152 head at one row weight-only int8 against float32, and an INT8 KV cache layer (`kv_layer`)."""
    from llmquant.nn import int8_gemv, int8_linear

    op = int8_gemv.cpu_kernel(torch.empty(0))
    if op is None:
        raise SystemExit(f"the decode op does not run here: {int8_gemv.gemv_refusal(torch.device('cpu'))}")
    product, scale, weight_scale = torch.randn(512, 1536), torch.rand(512, 1), torch.rand(1, 1536)
    copy_us = median_us(lambda: product.clone())
    torch_us = median_us(lambda: int8_linear.scale_output(product.clone(), scale, weight_scale, None))
    op_us = median_us(lambda: int8_gemv.scale_product(op, product.clone(), scale, weight_scale, None))
    print(f"scaling 512 x 1536 (a copy included: {copy_us:.0f} us): torch {torch_us:.0f} us, the op {op_us:.0f} us")
    integers = torch.randint(-2**20, 2**20, (512, 1536), dtype=torch.int32)  # torch._int_mm's product
    int_copy_us = median_us(lambda: integers.clone())
    int_torch_us = median_us(lambda: int8_linear.scale_output(integers.clone(), scale, weight_scale, None))
    int_op_us = median_us(lambda: int8_gemv.scale_product(op, integers.clone(), scale, weight_scale, None))
    print(f"scaling an int32 product of 512 x 1536 (a copy included: {int_copy_us:.0f} us): torch's promotion "
          f"{int_torch_us:.0f} us, the op in place {int_op_us:.0f} us")
    static = torch.full((1, 1), 0.05)

    def codes_us(rows: torch.Tensor) -> list[float]:  # per token by torch, by the op; static by torch, by the op
        return [median_us(call, 50) for call in (
            lambda: int8_linear.int8_codes(rows, "token", None, -128, 127),
            lambda: int8_gemv.token_codes(op, rows, 127, -128),
            lambda: int8_linear.int8_codes(rows, None, static, -128, 127),
            lambda: int8_gemv.static_codes(op, rows, static, -128, 127))]

    for rows in (torch.randn(512, 576), torch.randn(512, 1536)):
        token_torch, token_op, static_torch, static_op = codes_us(rows)
        print(f"input codes of {rows.shape[0]} x {rows.shape[1]}: per token torch {token_torch:.0f} us, the op "
              f"{token_op:.0f} us; static torch {static_torch:.0f} us, the op {static_op:.0f} us")
    head = torch.randn(49152, 576)
    head_scale = head.abs().amax(1, keepdim=True) / 127
    head_codes, row = torch.round(head / head_scale).to(torch.int8), torch.randn(1, 576)
    float_us = median_us(lambda: torch.nn.functional.linear(row, head), 20)
    int8_us = median_us(lambda: int8_gemv.weight_only_linear(op, row, head_codes, head_scale, None), 20)
    print(f"a head of 576 -> 49152 at one row: float32 F.linear {float_us:.0f} us, weight-only int8 on the op "
          f"{int8_us:.0f} us")
    kv_layer()


def onednn(rows: int = 512, inner: int = 576, outputs: tuple[int, ...] = (576, 1536)) -> None:
    """oneDNN's int8 linear (``torch.ops.onednn.qlinear_pointwise``, what `llmquant.nn.int8_linear.onednn_product`
    calls) on signed int8 inputs and on unsigned ones (the codes + 128, zero point 128), ``torch._int_mm`` and float32
    ``F.linear``, ``rows`` x ``inner`` by ``inner`` x each of ``outputs``, medians; with the implementation oneDNN
    names in its verbose log (``ref`` is its reference kernel: `onednn_refusal` refuses oneDNN on a CPU without AMX,
    where it took that one for signed inputs). The same products, checked on the way."""
    x_codes = torch.randint(-127, 128, (rows, inner), dtype=torch.int8)
    for out in outputs:
        onednn_products(x_codes, torch.randint(-127, 128, (out, inner), dtype=torch.int8))


def onednn_products(x_codes: torch.Tensor, weight: torch.Tensor) -> None:
    """One shape of `onednn`."""
    packed = torch.ops.onednn.qlinear_prepack(weight, None)
    unit, zero, out = torch.ones(()), torch.zeros((), dtype=torch.int32), weight.shape[0]
    ones, zeros = torch.ones(out), torch.zeros(out, dtype=torch.int32)
    unsigned_codes = (x_codes.to(torch.int16) + 128).to(torch.uint8)

    def signed() -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise.tensor(x_codes, unit, zero, packed, ones, zeros, None, 1.0, 0,
                                                         torch.float32, "none", [], "")

    def unsigned() -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise.tensor(unsigned_codes, unit, zero + 128, packed, ones, zeros, None,
                                                         1.0, 0, torch.float32, "none", [], "")

    exact = torch.ops.aten._int_mm(x_codes, weight.t()).float()
    kernels = {}
    for name, call in (("signed", signed), ("unsigned", unsigned)):
        if not torch.equal(call(), exact):
            raise SystemExit(f"oneDNN's {name} product differs from torch._int_mm's")
        kernels[name] = _onednn_implementation(call)
    float_input, float_weight = x_codes.float(), weight.float()
    start = time.perf_counter()
    signed()
    once_us = (time.perf_counter() - start) * 1e6  # (oneDNN's reference kernel takes seconds: timed once, then)
    times = {"oneDNN signed": once_us if once_us > 100_000 else median_us(signed, 50),
             "oneDNN unsigned": median_us(unsigned, 50),
             "torch._int_mm": median_us(lambda: torch.ops.aten._int_mm(x_codes, weight.t()), 50),
             "float32 F.linear": median_us(lambda: torch.nn.functional.linear(float_input, float_weight), 50)}
    print(f"{x_codes.shape[0]} x {x_codes.shape[1]} by {x_codes.shape[1]} x {out}: "
          + ", ".join(f"{name} {us:.0f} us" for name, us in times.items())
          + f"; oneDNN's implementation: signed {kernels['signed']}, unsigned {kernels['unsigned']}")


def _onednn_implementation(call: Callable[[], object]) -> str:
    """The implementation oneDNN's verbose log names for ``call``'s matmul (its standard output, caught at the file
    descriptor)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(1)
        try:
            os.dup2(log.fileno(), 1)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                call()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        fields = [line.split(",") for line in log.read().splitlines() if ",exec," in line and ",matmul," in line]
    return fields[-1][fields[-1].index("matmul") + 1] if fields else "not named (no verbose line)"


def kv_layer() -> None:
    """One INT8 KV cache layer's update and attention (9 query heads) after 512 positions at batch 1 (3 KV heads of
    64, per-token codes) against transformers' float layer with sdpa: with the op that serves the cache here
    (`llmquant.nn.int8_gemv.kv_kernel`: the VNNI op, or the AVX2 op) and without it (torch), the op's attention over
    the codes with its codes written in place (`Int8CacheLayer._store_in_place`) and appended as without the op; and an
    FP8 (E4M3) cache per tensor (static scales 4 / 448) with the op's attention over its codes; the six alternating,
    medians of 15 runs of 64 steps."""
    from transformers.cache_utils import DynamicLayer

    from llmquant.nn import int8_gemv
    from llmquant.nn.kv_storage import Int8CacheLayer

    if int8_gemv.kv_kernel(torch.empty(0)) is None:
        raise SystemExit("no op serves the INT8 KV cache here (neither the VNNI op nor the AVX2 op runs)")
    spec = scheme_from_name("w_int8_per_channel_a_int8_per_token_dynamic", kv_cache="int8_per_token").kv_cache
    fp8_spec = scheme_from_name("w_int8_per_channel_a_int8_per_token_dynamic", kv_cache="fp8_per_tensor").kv_cache
    prompt = (torch.randn(1, 3, 512, 64), torch.randn(1, 3, 512, 64))
    steps = [(torch.randn(1, 9, 1, 64), torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64)) for _ in range(64)]

    def int8_layer(reads_codes: bool, in_place: bool = True, fp8: bool = False) -> Int8CacheLayer:
        quantizer = KVCacheQuantizer(fp8_spec if fp8 else spec)
        quantizer.runtime, quantizer.passes_cache_untouched = "int8", reads_codes
        if fp8:
            quantizer.k_scale.fill_(4 / 448)
            quantizer.v_scale.fill_(4 / 448)
        layer = Int8CacheLayer(quantizer)
        if not in_place:
            layer._store_in_place = lambda *states: False
        return layer

    def sdpa(layer: DynamicLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True)

    def codes_read(layer: Int8CacheLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> object:
        return layer.attend(query, keys, values, None, "sdpa", {})

    layers = {"float layer": (DynamicLayer, "1", sdpa), "int8 layer, the op": (lambda: int8_layer(False), "1", sdpa),
              "int8 layer, torch": (lambda: int8_layer(False), "0", sdpa),
              "int8 layer, the op's attention over the codes": (lambda: int8_layer(True), "1", codes_read),
              "the same, codes appended": (lambda: int8_layer(True, in_place=False), "1", codes_read),
              "FP8 layer per tensor, the op's attention over the codes": (lambda: int8_layer(True, fp8=True), "1",
                                                                           codes_read)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in layers}
    for _ in range(15):
        for name, (make, flag, attention) in layers.items():
            os.environ["LLMQUANT_GEMV"] = flag  # (read at every update)
            layer = make()
            layer.update(*prompt)
            updates = attended = 0.0
            for query, key, value in steps:
                start = time.perf_counter()
                states = layer.update(key, value)
                middle = time.perf_counter()
                attention(layer, query, *states)
                updates, attended = updates + middle - start, attended + time.perf_counter() - middle
            times[name].append((updates / len(steps), attended / len(steps)))
    os.environ.pop("LLMQUANT_GEMV")
    print("KV cache layer after 512 positions, a decode step's update + attention: " + ", ".join(
        f"{name} {statistics.median(u for u, _ in values) * 1e6:.0f} + "
        f"{statistics.median(a for _, a in values) * 1e6:.0f} us" for name, values in times.items()))


def dequant() -> None:
    """The micro-measurements behind the INT8 KV cache's and the W4 path's dequantization (2 x 3 x 544 x 64 cached
    values, one decode step of the default model's layer; a 576 -> 1536 4-bit weight)."""
    from llmquant.nn.int4_linear import dequantize_bf16, prepare_int4
    from llmquant.nn.kv_storage import dequantize_states
    from llmquant.quant.packing import pack_int32

    codes = torch.randint(-127, 128, (2, 1, 3, 1024, 64), dtype=torch.int8)
    scales = torch.rand(2, 1, 3, 1024, 1)
    length = [544]

    def growing_fresh() -> torch.Tensor:  # a new output one position longer at every call, as a decode step makes
        length[0] += 1
        return torch.mul(codes[..., : length[0], :], scales[..., : length[0], :])

    def growing_reused() -> torch.Tensor:
        length[0] += 1
        return dequantize_states(codes[..., : length[0], :], scales[..., : length[0], :], torch.float32, "bench")

    view, scale_view = codes[..., :544, :], scales[..., :544, :]
    out = torch.empty(view.shape)
    timings = {"growing output, fresh tensor (one multiplication)": growing_fresh,
               "growing output, reused workspace (dequantize_states)": growing_reused,
               "one multiplication promoting int8": lambda: torch.mul(view, scale_view, out=out),
               "convert, then scale in place": lambda: out.copy_(view).mul_(scale_view)}
    for name, call in timings.items():
        length[0] = 544
        print(f"KV dequantization, {name}: {median_us(call, repeats=300):.1f} us")
    words = pack_int32(torch.randint(-8, 8, (1536, 576), dtype=torch.int32), 4)
    weight = prepare_int4(words, torch.rand(1536, 9) * 0.01, torch.full((1536, 9), 8.0), 576)
    print(f"W4 576 -> 1536 dequantized to bfloat16: {median_us(lambda: dequantize_bf16(weight)):.1f} us")


def fp8(device: str) -> None:
    """FP8 W8A8 per channel / per token, and in 128 x 128 blocks / per token in groups of 128 (on CUDA, where
    ``torch._scaled_mm``'s blockwise scaling runs): the kernel and the simulation against the float Linear, by
    rows."""
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = SHAPES + (((4096, 14336), (14336, 4096), (4096, 4096)) if cuda else ())

    def timed(call: Callable[[], object]) -> float:
        def synced() -> object:
            out = call()
            if cuda:
                torch.cuda.synchronize()
            return out
        return median_us(synced, repeats=50 if cuda else 20)

    blocks = ("w_fp8_block128_a_fp8_group128_dynamic",) if cuda else ()  # (no blockwise scaling on the CPU)
    for name in ("w_fp8_per_channel_a_fp8_per_token_dynamic", *blocks):
        scheme = scheme_from_name(name)
        for inputs, outputs in shapes:
            linear = torch.nn.Linear(inputs, outputs, bias=False, device=device, dtype=dtype)
            quantized = QuantLinear.from_linear(linear, scheme.weights, scheme.input_activations)
            if cuda and (refusal := quantized.int8_refusal()) is not None:
                print(f"{name} {inputs} -> {outputs}: {refusal}")
                continue
            for rows in (1, 16, 512, 2048):
                x = torch.randn(rows, inputs, device=device, dtype=dtype)
                with torch.no_grad():
                    float_us = timed(lambda linear=linear, x=x: linear(x))
                    quantized.runtime = "fake"
                    simulated_us = timed(lambda quantized=quantized, x=x: quantized(x))
                    quantized.runtime = "int8"  # the operator, whatever set_runtime would choose here
                    kernel_us = timed(lambda quantized=quantized, x=x: quantized(x))
                    os.environ["LLMQUANT_FP8_CODES"] = "torch"  # the input codes by the primitives
                    unfused_us = timed(lambda quantized=quantized, x=x: quantized(x))
                    del os.environ["LLMQUANT_FP8_CODES"]
                print(f"{name} {inputs} -> {outputs}, {rows} rows: {dtype} {float_us:9.1f} us, scaled_mm "
                      f"{kernel_us:9.1f} us ({float_us / kernel_us:5.2f}x; codes by the primitives "
                      f"{unfused_us:9.1f} us), simulation {simulated_us:9.1f} us")


def avx2(layers: int = 30, repeats: int = 50) -> None:
    """The AVX2 op's `avx2_gemm` (`llmquant.nn.int8_gemv`, ``int8_gemv_avx2.cpp``: a CPU with AVX2, VNNI and AMX
    feigned absent where present) against float32's F.linear at the default model's shapes (k_proj too), by rows,
    each call on the next of ``layers`` weights (read from memory, as in a forward), alternating, medians of
    ``repeats`` rounds of all; the same bits as the float32 product of the codes (checked on the way)."""
    from llmquant.nn import int8_gemv

    feigned = dataclasses.replace(int8_gemv.cpu_features(), vnni=False, amx=False)
    int8_gemv.cpu_features = lambda: feigned  # (this process only: the op where it can run)
    op = int8_gemv.avx2_kernel(torch.empty(0))
    if op is None:
        raise SystemExit(f"the AVX2 op does not run here: {int8_gemv.avx2_gemv_refusal(torch.device('cpu'))}")
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 4, 8, 16, 64, 512):
        for inputs, outputs in (*SHAPES, (576, 192)):
            avx2_shape({"AVX2 op": op}, rows, inputs, outputs, layers, repeats, generator)


def avx2_shape(ops: dict[str, object], rows: int, inputs: int, outputs: int, layers: int, repeats: int,
               generator: torch.Generator) -> None:
    """One shape: each AVX2 op of ``ops`` (name: op) checked against the float32 product of the codes, then timed
    against float32's F.linear, each call on the next of ``layers`` weights, alternating, medians of ``repeats``
    rounds after two (`avx2`; `bench/speed_2026-12-07_epyc_avx2_after/tiles_ab.py` compares two builds of the op)."""
    from llmquant.nn import int8_gemv

    weights = [torch.randint(-128, 128, (outputs, inputs), generator=generator, dtype=torch.int8)
               for _ in range(layers)]
    floats = [w.float() for w in weights]
    input_scale, weight_scale = torch.rand(rows, 1) + 0.5, torch.rand(1, outputs) + 0.5
    packs = [int8_gemv.avx2_gemm_pack(w, weight_scale, 0) for w in weights]
    x = torch.randint(-128, 128, (rows, inputs), generator=generator, dtype=torch.int8)
    x_float = x.float()
    expected = (x_float @ floats[0].T).mul_(input_scale * weight_scale)
    calls = {"float32": lambda i: torch.nn.functional.linear(x_float, floats[i])}
    for name, op in ops.items():
        assert torch.equal(int8_gemv.avx2_gemm(op, x, packs[0], input_scale, None, outputs), expected), name
        calls[name] = lambda i, op=op: int8_gemv.avx2_gemm(op, x, packs[i], input_scale, None, outputs)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 2):
        for name, call in calls.items():
            start = time.perf_counter()
            for i in range(layers):
                call(i)
            if round_ > 1:
                times[name].append((time.perf_counter() - start) / layers * 1e6)
    us = {name: statistics.median(values) for name, values in times.items()}
    print(f"{rows:4d} rows, {inputs:5d} -> {outputs:5d}: " + ", ".join(
        f"{name} {value:9.1f} us" + ("" if name == "float32" else f" ({us['float32'] / value:4.2f}x)")
        for name, value in us.items()), flush=True)


def searches() -> None:
    """``search`` (module docstring)."""
    from llmquant.algorithms.smoothquant import (
        GroupStats,
        _float_outputs,
        quantized_group_error,
        reader_weights,
        smoothing_scales,
        weight_absmax,
    )
    from llmquant.model.patterns import SmoothGroup
    from llmquant.nn.online_rotation import attach_input_rotation
    from llmquant.quant import QuantSpec
    from llmquant.quant.primitives import searched_clip_ratios

    generator = torch.Generator().manual_seed(0)
    grid = (0.9, 0.85, 0.8, 0.75, 0.7)
    for rows, width, symmetric in ((2048, 576, False), (2048, 1536, False), (2048, 576, True), (36864, 32, False)):
        x = torch.randn(rows, width, generator=generator) * (1 + 5 * torch.rand(rows, 1, generator=generator))
        low, high = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
        limits = (-7, 7) if symmetric else (0, 15)
        search = functools.partial(searched_clip_ratios, x, low, high, grid, symmetric, *limits)
        print(f"searched_clip_ratios {rows} x {width}, {'symmetric' if symmetric else 'asymmetric'}: "
              f"{median_us(search, 15) / 1e3:.2f} ms, ratios' sum {float(search().double().sum())!r}", flush=True)
    torch.manual_seed(0)
    sizes = {"q": 576, "k": 192, "v": 192}
    layer = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(576),
                                 **{name: torch.nn.Linear(576, out, bias=False) for name, out in sizes.items()}})
    for name in sizes:
        attach_input_rotation(layer[name], Rotation(576, "hadamard"))
    group = SmoothGroup("norm", "norm", tuple(sizes))
    x = torch.randn(2048, 576) * (1 + 20 * (torch.rand(576) > 0.98))
    stats = GroupStats(act_absmax=x.abs().amax(0), tokens=x)
    inputs = QuantSpec(bits=4, granularity="token", dynamic=True, symmetric=False, clip_grid=grid)
    specs = {name: (QuantSpec(bits=4, granularity="group", group_size=32), inputs) for name in sizes}
    weights = reader_weights(layer, group)
    references = _float_outputs(weights, x)
    scales = smoothing_scales(stats.act_absmax, weight_absmax(layer, group), 0.5)
    score = functools.partial(quantized_group_error, layer, group, stats, scales, specs, references, weights=weights)
    print(f"quantized_group_error, q/k/v behind a Hadamard, 2048 tokens: {median_us(score, 7) / 1e3:.1f} ms, "
          f"error {score()!r}", flush=True)


def groups(repeats: int = 21) -> None:
    """W4A4 with inputs in groups: the group products (the weight per channel, and in the inputs' groups) against
    fq(x) @ dequant(W)^T and float32, by rows."""
    name = "w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic"
    for group in (32, 64):
        scheme = scheme_from_name(name, group_size=group)
        in_groups = scheme_from_name("w_int4_per_group_sym_a_uint4_per_group_asym_dynamic", group_size=group).weights
        spec = scheme.input_activations.model_copy(update={"clip_grid": (1.0, 0.95, 0.9, 0.85, 0.8)})
        for inputs, outputs in SHAPES:
            linear = torch.nn.Linear(inputs, outputs)
            quantized = QuantLinear.from_linear(linear, scheme.weights, spec)
            weight_groups = QuantLinear.from_linear(linear, in_groups, spec)
            set_runtime(quantized, "int8")
            set_runtime(weight_groups, "int8")
            weight = quantized.dequantized_weight()
            for rows in (1, 8, 512):
                x = torch.randn(rows, inputs)
                calls = (lambda linear=linear, x=x: linear(x),
                         lambda quantized=quantized, x=x: quantized(x.clone()),  # (a new tensor: no kept codes)
                         lambda spec=spec, x=x, w=weight, b=quantized.bias: F.linear(fake_quantize(x, spec), w, b),
                         lambda quantized=weight_groups, x=x: quantized(x.clone()))
                with torch.no_grad():
                    times = [median_us(call, repeats) for call in calls]
                print(f"groups of {group}: {inputs} -> {outputs}, {rows} rows: float32 {times[0]:8.1f} us, group "
                      f"products {times[1]:8.1f} us, fake-quantized inputs {times[2]:8.1f} us, ratio "
                      f"{times[1] / times[2]:5.2f}; the weight in the groups too {times[3]:8.1f} us "
                      f"({times[3] / times[1]:4.2f}x)", flush=True)


def rotation() -> None:
    """A randomized online Hadamard: `OnlineRotation` against `Rotation.apply`, by size and rows."""
    for n in (64, 192, 576, 1536):
        rotation_ = Rotation(n, "hadamard", True, 0)
        online = OnlineRotation(rotation_)
        for rows in (1, 8, 512):
            x = torch.randn(rows, n)
            repeats = 21 if rows == 512 else 200
            with torch.no_grad():
                new = median_us(lambda online=online, x=x: online(x), repeats)
                old = median_us(lambda rotation_=rotation_, x=x: rotation_.apply(x.double()).float(), repeats)
            print(f"n {n:5d}, {rows:3d} rows: Kronecker factors {new:9.1f} us, butterfly {old:9.1f} us "
                  f"({old / new:4.2f}x)", flush=True)


def shared_rotations(model_dir: str, rounds: int = 15) -> None:
    """A forward of 1, 8 and 128 tokens (no KV cache) of a checkpoint with online rotations, its Linears that read one
    tensor sharing one rotation of it (`llmquant.nn.online_rotation.rotated_once`: q/k/v, gate/up) and each rotating
    it again, alternating, medians of ``rounds``; the two give the same logits (checked)."""
    import llmquant
    import llmquant.nn.online_rotation as online_rotation

    model, _ = llmquant.load(model_dir)
    shared = online_rotation.rotated_once
    ways = {"shared": shared, "each its own": lambda online, x: online(x)}
    generator = torch.Generator().manual_seed(0)
    inputs = {rows: torch.randint(0, model.config.vocab_size, (1, rows), generator=generator) for rows in (1, 8, 128)}
    times: dict[tuple[int, str], list[float]] = {(rows, way): [] for rows in inputs for way in ways}
    with torch.no_grad():
        for round_ in range(rounds + 1):  # (the first round untimed)
            for rows, ids in inputs.items():
                for way, rotate in ways.items():
                    online_rotation.rotated_once = rotate
                    start = time.perf_counter()
                    logits = model(ids, use_cache=False).logits
                    if round_:
                        times[(rows, way)].append(time.perf_counter() - start)
                    if round_ == 0 and rows == 8:
                        if way == "shared":
                            reference = logits
                        elif not torch.equal(logits, reference):
                            raise SystemExit("sharing the rotations changed the logits")
    online_rotation.rotated_once = shared
    for rows in inputs:
        alone, each = (statistics.median(times[(rows, way)]) for way in ways)
        print(f"{rows:4d} tokens: shared {alone * 1e3:8.1f} ms, each its own {each * 1e3:8.1f} ms "
              f"({each / alone:5.3f}x)")


def _sdpa_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool = True) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=causal,
                                                            enable_gqa=True).transpose(1, 2)


def causal_attention(batch: int, rounds: int = 15) -> None:
    from llmquant.nn.causal_blocks import attention_op, causal_block_attention, sdpa_blocks

    generator = torch.Generator().manual_seed(0)
    for positions in (128, 256, 384, 512, 640, 767, 768, 1024, 2048, 4096):
        query = torch.randn(batch, positions, 9, 64, generator=generator).transpose(1, 2)  # (transformers' layout)
        key, value = (torch.randn(batch, 3, positions, 64, generator=generator) for _ in range(2))
        ways = {"sdpa": functools.partial(_sdpa_causal, query, key, value)}
        for block in (32, 64, 128):
            ways[f"sdpa blocks of {block}"] = functools.partial(sdpa_blocks, query, key, value, block=block)
            if attention_op(query) is not None:
                ways[f"op blocks of {block}"] = functools.partial(causal_block_attention, query, key, value,
                                                                  block=block)
        compared = list(ways)  # (the same function: their largest difference from sdpa's output is printed)
        ways["sdpa without a mask"] = functools.partial(_sdpa_causal, query, key, value, causal=False)
        ways["sdpa in bfloat16"] = functools.partial(_sdpa_causal, query.bfloat16(), key.bfloat16(), value.bfloat16())
        times: dict[str, list[float]] = {way: [] for way in ways}
        reference = ways["sdpa"]()
        differences = {way: (ways[way]() - reference).abs().max().item() for way in compared}
        for _ in range(rounds):
            for way, run in ways.items():
                start = time.perf_counter()
                run()
                times[way].append(time.perf_counter() - start)
        print(f"{positions:5d} positions, batch {batch}: " + ", ".join(
            f"{way} {statistics.median(times[way]) * 1e3:7.2f} ms" + (f" (max diff {differences[way]:.1e})"
                                                                       if way in compared[1:] else "")
            for way in ways))


def machine(repeats: int = 15) -> None:
    """The rates this CPU multiplies at and copies at, on the threads torch has: ``torch._int_mm`` against float32's
    ``F.linear`` at the default model's q_proj, k_proj, gate_proj and down_proj shapes, 512 and 4096 rows (G
    multiply-adds a second, medians of ``repeats``), and a copy of 64 MiB and of 8 MiB (GB a second, read + write)."""
    generator = torch.Generator().manual_seed(0)
    for rows in (512, 4096):
        for name, (inner, outputs) in {"q_proj": (576, 576), "k_proj": (576, 192), "gate_proj": (576, 1536),
                                       "down_proj": (1536, 576)}.items():
            codes = torch.randint(-127, 128, (rows, inner), generator=generator, dtype=torch.int8)
            weight = torch.randint(-127, 128, (outputs, inner), generator=generator, dtype=torch.int8)
            int8 = median_us(functools.partial(torch._int_mm, codes, weight.t()), repeats)
            float32 = median_us(functools.partial(torch.nn.functional.linear, codes.float(), weight.float()), repeats)
            macs = rows * inner * outputs / 1e3  # (per microsecond: G a second)
            print(f"{rows:5d} rows, {name} ({inner} -> {outputs}): _int_mm {macs / int8:6.1f}, F.linear "
                  f"{macs / float32:5.1f} G multiply-adds/s ({float32 / int8:.2f}x)")
    for size in (64 * 2**20, 8 * 2**20):
        source, target = torch.ones(size // 4), torch.empty(size // 4)
        copy = median_us(functools.partial(target.copy_, source), repeats)
        print(f"copy of {size >> 20} MiB: {2 * size / copy / 1e3:5.1f} GB/s (read + write)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["layer", "profile", "compile", "kv", "dequant", "fp8", "kernels", "decode",
                                         "prefill", "ops", "kvlayer", "prefetch", "rows", "avx2", "onednn",
                                         "groups", "rotation", "shared", "search", "attention", "machine",
                                         "w4rows", "decodeattention"])
    parser.add_argument("--device", default="cpu", help="fp8: cpu or cuda")
    parser.add_argument("--model", default=None, help="a checkpoint directory (profile: default the float model)")
    parser.add_argument("--baseline", default=None, help="kv: the same scheme's checkpoint without the KV cache")
    parser.add_argument("--also", nargs="*", default=[], help="decode: more checkpoints, with the op, in the same run")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--attention", default="auto", choices=ATTENTIONS,
                        help="profile: how the attention runs (`llmquant.load`)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=12, help="profile: operators listed, by self CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "layer":
        layer()
    elif args.what == "profile":
        profile(args.model, args.attention, args.batch, args.rows)
    elif args.what == "dequant":
        dequant()
    elif args.what == "ops":
        ops()
    elif args.what == "kvlayer":
        kv_layer()
    elif args.what == "onednn":
        onednn()
    elif args.what == "fp8":
        fp8(args.device)
    elif args.what == "kernels":
        if args.model is None:
            parser.error("kernels needs --model DIR (a W8A8 checkpoint)")
        kernels(args.model)
    elif args.what in ("decode", "prefill"):
        if args.model is None:
            parser.error(f"{args.what} needs --model DIR (a W8A8 checkpoint)")
        if args.what == "decode":
            decode_steps(args.model, args.batch, args.also)
        else:
            prefill_scaling(args.model, args.batch)
    elif args.what == "rows":
        rows_rules()
    elif args.what == "avx2":
        avx2()
    elif args.what == "groups":
        groups()
    elif args.what == "rotation":
        rotation()
    elif args.what == "search":
        searches()
    elif args.what == "attention":
        causal_attention(args.batch)
    elif args.what == "machine":
        machine()
    elif args.what == "decodeattention":
        if args.model is None:
            parser.error("decodeattention needs --model DIR")
        decode_attention(args.model, args.batch)
    elif args.what == "w4rows":
        w4_rows()
    elif args.what == "shared":
        if args.model is None:
            parser.error("shared needs --model DIR (a checkpoint with online rotations)")
        shared_rotations(args.model)
    elif args.what == "prefetch":
        if args.model is None:
            parser.error("prefetch needs --model DIR (a W8A8 checkpoint)")
        prefetch(args.model, args.batch)
    elif args.what == "kv":
        if args.model is None or args.baseline is None:
            parser.error("kv needs --model KV_DIR --baseline DIR")
        kv_decode(args.model, args.baseline, args.batch)
    else:
        if args.model is None:
            parser.error("compile needs --model DIR (a W8A8 checkpoint)")
        compiled_against_eager(args.model, args.batch)


if __name__ == "__main__":
    main()

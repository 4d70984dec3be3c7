"""A low-bit checkpoint's dynamic input clip ratios chosen layer by layer from each input's output error, at run time:
how much a per-layer ratio could give over the recipe's one ratio for every input, before building it into the engine.

    .venv/bin/python scripts/clip_by_output_error.py CHECKPOINT [--samples 8] [--max-windows 20] [--threads 1]

The checkpoint runs on the simulation, quantized as it is (the quantized stream). ``--samples`` calibration samples of
the pydoc corpus (seed 1: not the recipe's seed-0 draw) run through it; the Linears called with one tensor form a
group (q/k/v, o, gate/up, down in a Llama layer), which keeps the input its first Linear sees after its online
rotation. For each ratio r of the grid, the group's error is sum over its Linears of
||Q_r(x) W^T - x W^T||^2 / ||x W^T||^2 (W: the checkpoint's dequantized weight, Q_r: the input quantizer with clip
ratio r); the smallest wins. Then the perplexity / float on ``--max-windows`` windows of pydoc and stdlib, with the
checkpoint's ratios and with the chosen ones. GPTQ's Hessians saw the checkpoint's ratio: the figure is what a run-time
change gives, not what a recipe calibrated with these ratios would. One JSON line per group, then one per evaluation.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import llmquant
from llmquant import data
from llmquant.evaluation.perplexity import perplexity
from llmquant.nn.quant_linear import QuantLinear, set_runtime

GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def group_inputs(model: torch.nn.Module, samples: torch.Tensor) -> tuple[dict, dict]:
    """The Linears with a quantized input, grouped by the tensor they are called with (found on the first sample: the
    Linears of one module's block that read one tensor), and the inputs of each group's first Linear after its online
    rotation (every reader of an input rotates it alike)."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_spec is not None}
    called_with: dict[str, tuple[str, int]] = {}
    alive: list[torch.Tensor] = []  # every input held until the pass ends: no two tensors share an id within it

    def record(name: str) -> Callable:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            alive.append(args[0])
            called_with.setdefault(name, (name.rsplit(".", 2)[0], id(args[0])))
        return hook

    handles = [module.register_forward_pre_hook(record(name), prepend=True)  # (before the online rotation's hook)
               for name, module in linears.items()]
    with torch.no_grad():
        model(samples[:1])
    for handle in handles:
        handle.remove()
    alive.clear()
    groups: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    for name in linears:
        groups[called_with[name]].append(name)
    inputs: dict[tuple[str, int], list[torch.Tensor]] = collections.defaultdict(list)

    def keep(key: tuple[str, int]) -> Callable:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            inputs[key].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    handles = [linears[names[0]].register_forward_pre_hook(keep(key)) for key, names in groups.items()]
    with torch.no_grad():
        for row in samples:
            model(row[None])
    for handle in handles:
        handle.remove()
    return dict(groups), {key: torch.cat(parts) for key, parts in inputs.items()}


def output_errors(linears: list[QuantLinear], x: torch.Tensor) -> dict[float, float]:
    """The group's summed relative output error at every ratio of the grid (its input spec put back after)."""
    spec, first = linears[0].input_spec, linears[0]
    weights = [linear.dequantized_weight() for linear in linears]
    references = [F.linear(x, weight) for weight in weights]
    errors = {}
    for ratio in GRID:
        first.set_input_spec(spec.model_copy(update={"clip_ratio": ratio, "clip_grid": None}))
        quantized = first.quantize_input(x)
        errors[ratio] = sum(float((F.linear(quantized, weight) - y).pow(2).sum() / y.pow(2).sum())
                            for weight, y in zip(weights, references, strict=True))
    first.set_input_spec(spec)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = llmquant.load(args.checkpoint, device="cpu")
    set_runtime(model, "fake")
    tokens = data.tokenize(tokenizer, data.corpus("pydoc", "calib"))
    groups, inputs = group_inputs(model, data.calibration_samples(tokens, args.samples, 512, seed=1))
    start, chosen = time.perf_counter(), {}
    with torch.no_grad():
        for key, names in groups.items():
            errors = output_errors([model.get_submodule(name) for name in names], inputs[key])
            kept = model.get_submodule(names[0]).input_spec.clip_ratio
            chosen[key] = min(errors, key=lambda r: (errors[r], -r))
            row = {"layer": key[0], "linears": [name.rsplit(".", 1)[-1] for name in names], "ratio": chosen[key],
                   "error": round(errors[chosen[key]], 5),
                   f"error_at_{kept:g}": round(errors[kept], 5) if kept in errors else None}
            print(json.dumps(row), flush=True)
    print(json.dumps({"search_seconds": round(time.perf_counter() - start, 1),
                      "ratios": dict(collections.Counter(chosen.values()))}), flush=True)
    windows = {name: data.corpus_windows(tokenizer, name, 512, args.max_windows) for name in ("pydoc", "stdlib")}
    reference, _ = llmquant.load(None, device="cpu")
    float_ppl = {name: perplexity(reference, w) for name, w in windows.items()}
    del reference

    def evaluate(label: str) -> None:
        ratios = {name: round(perplexity(model, w) / float_ppl[name], 4) for name, w in windows.items()}
        print(json.dumps({"clip": label, **ratios}), flush=True)

    evaluate("the checkpoint's ratios")
    for key, names in groups.items():
        for name in names:
            linear = model.get_submodule(name)
            linear.set_input_spec(linear.input_spec.model_copy(update={"clip_ratio": chosen[key], "clip_grid": None}))
    evaluate("per layer by output error")


if __name__ == "__main__":
    main()

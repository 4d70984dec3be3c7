"""How much of a W8A8 scheme's perplexity comes from its activations alone and from its weights alone: the default
model with only the inputs of the decoder layers' Linears quantized (the scheme's input quantizer, dynamic: no
calibration), and with only their weights rounded to nearest (the scheme's weight quantizer). An activation-only
figure above a goal means no weight algorithm (GPTQ, GPTAQ) reaches the goal with that activation format.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/quantization_error_floor.py \\
        --schemes w_fp8_per_channel_a_fp8_per_token_dynamic w_int8_per_channel_a_int8_per_token_dynamic \\
        [--corpora pydoc stdlib] [--max-windows 40] [--out bench/error_floor.jsonl]

One JSON line per scheme and part ("activations", "weights") with the perplexity on each corpus and its ratio to
the float model's (measured in the same run, the windows of scripts/bench_recipe.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import llmquant
from llmquant import data
from llmquant.evaluation.perplexity import perplexity
from llmquant.model.model_map import detect_model_map
from llmquant.quant.primitives import fake_quantize
from llmquant.quant.scheme import scheme_from_name
from llmquant.quant.spec import QuantSpec


def decoder_linears(model: nn.Module) -> list[nn.Linear]:
    model_map = detect_model_map(model)
    return [m for layer in model_map.layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]


def quantized_inputs(linears: list[nn.Linear], spec: QuantSpec) -> list[torch.utils.hooks.RemovableHandle]:
    """Every Linear's input fake-quantized with the dynamic ``spec`` (its range from the input itself)."""
    return [linear.register_forward_pre_hook(lambda _m, args: (fake_quantize(args[0], spec), *args[1:]))
            for linear in linears]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", nargs="+", default=["w_fp8_per_channel_a_fp8_per_token_dynamic"])
    parser.add_argument("--corpora", nargs="+", default=["pydoc", "stdlib"])
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model, tokenizer = llmquant.load(None)
    windows = {name: data.corpus_windows(tokenizer, name, 512, args.max_windows) for name in args.corpora}
    linears = decoder_linears(model)
    float_ppl = {name: perplexity(model, w) for name, w in windows.items()}
    rows = [{"scheme": "float", "part": "none", "ppl": float_ppl}]
    originals = [linear.weight.detach().clone() for linear in linears]
    for name in args.schemes:
        scheme = scheme_from_name(name)
        if scheme.input_activations is None or not scheme.input_activations.dynamic:
            parser.error(f"{name}: a scheme with dynamic input quantization is needed (no calibration here)")
        handles = quantized_inputs(linears, scheme.input_activations)
        rows.append({"scheme": name, "part": "activations",
                     "ppl": {c: perplexity(model, w) for c, w in windows.items()}})
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for linear in linears:
                linear.weight.copy_(fake_quantize(linear.weight, scheme.weights))
        rows.append({"scheme": name, "part": "weights", "ppl": {c: perplexity(model, w) for c, w in windows.items()}})
        with torch.no_grad():
            for linear, original in zip(linears, originals, strict=True):
                linear.weight.copy_(original)
    for row in rows:
        row["ratio"] = {c: row["ppl"][c] / float_ppl[c] for c in float_ppl}
        row["windows"] = args.max_windows
        line = json.dumps(row)
        print(line)
        if args.out is not None:
            with args.out.open("a") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()

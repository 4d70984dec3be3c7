"""A scale-training step (forward and backward of one 512-token window, the KL loss) with QuantLinear's differentiable
forward as it was before commit af2eef6 (the weight dequantized from its packed codes at every call, then F.linear)
and as it is (the codes unpacked once; one scale a row: the product's columns scaled), alternating in one process on
the default model quantized by round to nearest (the codes' values do not change a step's work):

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale_training_2026-12-06f/step_time.py SCHEME THREADS ['{recipe fields}']

Prints each step's seconds and the KL of the last window, then one JSON line: the median seconds a step of each (the
first round left out) and their ratio."""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import llmquant
from llmquant import data
from llmquant.algorithms.scale_training import _frozen, _set_scales, loss_of, teacher_targets, trainable_layers
from llmquant.nn.quant_linear import QuantLinear

scheme, threads = sys.argv[1], int(sys.argv[2])
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
torch.set_num_threads(threads)
model, tokenizer = llmquant.load(None)
samples = data.calibration_samples(data.tokenize(tokenizer, data.corpus("pydoc")), 8, 512)
teacher = teacher_targets(model, samples[:4], 64)
recipe = {"scheme": scheme, "kv_cache": "int4_per_token_asym", "kv_cache_center_keys": True,
          "pre_opts": [{"name": "quarot", "rotations": ["R2", "R3", "R4", "R5", "R6"]}],
          "activation_clip_grid": [0.9, 0.85, 0.8, 0.75, 0.7], "calib": {"samples": 8}, **extra}
llmquant.quantize(model, recipe, tokenizer, calib=samples, progress=False)
current = QuantLinear._differentiable_forward


def before(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    weight = self._dequantize().to(x.dtype)
    bias = self.bias.to(x.dtype) if self.bias is not None else None
    return F.linear(self.quantize_input(x), weight, bias)


layers = trainable_layers(model)
start = {name: layer.weight_scale.detach().clone() for name, layer in layers.items()}
logs = {name: torch.zeros_like(scale, requires_grad=True) for name, scale in start.items()}


def steps(forward, keep_codes: bool) -> tuple[float, float]:
    QuantLinear._differentiable_forward = forward
    began = time.perf_counter()
    for i in range(4):
        _set_scales(layers, {name: start[name] * torch.exp(logs[name]) for name in layers}, step=keep_codes)
        loss = loss_of(model, samples[i:i + 1], teacher[i:i + 1])
        loss.backward()
    missing = [name for name, log in logs.items() if log.grad is None]
    assert not missing, f"no gradient reached {missing[:3]}"
    for log in logs.values():
        log.grad = None
    return (time.perf_counter() - began) / 4, loss.item()


seconds = {"before": [], "after": []}
with _frozen(model):
    for round_ in range(4):
        for name, forward, keep in (("before", before, False), ("after", current, True)):
            step, loss = steps(forward, keep)
            seconds[name] += [step] if round_ else []
            print(name, round_, round(step, 3), round(loss, 5), flush=True)
medians = {name: statistics.median(values) for name, values in seconds.items()}
print(json.dumps({"scheme": scheme, "threads": threads, **extra, **medians,
                  "ratio": medians["before"] / medians["after"]}))

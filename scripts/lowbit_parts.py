"""Where a low-bit checkpoint's error comes from: its perplexity with one kind of input (or the KV cache) left
unquantized at a time, the weights as they are; or with another clip ratio for one kind of input.

    .venv/bin/python scripts/lowbit_parts.py CHECKPOINT [--parts q_proj,k_proj,v_proj o_proj gate_proj,up_proj
        down_proj kv] [--corpora pydoc stdlib] [--threads 2] [--asymmetric]

Each part is a comma-separated list of Linear names (the last component: ``q_proj``) whose inputs stay float, or ``kv``
for the KV cache (its quantizer passes keys and values through, centred keys still centred), ``kv_keys`` or
``kv_values`` for the cache's keys or values alone (the other quantized as before); ``""`` is the checkpoint as it is.
``PART=RATIO`` (``down_proj=0.75``, ``kv=0.9``) quantizes those inputs with the clip ratio ``RATIO`` instead
(`QuantSpec.clip_ratio`; dynamic ranges only, as every low-bit scheme's are) and leaves nothing float: the clip ratio a
run-time range can take without requantizing (GPTQ's Hessians saw the checkpoint's ratio). The simulation (runtime
``fake``) evaluates every row, so the figures compare with each other, not bit for bit with `llmquant eval`'s int8
runtime. One JSON line per part: perplexity / float per corpus, the float model (the default model, loaded here)
evaluated on the same windows. ``--asymmetric``: every row quantizes the Linears' dynamic inputs asymmetrically (a zero
point per token, `QuantSpec.symmetric` false), the checkpoint's clip ratios kept.
``--input-groups N``: every row quantizes those inputs per token in groups of N (as the scheme
``w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic`` does); ``--clip-grid R R ...``: every row chooses their
clip ratio per block from that grid (`QuantSpec.clip_grid`, in place of the checkpoint's ratio or grid).
``--kv-groups N``: every row quantizes a dynamic KV cache's keys and values per token and head in groups of N
channels (``head_dim`` / N groups a head, each with its own range) instead of one group of ``head_dim``.
``--kv-keep-first N``: every row keeps the first N positions of the KV cache unquantized (their keys centred as the
checkpoint's are; the recipe's ``kv_cache_keep_first``, given at run time).
``--bias-correct N``: every row adds to each Linear's output W_q E[x - fq(x)], the mean error of its quantized inputs
over N calibration samples of 512 tokens (one pass of the quantized model; the bias correction of weight
quantization, Nagel et al. 2019, applied to the inputs).
``--float64``: every Linear with quantized inputs computes fq(x) @ dequant(W)^T + b in float64 and casts back (the same
codes, another order of float operations: how much the order alone moves a low-bit checkpoint's perplexity).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from types import MethodType

import torch

import llmquant
from llmquant import data
from llmquant.evaluation.perplexity import perplexity
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.quant.spec import QuantSpec


def _clipped(spec: QuantSpec, ratio: float) -> QuantSpec:
    if not spec.dynamic:
        raise SystemExit(f"a clip ratio applies to dynamic ranges only; this input is static: {spec}")
    return spec.model_copy(update={"clip_ratio": ratio, "clip_grid": None})


def change(model: torch.nn.Module, part: str) -> dict[str, tuple[object, object]]:
    """Leave the inputs of the Linears named in ``part`` (or the KV cache, ``kv``) unquantized, or with ``=RATIO``
    quantize them with that clip ratio; return what to put back."""
    names_text, _, ratio_text = part.partition("=")
    names = {name for name in names_text.split(",") if name}
    ratio = float(ratio_text) if ratio_text else None
    kept: dict[str, tuple[object, object]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and name.rsplit(".", 1)[-1] in names and module.input_spec is not None:
            kept[name] = (module.input_spec, None)
            module.set_input_spec(None if ratio is None else _clipped(module.input_spec, ratio))
        elif isinstance(module, KVCacheQuantizer) and "kv" in names:
            kept[name] = (module.spec, module.quantizing)
            if ratio is None:
                module.quantizing = False
            else:
                module.spec = _clipped(module.spec, ratio)
        elif isinstance(module, KVCacheQuantizer) and (float_sides := names & {"kv_keys", "kv_values"}):
            if ratio is not None:
                raise SystemExit(f"{part}: a clip ratio applies to the whole cache (kv=RATIO), not to one side")
            kept[name] = (module.spec, module.quantizing)
            module._quantized = MethodType(_one_side_quantized(module._quantized, float_sides), module)
    return kept


def _one_side_quantized(quantized: Callable, float_sides: set[str]) -> Callable:
    """A KV-cache quantizer's ``_quantized`` that returns the keys (``kv_keys``) or values (``kv_values``) as given."""
    def forward(self: KVCacheQuantizer, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized_key, quantized_value = quantized(key, value)
        return (key if "kv_keys" in float_sides else quantized_key,
                value if "kv_values" in float_sides else quantized_value)
    return forward


def update_dynamic_inputs(model: torch.nn.Module, update: dict[str, object]) -> int:
    """Give every Linear's dynamic integer input quantizer the fields ``update`` (a zero point: ``symmetric``
    false; groups; a clip grid), the rest of its spec as it is, validated; return how many changed."""
    changed = 0
    for module in model.modules():
        spec = module.input_spec if isinstance(module, QuantLinear) else None
        if spec is not None and spec.dynamic and spec.type == "int":
            module.set_input_spec(QuantSpec(**{**spec.model_dump(), **update}))
            changed += 1
    return changed


def regroup_kv_cache(model: torch.nn.Module, group_size: int) -> int:
    """Quantize every dynamic KV cache per token and head in groups of ``group_size`` channels; return how many."""
    changed = 0
    for module in model.modules():
        if isinstance(module, KVCacheQuantizer) and module.spec.dynamic:
            module.spec = QuantSpec(**{**module.spec.model_dump(), "granularity": "group", "group_size": group_size})
            changed += 1
    return changed


def float64_products(model: torch.nn.Module) -> int:
    """Make every Linear with quantized inputs compute fq(x) @ dequant(W)^T + b in float64, cast back to x's dtype;
    return how many."""
    def forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.double()
        y = torch.nn.functional.linear(self.quantize_input(x).double(), self.dequantized_weight().double(), bias)
        return y.to(x.dtype)
    changed = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.input_spec is not None:
            module.forward = MethodType(forward, module)
            changed += 1
    return changed


def keep_first_positions(model: torch.nn.Module, count: int) -> int:
    """Give every KV-cache quantizer ``count`` float first positions (`KVCacheQuantizer.keep_first`, what
    ``kv_cache_keep_first`` does); return how many."""
    changed = 0
    for module in model.modules():
        if isinstance(module, KVCacheQuantizer):
            module.keep_first = count
            changed += 1
    return changed


@torch.no_grad()
def correct_input_bias(model: torch.nn.Module, tokenizer: object, samples: int) -> int:
    """Add W_q E[x - fq(x)] to the output of every Linear with quantized inputs, the mean over ``samples``
    calibration samples (pydoc's calibration split, 512 tokens) seen in one pass of the quantized model; return how
    many Linears."""
    sums: dict[QuantLinear, tuple[torch.Tensor, int]] = {}

    def record(module: QuantLinear, args: tuple) -> None:
        x = args[0].float()
        error = (x - module.quantize_input(x)).reshape(-1, x.shape[-1])
        total, count = sums.get(module, (0.0, 0))
        sums[module] = (total + error.double().sum(0), count + error.shape[0])

    linears = [m for m in model.modules() if isinstance(m, QuantLinear) and m.input_spec is not None]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    rows = data.calibration_samples(data.tokenize(tokenizer, data.corpus("pydoc", "calib")), samples, 512)
    for row in rows:
        model(row[None])
    for hook in hooks:
        hook.remove()
    for module, (total, count) in sums.items():
        shift = (module.dequantized_weight().double() @ (total / count)).float()
        module.register_forward_hook(lambda _, __, out, shift=shift: out + shift.to(out.dtype))
    return len(sums)


def restore(model: torch.nn.Module, kept: dict[str, tuple[object, object]]) -> None:
    for name, (spec, quantizing) in kept.items():
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear):
            module.set_input_spec(spec)
        else:
            module.spec, module.quantizing = spec, quantizing
            module.__dict__.pop("_quantized", None)  # (a one-side override: the class's method again)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--parts", nargs="+", default=["", "q_proj,k_proj,v_proj", "o_proj", "gate_proj,up_proj",
                                                        "down_proj", "kv"])
    parser.add_argument("--corpora", nargs="+", default=["pydoc", "stdlib"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric dynamic inputs in every row")
    parser.add_argument("--input-groups", type=int, default=None, help="dynamic inputs per token in groups of N")
    parser.add_argument("--clip-grid", type=float, nargs="+", default=None, help="dynamic inputs' clip grid")
    parser.add_argument("--kv-keep-first", type=int, default=0, help="the KV cache's first N positions float")
    parser.add_argument("--bias-correct", type=int, default=0, help="inputs' mean error corrected over N samples")
    parser.add_argument("--float64", action="store_true", help="the Linears' products in float64")
    parser.add_argument("--kv-groups", type=int, default=None, help="a dynamic KV cache in groups of N channels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = llmquant.load(args.checkpoint, device="cpu")
    set_runtime(model, "fake")
    update: dict[str, object] = {}
    if args.asymmetric:
        update.update(symmetric=False)
    if args.input_groups:
        update.update(granularity="group", group_size=args.input_groups)
    if args.clip_grid:
        update.update(clip_grid=tuple(args.clip_grid), clip_ratio=1.0)
    if update and not update_dynamic_inputs(model, update):
        raise SystemExit("--asymmetric, --input-groups, --clip-grid: the checkpoint has no Linear with dynamic "
                         "integer inputs")
    if args.kv_groups and not regroup_kv_cache(model, args.kv_groups):
        raise SystemExit("--kv-groups: the checkpoint has no dynamic KV cache")
    if args.float64:
        float64_products(model)
    if args.kv_keep_first and not keep_first_positions(model, args.kv_keep_first):
        raise SystemExit("--kv-keep-first: the checkpoint has no KV-cache quantizer")
    if args.bias_correct:
        correct_input_bias(model, tokenizer, args.bias_correct)
    windows = {name: data.corpus_windows(tokenizer, name, 512, args.max_windows) for name in args.corpora}
    reference, _ = llmquant.load(None, device="cpu")
    float_ppl = {name: perplexity(reference, w) for name, w in windows.items()}
    del reference
    for part in args.parts:
        kept = change(model, part)
        ratios = {name: perplexity(model, w) / float_ppl[name] for name, w in windows.items()}
        restore(model, kept)
        key, value = ("clip", part) if "=" in part else ("float", part or "nothing")
        print(json.dumps({key: value, **{name: round(r, 4) for name, r in ratios.items()}}), flush=True)


if __name__ == "__main__":
    main()

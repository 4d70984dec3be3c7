"""Side-by-side: llm-compressor on the default model, with llmquant's calibration samples and perplexity
protocol (same windows, same formula), for W8A8 in int8 or FP8 (optionally after SmoothQuant or a rotation, with
an FP8 KV cache), for W4A8 and W4A4 (int4 weights, int8 or int4 inputs per token, dynamic) and for weight-only W4/W3
per group by round to nearest, GPTQ or AWQ.

llm-compressor lives in its own throw-away environment (it pins its own dependencies):

    bash scripts/llmcompressor_env.sh            # creates /tmp/llmc with torch==2.13.0 + llmcompressor
    export PYTHONPATH=src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py --alpha 0.5 --out bench/llmc_smooth_0.5.json
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py --algorithm gptq --group-size 64 \\
        --schemes w_int4_per_group_sym w_uint4_per_group_asym --out bench/llmc_w4_gptq_g64.json
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py --rotation spinquant-hadamard \\
        --schemes w_int8_per_tensor_a_int8_per_tensor_static --out bench/llmc_rot_hadamard.json
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py --schemes w_fp8_per_tensor_a_fp8_per_tensor_static \
        w_fp8_per_channel_a_fp8_per_token_dynamic --out bench/llmc_fp8.json      # presets FP8, FP8_DYNAMIC
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py --schemes w_fp8_per_tensor_a_fp8_per_tensor_static \
        --scales-against DIR --out bench/llmc_fp8_static_scales.json  # its scales over llmquant's checkpoint DIR's
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py --schemes w_fp8_per_tensor_a_fp8_per_tensor_static \
        --input-observer static_minmax --save /tmp/llmc_ck       # also writes its checkpoint, for
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py --eval-checkpoints DIR /tmp/llmc_ck/SCHEME  # both run alike
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py --schemes w_fp8_block128_a_fp8_group128_dynamic \
        --out bench/llmc_fp8_block.json                                            # preset FP8_BLOCK
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py --schemes w_fp8_per_channel_a_fp8_per_token_dynamic \
        --kv-cache-fp8 --out bench/llmc_fp8_kv.json                                # FP8_DYNAMIC + FP8 KV cache
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py --rotation spinquant-random-hadamard --algorithm gptq \
        --schemes w_int4_per_group_sym_a_int8_per_token_dynamic w_int4_per_channel_sym_a_int4_per_token_dynamic \
        --out bench/llmc_spinquant_w4a8_w4a4.json                                  # issue 19's W4A8 / W4A4 cells

Writes the same JSON shape as benchmark_w8a8.py (rows of scheme, ppl, ratio, seconds), so
scripts/w8a8_table.py can put both side by side; each row also names its "algorithm" and "recipe". A run
that llm-compressor refuses goes to "errors" (scheme, algorithm, recipe, the error's first line), not to
"rows". Runs on one thread (as the llmquant side is measured); seconds = wall time of `oneshot` only;
with ``--save``, save_seconds = that of writing the checkpoint (where compressed-tensors rounds the weights: each
row says whether layer 0's gate_proj weight after ``oneshot`` is still the loaded one).
On a machine without an accelerator AWQ needs one patch that changes no number (see `cpu_workarounds`).
The float checkpoint is the one llmquant caches (run any llmquant command once first).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform import AWQModifier, QuIPModifier, SmoothQuantModifier, SpinQuantModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmquant import data
from llmquant.evaluation.perplexity import perplexity
from llmquant.model.loading import DEFAULT_MODEL_NAME, cache_dir

W8A8 = {  # seed-000 names -> (weight strategy, activation strategy, dynamic)
    "w_int8_per_tensor_a_int8_per_tensor_static": ("tensor", "tensor", False),
    "w_int8_per_channel_a_int8_per_tensor_static": ("channel", "tensor", False),
    "w_int8_per_channel_a_int8_per_tensor_dynamic": ("channel", "tensor", True),
    "w_int8_per_channel_a_int8_per_token_dynamic": ("channel", "token", True),
}
FP8 = {  # llmquant names -> llm-compressor's FP8 presets (E4M3)
    "w_fp8_per_tensor_a_fp8_per_tensor_static": "FP8",
    "w_fp8_per_channel_a_fp8_per_token_dynamic": "FP8_DYNAMIC",
    "w_fp8_block128_a_fp8_group128_dynamic": "FP8_BLOCK",
}
LOW_BIT = {  # W4A8 and W4A4: (weight bits, weight strategy, activation bits); symmetric, inputs per token, dynamic
    "w_int4_per_group_sym_a_int8_per_token_dynamic": (4, "group", 8),
    "w_int4_per_channel_sym_a_int4_per_token_dynamic": (4, "channel", 4),
}
WEIGHT_ONLY = {  # llmquant names -> (llm-compressor preset whose weights are taken, symmetric)
    "w_int4_per_group_sym": ("W4A16", True),
    "w_uint4_per_group_asym": ("W4A16_ASYM", False),
    "w_int3_per_group_sym": ("W3A16", True),
    "w_uint3_per_group_asym": ("W3A16", False),  # no W3 asym preset: W3A16 with symmetric=False
}
ROTATIONS = {  # name -> (modifier class, rotations, transform_type)
    "spinquant-hadamard": (SpinQuantModifier, ["R1", "R2"], "hadamard"),  # Sylvester: powers of 2 only
    "spinquant-random-hadamard": (SpinQuantModifier, ["R1", "R2"], "random-hadamard"),
    "spinquant-random-hadamard-r4": (SpinQuantModifier, ["R1", "R2", "R4"], "random-hadamard"),  # QuaRot-like
    "quip-hadamard": (QuIPModifier, ["v"], "hadamard"),
    "quip-random-hadamard": (QuIPModifier, ["v"], "random-hadamard"),
}
INPUT_OBSERVER_DEFAULT = "minmax, the default: moving average of per-batch min/max, averaging_constant=0.01"
GPTQ_DEFAULTS = "block_size=128, dampening_frac=0.01, actorder=static"  # llm-compressor's defaults, as used


def cpu_workarounds() -> list[str]:
    """Make llm-compressor run on a machine without an accelerator; returns what was changed.

    AWQModifier pins its cached activations (`IntermediatesCache.pin_memory`, only there to speed up
    host-to-device copies), and pinning raises "Cannot access accelerator device when none is available"
    on a CPU-only torch. Without an accelerator nothing is copied, so skipping the pinning changes no number.
    """
    if torch.accelerator.is_available():
        return []
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return ["IntermediatesCache.pin_memory made a no-op (no accelerator: AWQ's pinning raises on CPU)"]


def scheme_for(name: str, group_size: int) -> tuple[QuantizationScheme, str]:
    """The llm-compressor scheme for llmquant's preset ``name`` and a short description of it."""
    if name in W8A8:
        weight, activation, dynamic = W8A8[name]
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=weight),
            input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=activation,
                                               dynamic=dynamic),
        )
        return scheme, f"int8 sym weights per {weight}, int8 sym inputs per {activation} " + (
            "dynamic" if dynamic else "static")
    if name in LOW_BIT:
        bits, strategy, input_bits = LOW_BIT[name]
        group = group_size if strategy == "group" else None
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=group),
            input_activations=QuantizationArgs(num_bits=input_bits, type="int", symmetric=True, strategy="token",
                                               dynamic=True),
        )
        grain = f"group {group}" if group else strategy
        return scheme, f"int{bits} sym weights per {grain}, int{input_bits} sym inputs per token dynamic"
    if name in FP8:
        fp8 = PRESET_SCHEMES[FP8[name]]
        inputs = fp8["input_activations"]
        return QuantizationScheme(targets=["Linear"], **fp8), f"preset {FP8[name]}" + (
            "" if inputs.dynamic else ", inputs static")
    preset, symmetric = WEIGHT_ONLY[name]
    base = PRESET_SCHEMES[preset]["weights"]  # the preset's args, with llmquant's group size (and symmetry)
    weights = QuantizationArgs(num_bits=base.num_bits, type=base.type, strategy=base.strategy,
                               symmetric=symmetric, dynamic=base.dynamic, group_size=group_size)
    changed = f"group_size={group_size}" + ("" if symmetric == base.symmetric else ", symmetric=False")
    return QuantizationScheme(targets=["Linear"], weights=weights), f"preset {preset} with {changed}"


def recipe_for(name: str, algorithm: str, group_size: int, alpha: float | None, rotation: str | None,
               bypass: bool, input_observer: str | None = None, kv_fp8: bool = False) -> tuple[list, str]:
    """The oneshot recipe (list of modifiers) and a one-line description of it."""
    scheme, described = scheme_for(name, group_size)
    if described.endswith("static"):  # the observer decides the static activation range
        described += f" (input observer {input_observer or INPUT_OBSERVER_DEFAULT})"
    recipe, parts = [], []
    if rotation is not None:
        cls, rotations, transform_type = ROTATIONS[rotation]
        recipe.append(cls(rotations=rotations, transform_type=transform_type))
        parts.append(f"{cls.__name__}(rotations={rotations}, transform_type={transform_type})")
    if alpha is not None:
        recipe.append(SmoothQuantModifier(smoothing_strength=alpha))
        parts.append(f"SmoothQuantModifier(smoothing_strength={alpha})")
    quant = {"config_groups": {"group_0": scheme}, "ignore": ["lm_head"]}
    if bypass:
        quant["bypass_divisibility_checks"] = True
    if input_observer is not None:
        quant["input_observer"] = input_observer
    extra = ", bypass_divisibility_checks=True" if bypass else ""
    if kv_fp8:  # static per-tensor k_scale / v_scale, as llmquant's fp8_per_tensor
        quant["kv_cache_scheme"] = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor",
                                                    dynamic=False)
        extra += ", kv_cache_scheme FP8 per tensor static"
    if algorithm == "gptq":
        recipe.append(GPTQModifier(**quant))
        parts.append(f"GPTQModifier({described}, {GPTQ_DEFAULTS}{extra})")
    else:
        if algorithm == "awq":
            recipe.append(AWQModifier())  # defaults: duo_scaling=True, n_grid=20, mappings inferred
            parts.append("AWQModifier(duo_scaling=True, n_grid=20)")
        recipe.append(QuantizationModifier(**quant))
        parts.append(f"QuantizationModifier({described}{extra})")
    return recipe, " + ".join(parts) + "; ignore lm_head"


def scale_ratios(model: torch.nn.Module, checkpoint: Path) -> dict[str, list[float]]:
    """Linear -> [input scale, weight scale], attention -> [k_scale, v_scale] of llm-compressor's ``model`` over
    those of the llmquant ``checkpoint`` (per-tensor scales; the first element of larger ones)."""
    from safetensors import safe_open

    ratios = {}
    with safe_open(checkpoint / "model.safetensors", "pt") as stored:
        keys = set(stored.keys())
        for name, module in model.named_modules():
            for leaves in (("input_scale", "weight_scale"), ("k_scale", "v_scale")):  # a Linear's, an attention's
                if hasattr(module, leaves[0]) and f"{name}.{leaves[0]}" in keys:
                    ours = [stored.get_tensor(f"{name}.{leaf}").flatten()[0] for leaf in leaves]
                    theirs = [getattr(module, leaf).flatten()[0] for leaf in leaves]
                    ratios[name] = [float(t / o) for t, o in zip(theirs, ours, strict=True)]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemes", nargs="+", default=list(W8A8), choices=[*W8A8, *FP8, *LOW_BIT, *WEIGHT_ONLY])
    parser.add_argument("--algorithm", choices=["rtn", "gptq", "awq"], default="rtn",
                        help="rtn = QuantizationModifier alone (min-max round to nearest)")
    parser.add_argument("--group-size", type=int, default=64, help="for the weight-only and W4A8 schemes")
    parser.add_argument("--alpha", type=float, default=None, help="SmoothQuant strength; omit for none")
    parser.add_argument("--rotation", choices=list(ROTATIONS), default=None)
    parser.add_argument("--bypass-divisibility-checks", action="store_true",
                        help="llm-compressor's escape hatch for group sizes that do not divide the columns")
    parser.add_argument("--input-observer", default=None,
                        help="observer of static input activations, e.g. static_minmax (min/max over all "
                             "calibration samples, as llmquant's min-max); default: llm-compressor's minmax")
    parser.add_argument("--kv-cache-fp8", action="store_true", help="also an FP8 KV cache (static per tensor)")
    parser.add_argument("--scales-against", default=None, help="an llmquant checkpoint of the same scheme: each "
                        "Linear's static input and weight scale of llm-compressor's over llmquant's, into the JSON")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="write each scheme's compressed checkpoint to DIR/<scheme> (llm-compressor's format)")
    parser.add_argument("--eval-checkpoints", nargs="+", default=None, metavar="DIR",
                        help="no llm-compressor run: the perplexity of these compressed-tensors checkpoints "
                             "(llmquant's or llm-compressor's) as transformers with compressed-tensors runs them")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seed", type=int, default=0, help="the draw of calibration windows (llmquant's "
                                                                    "calib.seed)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/llmc.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workarounds = cpu_workarounds()

    source = cache_dir() / f"{DEFAULT_MODEL_NAME}-float32"
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens = data.tokenize(tokenizer, data.corpus("pydoc", "calib"))
    calib = data.calibration_samples(tokens, args.calib_samples, args.seqlen, seed=args.calib_seed)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    windows = data.corpus_windows(tokenizer, "pydoc", args.seqlen, args.max_windows)
    if args.eval_checkpoints:
        for directory in args.eval_checkpoints:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
            print(json.dumps({"checkpoint": directory, "runtime": "transformers + compressed-tensors",
                              "windows": len(windows), "ppl": perplexity(model, windows)}), flush=True)
        return
    float_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    float_ppl = perplexity(float_model, windows)
    del float_model
    print(f"float32 perplexity {float_ppl:.3f}", flush=True)
    rows, errors = [], []
    for name in args.schemes:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        probe = model.model.layers[0].mlp.gate_proj  # does oneshot round the weights, or does saving?
        loaded = probe.weight.detach().clone()
        recipe, described = recipe_for(name, args.algorithm, args.group_size, args.alpha, args.rotation,
                                       args.bypass_divisibility_checks, args.input_observer, args.kv_cache_fp8)
        start = time.perf_counter()
        try:
            oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=args.calib_samples,
                    max_seq_length=args.seqlen, shuffle_calibration_samples=False)
            seconds = time.perf_counter() - start
            ppl = perplexity(model, windows)
        except Exception as err:  # llm-compressor's refusal (or a failed evaluation) is a result too
            traceback.print_exc()
            first = (str(err).strip().splitlines() or [""])[0]
            errors.append({"scheme": name, "algorithm": args.algorithm, "recipe": described,
                           "error": f"{type(err).__name__}: {first}", "seconds": time.perf_counter() - start})
            print(f"| llm-compressor {args.algorithm} {name} | error: {errors[-1]['error']} |", flush=True)
            continue
        rows.append({"scheme": name, "algorithm": args.algorithm, "recipe": described, "ppl": ppl,
                     "ratio": ppl / float_ppl, "seconds": seconds,
                     "layer0_gate_proj_weight_unchanged_by_oneshot": torch.equal(probe.weight.detach(), loaded)})
        if args.save:  # compressed-tensors quantizes the weights here (save_compressed): timed apart
            start = time.perf_counter()
            model.save_pretrained(Path(args.save) / name, save_compressed=True)
            tokenizer.save_pretrained(Path(args.save) / name)
            rows[-1]["save_seconds"] = time.perf_counter() - start
        if args.scales_against:
            rows[-1]["scale_ratios"] = scale_ratios(model, Path(args.scales_against))
        print(f"| llm-compressor {args.algorithm} {name} | {ppl:.3f} | x{ppl / float_ppl:.3f} | {seconds:.1f} |",
              flush=True)
    import compressed_tensors
    import llmcompressor
    import transformers

    pre_opts = ([] if args.rotation is None else [f"llmc-{args.rotation}"]) + (
        [] if args.alpha is None else ["llmc-smoothquant"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "tool": "llm-compressor", "date": time.strftime("%Y-%m-%d"), "float_ppl": float_ppl,
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "algorithm": args.algorithm, "group_size": args.group_size, "threads": torch.get_num_threads(),
        "pre_opts": pre_opts, "alpha": args.alpha, "rotation": args.rotation,
        "input_observer": args.input_observer, "kv_cache_fp8": args.kv_cache_fp8,
        "calib_samples": args.calib_samples, "calib_seed": args.calib_seed, "seqlen": args.seqlen,
        "windows": len(windows),
        "workarounds": workarounds, "rows": rows, "errors": errors,
    }, indent=2))


if __name__ == "__main__":
    main()

"""llmquant against llm-compressor on one GPU: the same random Llama-3-8B-shaped model (32 layers, bf16), the same
calibration (32 x 512 random tokens), GPTQ W4 g128, SmoothQuant + W8A8 per-token and AWQ W4 g128, in one run.

    bash scripts/gpu_bench.sh          # on the GPU machine: installs the carried wheels, runs the GPU tests, then this

What it does:

1. Writes the random model once as a Hugging Face checkpoint (safetensors shards, bf16, normal(0, 0.02) weights
   drawn on the GPU from a fixed seed, unit norms) with a tiny tokenizer (the token ids are random anyway).
2. Runs each (recipe, tool) in a fresh process, so that peak GPU memory and the CUDA caches are its own:
   load the checkpoint into CPU memory (timed: "load"), quantize on the GPU (timed: "quantize"; no save, no
   evaluation), and report the peak GPU memory (`torch.cuda.max_memory_allocated`). llm-compressor runs
   `oneshot` with its sequential pipeline, which brings one layer at a time onto the GPU as llmquant does.
3. Prints a table (seconds, peak GiB, llmquant / llm-compressor) and writes every figure to OUT/gpu_bench.json.

Equal settings, as far as the two tools have them:
- GPTQ: symmetric int4 groups of 128, static activation order, dampening 0.01, blocks of 128, the Hessians of a
  layer from its float pass (llmquant ``true_sequential: false``, which is what llm-compressor does).
- SmoothQuant: alpha 0.5, then int8 weights per channel and int8 inputs per token, dynamic, by round to nearest.
  llmquant smooths every group it finds (the two norms and v_proj -> o_proj, up_proj -> down_proj);
  llm-compressor's default mappings smooth the two norm groups.
- AWQ: asymmetric int4 groups of 128, a 20-point grid, then the clipping search (llmquant) / llm-compressor's
  AWQModifier defaults, then round to nearest.
A stage that would not finish before ``--deadline`` is skipped and said so; a failed one is reported with its
error. On a machine without a GPU, ``--shape tiny --device cpu`` checks the script itself.

Mixtures of experts: ``--shape qwen3-30b-a3b-layer`` (one Qwen3-30B-A3B-shaped layer: 128 experts of 768, 8 chosen
a token; ``tiny-moe`` to check the script) writes the random model with transformers' ``save_pretrained`` and runs
GPTQ only; both tools send every calibration token through every expert (llmquant's default, llm-compressor's
``moe_calibrate_all_experts``) and leave the routers float.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

SHAPES = {
    "llama3-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
                  "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "tiny": {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
             "tie_word_embeddings": False},
    # mixtures of experts (Qwen3-MoE, transformers' fused experts; the vocabulary cut: the head is not quantized)
    "qwen3-30b-a3b-layer": {"vocab_size": 1024, "hidden_size": 2048, "intermediate_size": 6144,
                            "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                            "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 4,
                            "head_dim": 128, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "tiny-moe": {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
                 "num_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024,
                 "tie_word_embeddings": False},
}
RUNS = {  # name -> llmquant recipe (llm-compressor's: `llmcompressor_recipe`); the goals name GPTQ and AWQ first
    "gptq_w4_g128": {"scheme": "w_int4_per_group_sym", "group_size": 128, "algorithm": "gptq",
                     "gptq": {"true_sequential": False}},
    "awq_w4_g128": {"scheme": "w_uint4_per_group_asym", "group_size": 128, "algorithm": "awq"},
    "smoothquant_w8a8_per_token": {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic",
                                   "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]},
}
TOOLS = ("llmquant", "llmcompressor")
SHARD_LAYERS = 4  # decoder layers per safetensors shard of the random checkpoint


# --- the random checkpoint ---------------------------------------------------------------------------------
def is_moe(shape: str) -> bool:
    return "num_experts" in SHAPES[shape]


def build_checkpoint(directory: Path, shape: str, layers: int | None, device: str, seed: int = 0) -> dict:
    """Write the random model (see the module docstring); returns its config."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from llmquant.testing.tiny_checkpoint import tiny_tokenizer

    fields = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    if (directory / "config.json").exists():  # written by an earlier run on this machine
        return json.loads((directory / "config.json").read_text())
    if is_moe(shape):
        return build_moe_checkpoint(directory, fields, seed, tiny_tokenizer())
    config = LlamaConfig(**fields, dtype="bfloat16")
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()

    def ones(size: int) -> torch.Tensor:
        return torch.ones(size, dtype=torch.bfloat16)

    weight_map, shard, names = {}, {}, []
    total_shards = (config.num_hidden_layers + SHARD_LAYERS - 1) // SHARD_LAYERS + 1

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}-of-{total_shards:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)
        shard.clear()

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shard.update({
            p + "self_attn.q_proj.weight": normal(hidden, hidden), p + "self_attn.k_proj.weight": normal(kv, hidden),
            p + "self_attn.v_proj.weight": normal(kv, hidden), p + "self_attn.o_proj.weight": normal(hidden, hidden),
            p + "mlp.gate_proj.weight": normal(inter, hidden), p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter), p + "input_layernorm.weight": ones(hidden),
            p + "post_attention_layernorm.weight": ones(hidden),
        })
        if (i + 1) % SHARD_LAYERS == 0:
            flush()
    if shard:
        flush()
    shard.update({"model.embed_tokens.weight": normal(config.vocab_size, hidden), "model.norm.weight": ones(hidden),
                  "lm_head.weight": normal(config.vocab_size, hidden)})
    flush()
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return config.to_dict()


def build_moe_checkpoint(directory: Path, fields: dict, seed: int, tokenizer: Any) -> dict:
    """A random Qwen3-MoE model (transformers' own initialisation, bf16) as ``save_pretrained`` writes it: one tensor
    per expert matrix, which both tools read back as transformers' fused experts; with ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(**fields, dtype="bfloat16")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = directory.with_name(directory.name + ".partial")  # renamed once whole: never taken half-written
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(directory)
    return config.to_dict()


def calibration(vocab: int, samples: int, seqlen: int, seed: int = 1):  # -> torch.Tensor
    import torch

    return torch.randint(0, vocab, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


# --- one (recipe, tool) in its own process -----------------------------------------------------------------
def run_llmquant(model_dir: Path, run: str, device: str, ids) -> dict:
    import torch

    import llmquant

    start = time.perf_counter()
    model, _ = llmquant.load(model_dir, device="cpu")
    loaded = time.perf_counter()
    llmquant.quantize(model, RUNS[run], calib=ids, device=device, progress=False)
    done = time.perf_counter()
    manifest = model.llmquant_manifest
    return {"load_s": loaded - start, "quantize_s": done - loaded, "stages_s": manifest.seconds,
            "mean_layer_output_error": sum(r["output_error"] for r in manifest.layers) / len(manifest.layers),
            "activations": manifest.results["activations"], "dtype": str(next(model.parameters()).dtype),
            "versions": {"llmquant": llmquant.__version__, "torch": torch.__version__}}


def llmcompressor_recipe(run: str) -> list:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    try:
        from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier
    except ImportError:  # where older releases keep them
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    def group(symmetric: bool) -> dict:  # (routers stay float, as llmquant leaves them: the MoE shapes)
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=128)
        return {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                "ignore": ["lm_head", "re:.*mlp.gate$"]}

    if run == "gptq_w4_g128":
        return [GPTQModifier(**group(True), block_size=128, dampening_frac=0.01, actorder="static")]
    if run == "awq_w4_g128":
        return [AWQModifier(), QuantizationModifier(**group(False))]
    w8a8 = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True))
    return [SmoothQuantModifier(smoothing_strength=0.5),
            QuantizationModifier(config_groups={"group_0": w8a8}, ignore=["lm_head"])]


def run_llmcompressor(model_dir: Path, run: str, device: str, ids) -> dict:
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    loaded = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=llmcompressor_recipe(run), processor=tokenizer,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    done = time.perf_counter()
    return {"load_s": loaded - start, "quantize_s": done - loaded,
            "versions": {"llmcompressor": llmcompressor.__version__,
                         "compressed_tensors": compressed_tensors.__version__,
                         "transformers": transformers.__version__, "torch": torch.__version__}}


def worker(args: argparse.Namespace) -> None:
    import torch

    config = json.loads((args.model_dir / "config.json").read_text())
    ids = calibration(config["vocab_size"], args.samples, args.seqlen)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run = run_llmquant if args.worker == "llmquant" else run_llmcompressor
    try:
        result = run(args.model_dir, args.run, args.device, ids)
        result["peak_gpu_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda")
                                  else None)
    except Exception as err:  # reported, not fatal: the other runs go on
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"}
    args.result.write_text(json.dumps(result))


# --- GPTQ's sweep alone: the reference loop against the fused kernel ----------------------------------------
def sweep_benchmark(device: str, rows: int, columns: int) -> dict:
    """One GPTQ sweep of a q/k/v-shaped weight (W4 g128 symmetric, static activation order) by the reference loop
    (``LLMQUANT_GPTQ_KERNEL=torch``) and by the fused kernel: seconds, codes agreement, error ratio."""
    import torch

    from llmquant.algorithms.gptq import HessianAccumulator, fused_sweep_available, gptq_quantize
    from llmquant.quant import QuantSpec

    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(8192, columns, generator=generator, device=device)
    x = x @ (torch.randn(columns, columns, generator=generator, device=device) / columns**0.5)
    weight = torch.randn(rows, columns, generator=generator, device=device) * 0.02
    hessian = HessianAccumulator(columns, device=device)
    hessian.add_batch(x)
    spec = QuantSpec(bits=4, symmetric=True, granularity="group", group_size=128)
    figures: dict = {"shape": [rows, columns], "fused_available": fused_sweep_available(weight)}
    results = {}
    for kernel in ("triton", "torch"):
        os.environ["LLMQUANT_GPTQ_KERNEL"] = kernel
        if kernel == "triton":  # compile first
            gptq_quantize(weight[:64], hessian.hessian, spec, act_order=True, static_groups=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        results[kernel] = gptq_quantize(weight, hessian.hessian, spec, act_order=True, static_groups=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        figures[f"{kernel}_s"] = time.perf_counter() - start
    os.environ.pop("LLMQUANT_GPTQ_KERNEL")
    figures["codes_agreement"] = float((results["triton"].codes == results["torch"].codes).float().mean())

    def error(q: torch.Tensor) -> float:
        return float((x[:2048] @ (q - weight).T).norm())

    figures["error_ratio_fused_over_loop"] = error(results["triton"].weight) / error(results["torch"].weight)
    return figures


# --- the whole benchmark ------------------------------------------------------------------------------------
def spawn(tool: str, run: str, args: argparse.Namespace, remaining: float) -> dict:
    result_file = args.work / f"{run}.{tool}.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ)
    path = args.llmquant_path if tool == "llmquant" else args.llmcompressor_path
    if path is not None:
        env["PYTHONPATH"] = path
    python = args.llmcompressor_python if tool == "llmcompressor" and args.llmcompressor_python else sys.executable
    command = [python, __file__, "--worker", tool, "--run", run, "--model-dir", str(args.model_dir),
               "--device", args.device, "--samples", str(args.samples), "--seqlen", str(args.seqlen),
               "--result", str(result_file)]
    start = time.perf_counter()
    try:
        subprocess.run(command, env=env, timeout=min(args.timeout, remaining), check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {time.perf_counter() - start:.0f} s (timeout)"}
    if not result_file.exists():
        return {"error": "the worker wrote no result"}
    result = json.loads(result_file.read_text())
    result["process_s"] = time.perf_counter() - start
    return result


def table(results: dict) -> str:
    rows = ["| run | tool | load s | quantize s | peak GPU GiB | quantize llmquant / llm-compressor |",
            "|---|---|---|---|---|---|"]
    for run, by_tool in results.items():
        theirs = by_tool.get("llmcompressor", {}).get("quantize_s")
        for tool, r in by_tool.items():
            if "error" in r:
                rows.append(f"| {run} | {tool} | - | - | - | {r['error']} |")
                continue
            ratio = f"{r['quantize_s'] / theirs:.2f}" if tool == "llmquant" and theirs else ""
            peak = f"{r['peak_gpu_gib']:.2f}" if r.get("peak_gpu_gib") is not None else "-"
            rows.append(f"| {run} | {tool} | {r['load_s']:.1f} | {r['quantize_s']:.1f} | {peak} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu_bench")))
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random checkpoint goes")
    parser.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=None,
                        help="default: all of them; GPTQ alone on the mixture-of-experts shapes")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--build-only", action="store_true", help="write the random checkpoint, run nothing")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="skip the GPTQ sweep benchmark (reference loop against the fused kernel)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one (run, tool) may take")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds the whole benchmark may take")
    parser.add_argument("--llmquant-path", default=None, help="PYTHONPATH of the llmquant workers")
    parser.add_argument("--llmcompressor-path", default=None, help="PYTHONPATH of the llm-compressor workers")
    parser.add_argument("--llmcompressor-python", default=None,
                        help="the interpreter of the llm-compressor workers (default: this one)")
    parser.add_argument("--worker", choices=TOOLS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run", choices=list(RUNS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = args.model_dir or Path(f"/tmp/llmquant-gpu-bench-{args.shape}")
    args.runs = args.runs or (["gptq_w4_g128"] if is_moe(args.shape) else list(RUNS))
    args.work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))  # the workers' results (OUT keeps few files)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "shape": args.shape, "device": args.device,
                    "samples": args.samples, "seqlen": args.seqlen, "results": {}}
    if args.build_only:
        config = build_checkpoint(args.model_dir, args.shape, args.layers, args.device)
        print(f"random checkpoint: {config['num_hidden_layers']} layers in {args.model_dir}", flush=True)
        return
    if args.sweep:
        shape = SHAPES[args.shape]
        kv = shape["num_key_value_heads"] * shape["hidden_size"] // shape["num_attention_heads"]
        try:
            report["sweep"] = sweep_benchmark(args.device, shape["hidden_size"] + 2 * kv, shape["hidden_size"])
        except Exception as err:  # reported, not fatal
            traceback.print_exc()
            report["sweep"] = {"error": f"{type(err).__name__}: {err}"}
        print(f"GPTQ sweep, loop against fused kernel: {json.dumps(report['sweep'])}", flush=True)
    built = time.perf_counter()
    config = build_checkpoint(args.model_dir, args.shape, args.layers, args.device)
    report.update(layers=config["num_hidden_layers"], build_s=time.perf_counter() - built)
    print(f"random checkpoint: {config['num_hidden_layers']} layers in {report['build_s']:.1f} s", flush=True)
    for run in args.runs:
        report["results"][run] = {}
        for tool in args.tools:
            remaining = args.deadline - (time.perf_counter() - start)
            if remaining < 30:
                report["results"][run][tool] = {"error": "skipped: the deadline was near"}
                continue
            report["results"][run][tool] = spawn(tool, run, args, remaining)
            print(f"{run} {tool}: {json.dumps(report['results'][run][tool])}", flush=True)
            (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    report["seconds"] = time.perf_counter() - start
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    print(table(report["results"]))


if __name__ == "__main__":
    main()

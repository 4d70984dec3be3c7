"""A model larger than the memory cap still quantizes: a random Llama-architecture model of about 1.5B
parameters (6 GB of float32 weights) quantized under ``--max-memory 2GB``, with the peak resident memory of
the quantizing process measured by the kernel (``/usr/bin/time``'s maximum resident set size, and the
manifest's ``peak_rss_mb``).

    .venv/bin/python scripts/memory_bound_demo.py [--work /tmp/llmquant-memory-demo] [--out bench/memory_bound.json]
        [--calib-samples 4 --seqlen 256] [--activations auto|memory|disk]

The model is written once (sharded safetensors, the default model's tokenizer); the quantization runs in its
own process: ``llmquant quantize --model DIR --scheme w_uint4_per_group_asym --group-size 64 --max-memory 2GB``
with 4 calibration samples of 256 tokens by default (the weights are what is shown then). With 64 samples of
512 tokens the calibration activations are 256 MiB per copy (a layer's inputs, float reference and outputs:
768 MiB, more than a quarter of the cap): ``--activations memory`` against ``disk`` shows what keeping them
on disk saves.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

CONFIG = {  # Llama-architecture, 1.54B parameters with the default model's vocabulary
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 26, "num_attention_heads": 16,
    "num_key_value_heads": 16, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": False,
}


def write_model(directory: Path) -> int:
    """The random float32 model and the default model's tokenizer at ``directory``; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmquant

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).float()
    count = sum(p.numel() for p in model.parameters())
    if not (directory / "config.json").exists():
        model.save_pretrained(directory, max_shard_size="1GB")
        llmquant.load(None)[1].save_pretrained(directory)
    return count


def quantize(directory: Path, output: Path, cap: str, calibration: list[str]) -> tuple[float, float, str]:
    """Run the quantization in its own process under /usr/bin/time; (seconds, max RSS in MiB, last lines)."""
    command = ["/usr/bin/time", "-v", str(Path(sys.executable).with_name("llmquant")), "quantize", "--quiet",
               "--model", str(directory), "--scheme", "w_uint4_per_group_asym", "--group-size", "64",
               "--max-memory", cap, *calibration, "--output", str(output), "--overwrite"]  # a rerun replaces it
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"quantize failed:\n{done.stderr[-2000:]}")
    rss_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return seconds, int(rss_kb.group(1)) / 1024 if rss_kb else float("nan"), done.stdout.strip()[-600:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/llmquant-memory-demo")
    parser.add_argument("--cap", default="2GB")
    parser.add_argument("--out", default="bench/memory_bound.json")
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--activations", default="auto", choices=["auto", "memory", "disk"])
    args = parser.parse_args()
    work = Path(args.work)
    model_dir, output = work / "model", work / f"w4-{args.calib_samples}x{args.seqlen}-{args.activations}"
    count = write_model(model_dir)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    calibration = ["--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen),
                   "--activations", args.activations]
    seconds, rss_mb, summary = quantize(model_dir, output, args.cap, calibration)
    manifest = json.loads((output / "llmquant.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d"), "parameters": count, "float32_weights_mb": weights / 2**20,
        "cap": args.cap, "calib_samples": args.calib_samples, "seqlen": args.seqlen,
        "activations": manifest["results"].get("activations"),
        "max_rss_mb": rss_mb, "manifest_peak_rss_mb": manifest["results"].get("peak_rss_mb"),
        "seconds": seconds, "checkpoint_mb": sum(p.stat().st_size for p in output.glob("*.safetensors")) / 2**20,
        "summary": summary,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

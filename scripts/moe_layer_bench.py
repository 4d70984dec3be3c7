"""One Qwen3-30B-A3B-shaped decoder layer (128 experts, 8 chosen a token) with random weights, quantized by
llmquant: seconds and peak memory, on the CPU or a GPU.

    .venv/bin/python scripts/moe_layer_bench.py [--device cpu|cuda] [--samples 8] [--seqlen 512] \
        [--algo gptq] [--moe-calibrate all|routed] [--max-memory 3.5GB] [--json bench/moe_layer_cpu.json]

Shapes of Qwen3-30B-A3B: hidden 2048, 32 query heads and 4 KV heads of 128, experts of 768, vocabulary cut to
1024 (the head is not quantized). Scheme W4 symmetric, groups of 128 (llm-compressor's W4A16). Peak memory is
the process's resident peak (``ru_maxrss``) and, on a GPU, torch's peak allocation. ``--max-memory`` (and
``--max-gpu-memory`` on a GPU) cap the run as the command line's options do: GPTQ then takes the experts a few at a
time, as many as the memory left under the cap holds (`llmquant.device.DevicePolicy.working_memory`).
`scripts/moe_layer_phases.py` runs this bench with GPTQ's time split by phase.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import llmquant
from llmquant.pipeline.engine import peak_rss_mb
from llmquant.pipeline.memory import parse_size


def qwen3_30b_a3b_layer(dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=1024, hidden_size=2048, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
        max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on a GPU")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--algo", default="gptq", choices=["rtn", "gptq", "awq"])
    parser.add_argument("--moe-calibrate", default="all", choices=["all", "routed"])
    parser.add_argument("--max-memory", default=None, metavar="SIZE")
    parser.add_argument("--max-gpu-memory", default=None, metavar="SIZE")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cap, gpu_cap = parse_size(args.max_memory), parse_size(args.max_gpu_memory, "--max-gpu-memory")
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    t0 = time.perf_counter()
    model = qwen3_30b_a3b_layer(dtype)
    built = time.perf_counter() - t0
    calib = torch.randint(0, 1024, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(1))
    recipe = {"scheme": "w_int4_per_group_sym", "group_size": 128, "algorithm": args.algo,
              "moe_calibrate": args.moe_calibrate}
    t1 = time.perf_counter()
    llmquant.quantize(model, recipe, calib=calib, device=args.device, progress=False, max_memory=cap,
                      max_gpu_memory=gpu_cap)
    seconds = time.perf_counter() - t1
    manifest = model.llmquant_manifest
    row = manifest.layers[0]
    found = {
        "layer": "Qwen3-30B-A3B shape: hidden 2048, 128 experts of 768, top 8",
        "device": args.device, "dtype": str(dtype).removeprefix("torch."), "algorithm": args.algo,
        "moe_calibrate": args.moe_calibrate, "calibration": f"{args.samples}x{args.seqlen}",
        "build_seconds": round(built, 1), "quantize_seconds": round(seconds, 1),
        "layer_seconds": round(row["seconds"], 1), "peak_rss_mib": round(peak_rss_mb()),
        "peak_gpu_mib": row.get("peak_gpu_mb"),
        "output_error": row["output_error"], "rtn_fallback": len(row.get("gptq_rtn_fallback", {})),
        "max_memory_mib": cap and cap / 2**20, "max_gpu_memory_mib": gpu_cap and gpu_cap / 2**20,
        "working_memory_mib": row.get("gptq_working_memory_mb"), "expert_rounds": row.get("gptq_expert_rounds"),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    print(json.dumps(found, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()

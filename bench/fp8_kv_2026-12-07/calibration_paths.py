"""The same recipe, FP8 per channel / per token + FP8 KV cache per tensor by round to nearest, calibrated on llmquant's
causal blocks (`llmquant.load`, then `llmquant.quantize`, as `scripts/bench_recipe.py` does) and compared with a
checkpoint of `llmquant quantize`, which calibrates on the model's own attention (BENCHMARKS.md, "An FP8 KV cache's
perplexity moves with float rounding"): whether the weights are the same, and the ratios of the k/v scales.

    .venv/bin/python -m llmquant.cli quantize --scheme w_fp8_per_channel_a_fp8_per_token_dynamic \\
        --kv-cache fp8_per_tensor --output CLI_DIR
    PYTHONPATH=src .venv/bin/python bench/fp8_kv_2026-12-07/calibration_paths.py CLI_DIR OUT_DIR
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import llmquant

RECIPE = {"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "kv_cache": "fp8_per_tensor"}


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for path in sorted(directory.glob("*.safetensors"))
            for name, tensor in load_file(path).items()}


def main() -> None:
    cli, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(2)
    model, tokenizer = llmquant.load(None)
    llmquant.quantize(model, RECIPE, tokenizer, progress=False)
    llmquant.save(model, tokenizer, out, overwrite=True)
    theirs, ours = tensors(cli), tensors(out)
    scales = [name for name in ours if name.endswith(("k_scale", "v_scale"))]
    others = [name for name in ours if name not in scales]
    print("other tensors equal:", all(torch.equal(ours[name], theirs[name]) for name in others), f"({len(others)})")
    deviations = [abs(float(theirs[name].float().flatten()[0] / ours[name].float().flatten()[0]) - 1)
                  for name in scales]  # (the command line's over the blocks')
    print(f"k/v scales ({len(scales)}): largest |ratio - 1| {max(deviations):.3f}, "
          f"median {statistics.median(deviations):.4f}")


if __name__ == "__main__":
    main()

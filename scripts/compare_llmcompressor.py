"""Side-by-side: llm-compressor's SmoothQuantModifier + QuantizationModifier on the default model, with
llmquant's calibration samples and perplexity protocol (same windows, same formula).

llm-compressor lives in its own throw-away environment (it pins its own dependencies):

    bash scripts/llmcompressor_env.sh            # creates /tmp/llmc with torch==2.13.0 + llmcompressor
    PYTHONPATH=src /tmp/llmc/bin/python scripts/compare_llmcompressor.py --alpha 0.5 --out bench/llmc_smooth_0.5.json

Writes the same JSON shape as benchmark_w8a8.py, so scripts/w8a8_table.py can put both side by side.
The float checkpoint is the one llmquant caches (run any llmquant command once first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmquant import data
from llmquant.evaluation.perplexity import perplexity
from llmquant.model.loading import DEFAULT_MODEL_NAME, cache_dir

SCHEMES = {  # seed-000 names -> (weight strategy, activation strategy, dynamic)
    "w_int8_per_tensor_a_int8_per_tensor_static": ("tensor", "tensor", False),
    "w_int8_per_channel_a_int8_per_tensor_static": ("channel", "tensor", False),
    "w_int8_per_channel_a_int8_per_tensor_dynamic": ("channel", "tensor", True),
    "w_int8_per_channel_a_int8_per_token_dynamic": ("channel", "token", True),
}


def scheme_for(name: str) -> QuantizationScheme:
    weight, activation, dynamic = SCHEMES[name]
    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=weight),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=activation,
                                           dynamic=dynamic),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    parser.add_argument("--alpha", type=float, default=None, help="SmoothQuant strength; omit for none")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--out", default="bench/llmc.json")
    args = parser.parse_args()

    source = cache_dir() / f"{DEFAULT_MODEL_NAME}-float32"
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokens = data.tokenize(tokenizer, data.corpus("pydoc", "calib"))
    calib = data.calibration_samples(tokens, args.calib_samples, args.seqlen, seed=0)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    windows = data.eval_windows(data.tokenize(tokenizer, data.corpus("pydoc", "eval")), args.seqlen, args.max_windows)
    float_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    float_ppl = perplexity(float_model, windows)
    rows = []
    for name in args.schemes:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        recipe = [] if args.alpha is None else [SmoothQuantModifier(smoothing_strength=args.alpha)]
        recipe.append(QuantizationModifier(config_groups={"group_0": scheme_for(name)}, ignore=["lm_head"]))
        start = time.perf_counter()
        oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=args.calib_samples,
                max_seq_length=args.seqlen)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, windows)
        rows.append({"scheme": name, "ppl": ppl, "ratio": ppl / float_ppl, "seconds": seconds})
        print(f"| llm-compressor {name} | {ppl:.3f} | x{ppl / float_ppl:.3f} | {seconds:.1f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "tool": "llm-compressor", "date": time.strftime("%Y-%m-%d"), "float_ppl": float_ppl,
        "pre_opts": [] if args.alpha is None else ["llmc-smoothquant"], "alpha": args.alpha,
        "calib_samples": args.calib_samples, "seqlen": args.seqlen, "windows": len(windows), "rows": rows,
    }, indent=2))


if __name__ == "__main__":
    main()

"""Tiny random mixture-of-experts models (and a dense Llama) quantized by llmquant, then served by vLLM's CPU build.

    bash scripts/vllm_env.sh /tmp/vllm-env          # once: vLLM's CPU build beside the pinned torch
    /tmp/vllm-env/bin/python scripts/moe_vllm.py [--families qwen3_moe mixtral ...] [--json bench/moe_vllm.json]

Each family gets a seeded random model (hidden 256, 8 experts, 2 chosen a token, 2 layers, vocabulary 512; the
transformers 5 config of the family, so its experts are fused 3-D weights that llmquant splits per expert) and
each scheme a checkpoint. The figures: llmquant's quantization seconds per decoder layer, and the perplexity of
fixed random token rows (4 x 64) scored by vLLM (``prompt_logprobs``, in a fresh process per checkpoint) next to
llmquant's runtime on the same checkpoint (``llmquant.load``), with the largest per-token log-probability gap;
and how many of the checkpoint's expert tensors vLLM's MoE weight mapping reads. A checkpoint vLLM refuses is
reported with its root-cause error line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROWS, TOKENS, VOCAB = 4, 64, 512
COMMON = {"vocab_size": VOCAB, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.05,
          "num_experts_per_tok": 2, "tie_word_embeddings": False}
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "moe_intermediate_size": 128, "head_dim": 64}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 8, "intermediate_size": 128}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 8, "moe_intermediate_size": 128,
                                     "shared_expert_intermediate_size": 256, "intermediate_size": 256}),
    "olmoe": ("OlmoeConfig", {"num_experts": 8, "intermediate_size": 128, "pad_token_id": 0, "eos_token_id": 1}),
    # dense, every size a multiple of 128 (q 256, k and v 128 each, gate and up 512): what FP8 tiles need in vLLM
    "llama": ("LlamaConfig", {"intermediate_size": 512, "head_dim": 64}),
}
SCHEMES: dict[str, tuple[dict[str, Any], str]] = {  # name -> (recipe, the dtype vLLM runs it in)
    "W8A8 per-token": ({"scheme": "w_int8_per_channel_a_int8_per_token_dynamic"}, "float32"),
    "W4A16 g32 GPTQ": ({"scheme": "w_int4_per_group_sym", "group_size": 32, "algorithm": "gptq"}, "bfloat16"),
    "W8A8 per-token, experts float": ({"scheme": "w_int8_per_channel_a_int8_per_token_dynamic",
                                       "ignore": ["lm_head", "re:.*\\.experts\\..*"]}, "float32"),
    "FP8 per-token": ({"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic"}, "float32"),
    "FP8 block128": ({"scheme": "w_fp8_block128_a_fp8_group128_dynamic"}, "float32"),
    "W8A8 per-token, R1+R2 offline, R4+R5 online": ({"scheme": "w_int8_per_channel_a_int8_per_token_dynamic",
                                                     "pre_opts": [{"name": "quarot",
                                                                   "rotations": ["R1", "R2", "R4", "R5"]}]},
                                                    "float32"),
    "W8A8 per-token, R2 offline, R4+R6 online, smoothed before them": (
        {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic",
         "pre_opts": [{"name": "quarot", "rotations": ["R2", "R4", "R6"]}, {"name": "smoothquant", "alpha": 0.5}]},
        "float32"),
    "W8A8 per-token, R2 offline, R4+R6 online and learned": (
        {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic",
         "pre_opts": [{"name": "quarot", "rotations": ["R2", "R4", "R6"],
                       "learn_online": {"iterations": 16, "lr": 0.03, "weights": False}}]},
        "float32"),
}


def tiny_tokenizer(vocab: int) -> Any:
    from llmquant.testing.tiny_checkpoint import tiny_tokenizer as trained  # a byte-level BPE of the vocabulary's size

    return trained(vocab)


def token_rows() -> Any:
    import torch

    return torch.randint(2, VOCAB, (ROWS, TOKENS), generator=torch.Generator().manual_seed(7))


def build(family: str) -> Any:
    import torch
    import transformers

    config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def nll(logprobs: list[list[float]]) -> tuple[float, int]:
    return -sum(sum(row) for row in logprobs), sum(len(row) for row in logprobs)


def llmquant_logprobs(directory: Path) -> list[list[float]]:
    """Log-probability of every row token after the first, from llmquant's runtime on the checkpoint."""
    import torch

    import llmquant

    model, _ = llmquant.load(directory, device="cpu")
    rows = token_rows()
    with torch.no_grad():
        logits = model(rows, use_cache=False).logits.float().log_softmax(-1)
    return logits[:, :-1].gather(-1, rows[:, 1:, None])[..., 0].tolist()


def vllm_logprobs(directory: Path, dtype: str) -> list[list[float]]:
    from vllm import SamplingParams, TokensPrompt

    from llmquant.export.targets import vllm_engine

    engine = vllm_engine(directory, dtype, max_model_len=TOKENS + 8)  # in this process, with the CPU workarounds
    params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.0, detokenize=False)
    rows = token_rows().tolist()
    outs = engine.generate([TokensPrompt(prompt_token_ids=row) for row in rows], params, use_tqdm=False)
    return [[scored[token].logprob for token, scored in zip(row[1:], out.prompt_logprobs[1:], strict=True)]
            for row, out in zip(rows, outs, strict=True)]


def serve(directory: Path, dtype: str) -> dict[str, Any]:
    """vLLM in a process of its own (an engine does not release the CPU cleanly within one); a failure is its
    first root-cause line (the worker's exception, not the engine's "initialization failed")."""
    done = subprocess.run([sys.executable, __file__, "--serve", str(directory), "--dtype", dtype],
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        causes = [re.sub(r"^.*\] ", "", line) for line in (done.stderr + done.stdout).splitlines()
                  if re.search(r"(Error|Exception): ", line) and "initialization failed" not in line]
        return {"error": causes[0] if causes else f"exit {done.returncode}"}
    return json.loads(lines[-1])


def expert_names_vllm_reads(directory: Path, family: str) -> dict[str, Any]:
    """How many of the checkpoint's expert tensors vLLM's MoE loader maps to its fused parameters: its mapping
    (``RoutedExperts.build_expert_params_mapping``, checkpoint ``experts.<e>.<gate>.`` -> ``experts.
    routed_experts.w13_``) with the projection names its model class uses for the family."""
    from safetensors import safe_open
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    gate, down, up = ("w1", "w2", "w3") if family == "mixtral" else ("gate_proj", "down_proj", "up_proj")
    mapping = RoutedExperts.build_expert_params_mapping(gate, down, up, FAMILIES[family][1].get(
        "num_experts", FAMILIES[family][1].get("num_local_experts")))
    with safe_open(directory / "model.safetensors", "pt") as handle:
        keys = [k for k in handle.keys() if re.search(r"\.experts\.\d+\.", k)]  # noqa: SIM118 - no __iter__
    mapped = [k for k in keys if any(weight_name in k for _, weight_name, _, _ in mapping)]
    return {"expert_tensors": len(keys), "mapped_by_vllm": len(mapped), "example": keys[0] if keys else None}


def run(family: str, scheme: str, root: Path, vllm_dtype: str | None = None) -> dict[str, Any]:
    import llmquant

    recipe, dtype = SCHEMES[scheme]
    dtype = vllm_dtype or dtype
    calib = token_rows().repeat(2, 1)[:, :TOKENS]
    model = llmquant.quantize(build(family), recipe, calib=calib, progress=False)
    directory = root / f"{family}-{scheme.replace(' ', '_').replace(',', '')}"
    llmquant.save(model, tiny_tokenizer(VOCAB), directory)  # (vLLM wants one, though it is given token ids)
    seconds = [row["seconds"] for row in model.llmquant_manifest.layers]
    ours = nll(llmquant_logprobs(directory))
    row: dict[str, Any] = {"family": family, "scheme": scheme, "vllm_dtype": dtype,
                           "seconds_per_layer": sum(seconds) / len(seconds),
                           "llmquant_ppl": math.exp(ours[0] / ours[1])}
    dense = not any(key in FAMILIES[family][1] for key in ("num_experts", "num_local_experts"))
    row["names"] = None if dense else expert_names_vllm_reads(directory, family)
    served = serve(directory, dtype)
    if "error" in served:
        return {**row, "vllm_error": served["error"]}
    theirs = nll(served["logprobs"])
    gap = max(abs(a - b) for r1, r2 in zip(served["logprobs"], llmquant_logprobs(directory), strict=True)
              for a, b in zip(r1, r2, strict=True))
    return {**row, "vllm_ppl": math.exp(theirs[0] / theirs[1]),
            "ratio": math.exp(theirs[0] / theirs[1]) / row["llmquant_ppl"], "max_logprob_gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument("--vllm-dtype", default=None, choices=["float32", "bfloat16"],
                        help="the dtype vLLM runs every checkpoint in (default: each scheme's own; vLLM's CPU int8 "
                             "kernel on a CPU with AMX takes bfloat16 activations only)")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        print(json.dumps({"logprobs": vllm_logprobs(Path(args.serve), args.dtype)}))
        return
    import torch
    import vllm

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for family in args.families:
            for scheme in args.schemes:
                rows.append(run(family, scheme, Path(root), args.vllm_dtype))
                print(json.dumps(rows[-1]), flush=True)
    if args.json and Path(args.json).exists():  # rows of other families or schemes stay
        kept = json.loads(Path(args.json).read_text())["rows"]
        ran = {(row["family"], row["scheme"]) for row in rows}
        rows = [row for row in kept if (row["family"], row["scheme"]) not in ran] + rows
    found = {"vllm": vllm.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()

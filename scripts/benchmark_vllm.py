"""llmquant checkpoints served by vLLM: a few generated tokens, and vLLM's perplexity next to llmquant's.

    bash scripts/vllm_env.sh /tmp/vllm-env          # once: vLLM's CPU build beside the pinned torch
    /tmp/vllm-env/bin/python scripts/benchmark_vllm.py /tmp/bench_w8a8 /tmp/bench_w4g64 [--float] \
        [--dtype float32|bfloat16] [--seqlen 512] [--max-windows 40] [--json]

Perplexity follows llmquant's protocol (`llmquant.evaluation.perplexity`): the windows are
``llmquant.data.eval_windows(tokenize(tok, corpus("pydoc", "eval")), seqlen, max_windows)``; vLLM scores
each window as a prompt (``SamplingParams(prompt_logprobs=0, max_tokens=1)``: the log-probability of
every prompt token given the ones before it), ppl = exp(-sum / number of predicted tokens), ``seqlen -
1`` predictions per window. llmquant's figure is computed on the same windows by ``llmquant.load(DIR)``
(the simulated runtime) in this process. ``--float`` adds the float32 default model (its cached
conversion) as a reference row. On a CPU-only vLLM, `llmquant.export.targets.vllm_cpu_workarounds` gives vLLM's
online transforms the matrix product its other float layers use (each row names what was changed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB for vLLM's CPU KV cache (unset: 92% of the RAM)
PROMPT = "def fibonacci(n):\n    "


def windows_for(tokenizer: Any, seqlen: int, max_windows: int) -> Any:
    """The evaluation windows llmquant uses for perplexity."""
    from llmquant import data

    return data.corpus_windows(tokenizer, "pydoc", seqlen, max_windows)


def vllm_perplexity(engine: Any, windows: Any) -> float:
    """exp(mean NLL) of every window token after the first, from vLLM's prompt log-probabilities."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.0)
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in windows]
    total, count = 0.0, 0
    for row, out in zip(windows.tolist(), engine.generate(prompts, params, use_tqdm=False), strict=True):
        for token, scored in zip(row[1:], out.prompt_logprobs[1:], strict=True):
            total -= scored[token].logprob
            count += 1
    return math.exp(total / count)


def generated_text(engine: Any, tokens: int) -> str:
    from vllm import SamplingParams

    out = engine.generate([PROMPT], SamplingParams(max_tokens=tokens, temperature=0.0), use_tqdm=False)
    return out[0].outputs[0].text


def llmquant_perplexity(directory: Path, windows: Any) -> float:
    import llmquant
    from llmquant.evaluation.perplexity import perplexity

    model, _ = llmquant.load(directory)
    return perplexity(model, windows)


def evaluate(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One checkpoint in vLLM (load, generate, perplexity) and in llmquant (perplexity)."""
    from transformers import AutoTokenizer

    from llmquant.export.targets import vllm_engine

    windows = windows_for(AutoTokenizer.from_pretrained(directory), args.seqlen, args.max_windows)
    start = time.perf_counter()
    engine = vllm_engine(directory, dtype=args.dtype, max_model_len=args.seqlen + 16)
    loaded = time.perf_counter()
    row: dict[str, Any] = {"checkpoint": str(directory), "dtype": args.dtype, "windows": len(windows),
                           "load_seconds": loaded - start, "generated": generated_text(engine, args.tokens),
                           "workarounds": args.workarounds}
    row["vllm_ppl"] = vllm_perplexity(engine, windows)
    row["vllm_ppl_seconds"] = time.perf_counter() - loaded
    del engine
    row["llmquant_ppl"] = llmquant_perplexity(directory, windows)
    row["ratio"] = row["vllm_ppl"] / row["llmquant_ppl"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path, help="llmquant checkpoint directories")
    parser.add_argument("--float", action="store_true", help="add the float32 default model as a reference row")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated from a short code prompt")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    from llmquant.export.targets import vllm_cpu_workarounds

    args.workarounds = vllm_cpu_workarounds()
    directories = list(args.checkpoints)
    if args.float:
        from llmquant.model.loading import local_checkpoint_dir

        directories.insert(0, local_checkpoint_dir(None))
    if not directories:
        parser.error("give checkpoint directories, or --float")
    rows = []
    for directory in directories:
        try:
            rows.append(evaluate(directory, args))
        except Exception as err:  # a checkpoint vLLM refuses: say why, go on with the others
            first = (str(err).strip().splitlines() or [""])[0]
            rows.append({"checkpoint": str(directory), "error": f"{type(err).__name__}: {first}"})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"perplexity on pydoc (seqlen {args.seqlen}, at most {args.max_windows} windows), vLLM {args.dtype}:")
    print("| checkpoint | vLLM ppl | llmquant ppl | vLLM / llmquant | generated |\n|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['checkpoint']} | failed: {row['error']} | | | |")
            continue
        text = row["generated"].replace("\n", "\\n").replace("|", "\\|")
        print(f"| {row['checkpoint']} | {row['vllm_ppl']:.3f} | {row['llmquant_ppl']:.3f} | {row['ratio']:.4f} | "
              f"`{text}` |")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":  # vLLM may start worker processes that import this file
    main()

"""The table of BENCHMARKS.md ("FP8 against llm-compressor over calibration draws") from seeds.sh's OUT_DIR:
per draw of the calibration windows, each tool's perplexity and quantization seconds, then the means, and how many
draws each tool's perplexity was the lower.

    .venv/bin/python bench/fp8_seeds_2026-12-08/table.py OUT_DIR
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

RECIPES = {"fp8_static": "FP8 per tensor static (preset FP8)",
           "fp8_token_kv_tensor": "FP8 per channel / per token + FP8 KV cache per tensor (FP8_DYNAMIC + "
                                  "kv_cache_scheme)"}


def runs(directory: Path) -> dict[tuple[str, int], tuple[dict, dict]]:
    """(recipe, seed) -> (llm-compressor's row, llmquant's row), for the draws both tools finished."""
    ours = {row["name"]: row for row in map(json.loads, (directory / "ours.jsonl").read_text().splitlines())}
    found = {}
    for path in sorted(directory.glob("llmc_*_seed*.json")):
        name = path.stem.removeprefix("llmc_")
        recipe, seed = re.fullmatch(r"(.+)_seed(\d+)", name).groups()
        rows = json.loads(path.read_text())["rows"]
        if rows and name in ours:
            found[recipe, int(seed)] = (rows[0], ours[name])
    return found


def main() -> None:
    found = runs(Path(sys.argv[1]))
    print("| recipe | draw (calib.seed) | llm-compressor | llmquant (default) | ppl ours / theirs "
          "| time ours / theirs |")
    print("|---|---|---|---|---|---|")
    for recipe, what in RECIPES.items():
        pairs = sorted((seed, pair) for (name, seed), pair in found.items() if name == recipe)
        for seed, (theirs, ours) in pairs:
            print(f"| {what} | {seed} | {theirs['ppl']:.3f}, {theirs['seconds']:.1f} s | {ours['ppl']:.3f}, "
                  f"{ours['quantize_seconds']:.1f} s | {ours['ppl'] / theirs['ppl']:.4f} | "
                  f"{ours['quantize_seconds'] / theirs['seconds']:.2f} |")
        if pairs:
            theirs_ppl = statistics.mean(t["ppl"] for _, (t, _) in pairs)
            ours_ppl = statistics.mean(o["ppl"] for _, (_, o) in pairs)
            lower = sum(o["ppl"] <= t["ppl"] for _, (t, o) in pairs)
            time_ratio = statistics.median(o["quantize_seconds"] / t["seconds"] for _, (t, o) in pairs)
            print(f"| {what} | mean of {len(pairs)} (ours at or below in {lower}) | {theirs_ppl:.3f} | {ours_ppl:.3f} "
                  f"| **{ours_ppl / theirs_ppl:.4f}** | median **{time_ratio:.2f}** |")


if __name__ == "__main__":
    main()

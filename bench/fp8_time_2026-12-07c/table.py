"""The table of BENCHMARKS.md ("Calibrated on the float model's activations by default") from two runs of pairs.sh:
one with the code before (BEFORE_DIR, SRC a worktree of the commit before) and one after (AFTER_DIR); each has its
own llm-compressor runs, and each llmquant figure is divided by the llm-compressor run of the same series.

    .venv/bin/python bench/fp8_time_2026-12-07c/table.py BEFORE_DIR AFTER_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RECIPES = {"fp8_static": ("FP8 per tensor static (preset FP8)", "fp8_static_float_calib"),
           "fp8_token_kv_tensor": ("FP8 per channel / per token + FP8 KV cache per tensor (FP8_DYNAMIC + "
                                   "kv_cache_scheme)", "fp8_token_kv_tensor_float_calib")}


def series(directory: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    ours = {row["name"]: row for row in map(json.loads, (directory / "ours.jsonl").read_text().splitlines())}
    theirs = {path.stem.removeprefix("llmc_"): json.loads(path.read_text())["rows"][0]
              for path in directory.glob("llmc_*.json")}
    return ours, theirs


def cell(row: dict, base: dict) -> str:
    return f"{row['ppl']:.3f}, {row['quantize_seconds']:.1f} s, **{row['quantize_seconds'] / base['seconds']:.2f}**"


def main() -> None:
    (ours_before, theirs_before), (ours_after, theirs_after) = (series(Path(d)) for d in sys.argv[1:3])
    print("| recipe | llm-compressor (before / after series) | llmquant before: default | before: `propagate: float` "
          "| now: default | now: `propagate: float` |")
    print("|---|---|---|---|---|---|")
    for name, (what, float_name) in RECIPES.items():
        before, after = theirs_before[name], theirs_after[name]
        print(f"| {what} | {before['ppl']:.3f}, {before['seconds']:.1f} s / {after['ppl']:.3f}, "
              f"{after['seconds']:.1f} s | {cell(ours_before[name], before)} | {cell(ours_before[float_name], before)} "
              f"| {cell(ours_after[name], after)} | {cell(ours_after[float_name], after)} |")


if __name__ == "__main__":
    main()

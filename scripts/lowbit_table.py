"""Render issue 19's table from the runs `bash scripts/bench_all.sh lowbit` appended (bench_recipe.py rows):
perplexity / float on pydoc and on the stdlib corpus, quantization seconds and peak resident memory per cell.

    .venv/bin/python scripts/lowbit_table.py bench/lowbit_learned_2026-11-30/runs.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = {"w4a8": "W4A8 g64", "w4a4": "W4A4", "w4a4kv4": "W4A4KV4", "w3": "W3 g64 (asym)", "w4": "W4 g64 (asym)"}
COLUMNS = {"rtn": "RTN", "gptq": "GPTQ", "quarot_gptq": "QuaRot + GPTQ", "learned_gptq": "learned rotations + GPTQ",
           "quarot_gptq_clip": "QuaRot + GPTQ + clip search", "learned_gptq_clip": "learned + GPTQ + clip search",
           "quarot_gptaq": "QuaRot + GPTAQ (alpha 0.25)"}


def cell(run: dict | None, float_ppl: dict[str, float]) -> str:
    if run is None:
        return "-"
    ppl = run["ppl_by_corpus"]
    ratios = " / ".join(f"x{ppl[c] / float_ppl[c]:.3f}" for c in ("pydoc", "stdlib"))
    return f"{ratios} ({run['quantize_seconds']:.0f} s, {run['peak_rss_mb'] / 1024:.1f} GiB)"


def main() -> None:
    runs = {}
    for line in Path(sys.argv[1]).read_text().splitlines():
        row = json.loads(line)
        runs[row["name"]] = row
    float_ppl = runs["lb_float"]["ppl_by_corpus"]
    print(f"float: pydoc {float_ppl['pydoc']:.3f}, stdlib {float_ppl['stdlib']:.3f}\n")
    print("| scheme | " + " | ".join(COLUMNS.values()) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for key, label in ROWS.items():
        print(f"| {label} | " + " | ".join(cell(runs.get(f"lb_{key}_{col}"), float_ppl) for col in COLUMNS) + " |")
    learned = [r for r in runs.values() if r.get("learned_rotations")]
    for run in learned:
        lr = run["learned_rotations"]
        print(f"\n{run['name']}: learned in {lr['seconds']} s, loss {lr['loss_first_tenth']:.3f} -> "
              f"{lr['loss_last_tenth']:.3f}", end="")
    clipped = [r for r in runs.values() if r.get("clip_search")]
    for run in clipped:
        found = run["clip_search"]
        chosen = {k: found[k]["ratio"] for k in ("activations", "kv_cache") if k in found}
        print(f"\n{run['name']}: clip ratios {chosen}", end="")
    print()


if __name__ == "__main__":
    main()

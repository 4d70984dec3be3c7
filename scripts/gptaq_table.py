"""Render the pairs `bash scripts/bench_all.sh gptaq` appended (plain GPTQ ``gq_<row>_a0`` beside GPTAQ
``gq_<row>_a<alpha>``): perplexity / float on pydoc and on the stdlib corpus, quantization seconds and peak resident
memory, and GPTAQ's perplexity over plain GPTQ's.

    .venv/bin/python scripts/gptaq_table.py bench/gptaq_2026-11-30/runs.jsonl [--float RUNS.jsonl]

The float perplexities come from the ``lb_float`` row of ``--float`` (default: issue 19's runs, the same windows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CORPORA = ("pydoc", "stdlib")


def read(path: Path) -> dict[str, dict]:
    return {row["name"]: row for row in map(json.loads, path.read_text().splitlines()) if row}


def cell(run: dict, floats: dict[str, float]) -> str:
    ppl = run["ppl_by_corpus"]
    ratios = " / ".join(f"x{ppl[c] / floats[c]:.4f}" for c in CORPORA)
    return f"{ratios} ({run['quantize_seconds']:.0f} s, {run['peak_rss_mb'] / 1024:.1f} GiB)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--float", dest="floats", type=Path, default=Path("bench/lowbit_learned_2026-11-30/runs.jsonl"))
    args = parser.parse_args()
    runs, floats = read(args.runs), read(args.floats)["lb_float"]["ppl_by_corpus"]
    print("| row | plain GPTQ: pydoc / stdlib (s, peak) | GPTAQ | GPTAQ / GPTQ perplexity, pydoc / stdlib |")
    print("|---|---|---|---|")
    for name, plain in runs.items():
        if not name.endswith("_a0"):
            continue
        row = name.removeprefix("gq_").removesuffix("_a0")
        for other_name, other in runs.items():
            if other_name.startswith(f"gq_{row}_a") and other_name != name:
                alpha = other["recipe"]["gptq"]["asymmetric"]
                gain = " / ".join(f"{other['ppl_by_corpus'][c] / plain['ppl_by_corpus'][c]:.4f}" for c in CORPORA)
                print(f"| {row} (alpha {alpha}) | {cell(plain, floats)} | {cell(other, floats)} | {gain} |")


if __name__ == "__main__":
    main()

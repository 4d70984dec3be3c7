"""Merge benchmark_w8a8.py outputs into the seed-000 style table (Markdown on stdout).

    .venv/bin/python scripts/w8a8_table.py bench/w8a8_rtn.json bench/w8a8_smooth_0.85.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmquant.quant.scheme import W8A8_SCHEMES


def column_name(result: dict) -> str:
    if not result.get("pre_opts"):
        return "no pre-optimization"
    return f"{'+'.join(result['pre_opts'])} alpha={result['alpha']}"


def main(paths: list[str]) -> None:
    results = [json.loads(Path(p).read_text()) for p in paths]
    names = [column_name(r) for r in results]
    print(f"float32 perplexity: {results[0]['float_ppl']:.3f}\n")
    print("| scheme | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for scheme in W8A8_SCHEMES:
        cells = []
        for result in results:
            row = next((r for r in result["rows"] if r["scheme"] == scheme), None)
            cells.append(f"{row['ppl']:.2f} (x{row['ratio']:.3f}, {row['seconds']:.0f} s)" if row else "not run")
        print(f"| {scheme} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])

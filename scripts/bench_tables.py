"""Render bench/results.jsonl (scripts/bench_all.sh) and llm-compressor's bench/llmc_*.json as the Markdown
tables of BENCHMARKS.md, on stdout.

    .venv/bin/python scripts/bench_tables.py [--results bench/results.jsonl] [--llmc bench/llmc_*.json]
        [--timing bench/timing_alone.jsonl]

A cell reads ``ppl (x ratio, quantize seconds, peak RSS)``; the ratio is ppl / float ppl (13.605, DESIGN.md's
protocol). Missing runs are left blank.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FLOAT_PPL = 13.60482698834319  # float32 default model, pydoc eval half, 40 windows of 512 (bench/w8a8_rtn.json)
ALGORITHMS = ("rtn", "gptq", "awq")
W4_ROWS = {  # row label -> name prefix in results.jsonl
    "W4 asym, groups of 64": "w4_g64_asym",
    "W4 sym, groups of 64": "w4_g64_sym",
    "W4 asym, groups of 128 (576-input Linears fall back to 64)": "w4_g128_asym",
    "W3 asym, groups of 64": "w3_g64_asym",
}
LLMC_SCHEMES = {"w4_g64_asym": "w_uint4_per_group_asym", "w4_g64_sym": "w_int4_per_group_sym"}
# a cell measured again under another name once the default changed (activation order); the asymmetric one
# was measured again alone, under its own name, in bench/timing_alone.jsonl (which overrides results.jsonl)
CELL_RUN = {"w4_g64_sym_gptq": "w4_g64_sym_gptq_actorder"}


def read_results(path: Path) -> dict[str, dict]:
    """name -> its last row."""
    rows: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["name"]] = row
    return rows


def cell(row: dict | None) -> str:
    if row is None:
        return ""
    rss = f", {row['peak_rss_mb'] / 1024:.1f} GB" if row.get("peak_rss_mb") else ""
    return f"{row['ppl']:.2f} (x{row['ppl'] / FLOAT_PPL:.3f}, {row['quantize_seconds']:.0f} s{rss})"


def w4_table(rows: dict[str, dict]) -> list[str]:
    lines = ["| weights | round to nearest | GPTQ | AWQ |", "|---|---|---|---|"]
    for label, prefix in W4_ROWS.items():
        names = [CELL_RUN.get(f"{prefix}_{a}", f"{prefix}_{a}") for a in ALGORITHMS]
        lines.append(f"| {label} | " + " | ".join(cell(rows.get(name)) for name in names) + " |")
    return lines


def other_table(rows: dict[str, dict]) -> list[str]:
    lines = ["| run | recipe | perplexity (x float, seconds, peak RSS) |", "|---|---|---|"]
    in_w4_table = {CELL_RUN.get(n, n) for n in (f"{prefix}_{a}" for prefix in W4_ROWS.values() for a in ALGORITHMS)}
    for name, row in rows.items():
        if name not in in_w4_table:
            lines.append(f"| {name} | `{json.dumps(row['recipe'])}` | {cell(row)} |")
    return lines


def llmc_rows(paths: list[Path]) -> dict[tuple[str, str], dict]:
    """(scheme, algorithm) -> llm-compressor's row, from its comparison JSONs."""
    found: dict[tuple[str, str], dict] = {}
    for path in paths:
        result = json.loads(path.read_text())
        for row in result.get("rows", []):
            found[row["scheme"], row.get("algorithm", result.get("algorithm", "rtn"))] = row
    return found


def comparison_table(rows: dict[str, dict], llmc: dict[tuple[str, str], dict]) -> list[str]:
    lines = ["| recipe | llmquant | llm-compressor | ppl ratio (ours / theirs) | time ratio (ours / theirs) |",
             "|---|---|---|---|---|"]
    for prefix, scheme in LLMC_SCHEMES.items():
        for algorithm in ALGORITHMS:
            name = f"{prefix}_{algorithm}"
            ours, theirs = rows.get(CELL_RUN.get(name, name)), llmc.get((scheme, algorithm))
            if ours is None or theirs is None:
                continue
            lines.append(
                f"| {scheme} g64 {algorithm} | {ours['ppl']:.2f} ({ours['quantize_seconds']:.0f} s) | "
                f"{theirs['ppl']:.2f} ({theirs['seconds']:.0f} s) | {ours['ppl'] / theirs['ppl']:.3f} | "
                f"{ours['quantize_seconds'] / theirs['seconds']:.2f} |")
    return lines


THEIR_RUN = {  # our variants of one llm-compressor recipe
    "w4_g64_asym_gptq_float_hessians": "w4_g64_asym_gptq", "w4_g64_asym_gptq_offloaded": "w4_g64_asym_gptq",
    "fp8_static_float_calib": "fp8_static", "fp8_token_kv_tensor_float_calib": "fp8_token_kv_tensor",
}


def alone_table(timing: Path) -> list[str]:
    """scripts/time_vs_llmcompressor.sh: each llmquant run of bench/timing_alone.jsonl against
    bench/llmc_timing_alone_<name>.json, both run alone on the machine."""
    lines = ["| recipe | llmquant | llm-compressor | ppl ratio (ours / theirs) | time ratio (ours / theirs) |",
             "|---|---|---|---|---|"]
    for name, ours in read_results(timing).items():
        path = timing.parent / f"llmc_timing_alone_{THEIR_RUN.get(name, name)}.json"
        theirs = (json.loads(path.read_text()).get("rows") or [None])[0] if path.is_file() else None
        if theirs is None:
            continue
        lines.append(
            f"| {name}: `{json.dumps(ours['recipe'])}` | {ours['ppl']:.3f} (x{ours['ppl'] / FLOAT_PPL:.3f}, "
            f"{ours['quantize_seconds']:.0f} s) | {theirs['ppl']:.3f} (x{theirs['ppl'] / FLOAT_PPL:.3f}, "
            f"{theirs['seconds']:.0f} s) | {ours['ppl'] / theirs['ppl']:.3f} | "
            f"{ours['quantize_seconds'] / theirs['seconds']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default="bench/results.jsonl")
    parser.add_argument("--llmc", nargs="*", default=None, help="llm-compressor JSONs (default: bench/llmc_w4_*.json)")
    parser.add_argument("--timing", default="bench/timing_alone.jsonl", help="scripts/time_vs_llmcompressor.sh's")
    args = parser.parse_args()
    rows = read_results(Path(args.results)) | read_results(Path(args.timing))  # a run alone wins
    llmc_paths = [Path(p) for p in args.llmc] if args.llmc is not None else sorted(Path("bench").glob("llmc_w4_*.json"))
    for title, lines in (("Weight-only", w4_table(rows)), ("Other runs", other_table(rows)),
                         ("Against llm-compressor", comparison_table(rows, llmc_rows(llmc_paths))),
                         ("Against llm-compressor, one run at a time", alone_table(Path(args.timing)))):
        print(f"### {title}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

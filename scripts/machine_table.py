"""The speed of the quantized checkpoints on every machine they were measured on: one row per machine, checkpoint
and thread count, from the latest `llmquant bench --json` figures of each (BENCHMARKS.md "Speed by machine", the
README's speed table). The files are named below, one by one: the bench folders hold earlier states beside the
latest (before/after pairs, other attentions), and their names do not say which is which.

    .venv/bin/python scripts/machine_table.py [--checkpoints "W8A8 per token" "W4 g64"] [--threads 1 2]

Each figure is quantized / float32 throughput measured in the same run (rounds interleaved, medians), the
checkpoints of `scripts/bench_speed.sh` (round to nearest), prompts of 512 tokens and 32 decoded ones.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from speed_table import ratio_cells  # (scripts/, beside this one)

BENCH = Path(__file__).resolve().parent.parent / "bench"

MACHINES = {  # key: (a short name for one table of all machines, the title of its own table)
    "xeon_amx": ("Xeon, AMX (12-06)",
                 "Intel Xeon with AMX (cpu family 6, model 167; AVX512-VNNI, AVX512-BF16, AMX-INT8), 2026-12-06"),
    "epyc_avx512": ("EPYC, AVX512-VNNI (12-05)",
                    "AMD EPYC (cpu family 25, model 17; AVX512-VNNI, AVX512-BF16, no AMX), 2026-12-05"),
    "epyc_avx512_12_02": ("EPYC, AVX512-VNNI, faster int8 (12-02)",
                          "AMD EPYC (AVX512-VNNI, AVX512-BF16, no AMX; its int8 products twice as fast as the "
                          "machine above), 2026-12-02, before the causal prefill's attention op"),
    "epyc_avx2": ("EPYC, AVX2 only (12-07)",
                  "AMD EPYC with AVX2 only (cpu family 25, model 1; no AVX512, VNNI or AMX), 2026-12-07"),
}


@dataclass(frozen=True)
class Entry:
    machine: str  # a key of MACHINES
    checkpoint: str
    path: str  # under bench/: a `llmquant bench --json` file, or its printed table ending with that JSON line


CHECKPOINTS = {  # the stem of `scripts/bench_speed.sh`'s checkpoint folders: the name in the tables
    "w8a8_token": "W8A8 per token", "w8a8_token_kv8": "W8A8 per token, INT8 KV cache",
    "w8a8_static": "W8A8 per-tensor static", "w4_g64": "W4 g64", "w3_g64": "W3 g64",
    "w4a4_token": "W4A4 per token", "w4a4_g32": "W4A4, inputs in groups of 32",
}


def _pairs(machine: str, folder: str, *stems: str) -> list[Entry]:
    """One thread (``speed_<stem>.json``) and two (``speed_<stem>_t2.json``) of each checkpoint."""
    return [Entry(machine, CHECKPOINTS[stem], f"{folder}/speed_{stem}{suffix}.json")
            for stem in stems for suffix in ("", "_t2")]


ENTRIES = (
    _pairs("xeon_amx", "speed_2026-12-06_xeon_amx", "w8a8_token", "w8a8_token_kv8")
    + _pairs("xeon_amx", "speed_2026-12-06d_w4_decode", "w4_g64", "w3_g64")
    + _pairs("epyc_avx512", "speed_2026-12-05_epyc_zen4_attention_op", "w8a8_token", "w8a8_token_kv8", "w8a8_static",
             "w4_g64", "w3_g64", "w4a4_token", "w4a4_g32")
    + _pairs("epyc_avx512_12_02", "speed_2026-12-02_epyc_avx512", "w8a8_token", "w8a8_token_kv8", "w8a8_static",
             "w4_g64", "w3_g64")
    + _pairs("epyc_avx2", "speed_2026-12-07_epyc_avx2_one_call", "w8a8_token", "w8a8_token_kv8", "w8a8_static",
             "w4_g64", "w3_g64")
)

def figures(path: Path) -> dict:
    """The run's JSON: the file itself, or the last line of `llmquant bench`'s printed table."""
    return json.loads(path.read_text().strip().splitlines()[-1])


def cells(entry: Entry) -> tuple[int, list[str]]:
    """The run's thread count, and its ratios (`speed_table.ratio_cells`) and file as table cells."""
    found = figures(BENCH / entry.path)
    return found["threads"], [*ratio_cells(found), f"`bench/{entry.path}`"]


HEADER = "threads | prefill b1 | prefill b8 | decode b1 | decode b8 | memory (+ runtime caches) | figures |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", help="only these checkpoints (default: all)")
    parser.add_argument("--threads", nargs="+", type=int, help="only these thread counts (default: all)")
    parser.add_argument("--one-table", action="store_true", help="every machine in one table (the README's)")
    args = parser.parse_args()
    if args.one_table:
        print("| machine | checkpoint | " + HEADER)
        print("|---" * 9 + "|")
    for machine, (short, title) in MACHINES.items():
        rows = [(*cells(entry), entry.checkpoint) for entry in ENTRIES if entry.machine == machine
                and (args.checkpoints is None or entry.checkpoint in args.checkpoints)]
        rows = sorted((row for row in rows if args.threads is None or row[0] in args.threads), key=lambda r: r[0])
        if rows and not args.one_table:
            print(f"\n**{title}**\n\n| checkpoint | {HEADER}\n" + "|---" * 8 + "|")
        for threads, figures_cells, checkpoint in rows:
            lead = f"| {short} | {checkpoint}" if args.one_table else f"| {checkpoint}"
            print(f"{lead} | {threads} | " + " | ".join(figures_cells) + " |")


if __name__ == "__main__":
    main()

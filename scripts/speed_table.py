"""The speed table of BENCHMARKS.md from one `scripts/bench_speed.sh` output directory: for each thread count and
checkpoint (in that order), its throughput / float32 in the same run (prefill and decode at batches 1 and 8) and its
memory / float32 (with the runtime's caches: oneDNN's copy of int8 weights, the int4 kernel's of 4-bit ones).

    .venv/bin/python scripts/speed_table.py bench/speed_<date>_<cpu>
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

COLUMNS = (("prefill", "1"), ("prefill", "8"), ("decode", "1"), ("decode", "8"))


def checkpoint_name(path: Path) -> str:
    """The checkpoint of ``speed_<checkpoint>[_t<threads>].json`` (the thread count has its own column)."""
    stem = path.stem.removeprefix("speed_")
    base, _, threads = stem.rpartition("_t")
    return base if base and threads.isdigit() else stem


def ratio_cells(found: dict) -> list[str]:
    """A run's four throughput ratios (`COLUMNS`) and its memory ratio (with the runtime's caches) as table cells."""
    ratios = found["ratios"]
    return [f"{ratios[kind][batch]:.2f}" for kind, batch in COLUMNS] + [
        f"{ratios['memory']:.2f} ({ratios['memory_with_runtime_cache']:.2f})"]


def row(path: Path, found: dict) -> str:
    return f"| {checkpoint_name(path)} | {found['threads']} | " + " | ".join(ratio_cells(found)) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    print("| checkpoint | threads | prefill b1 | prefill b8 | decode b1 | decode b8 | memory (+ runtime caches) / "
          "float32 |")
    print("|---|---|---|---|---|---|---|")
    runs = finished(args.directory.glob("speed_*.json"))
    for path, found in sorted(runs, key=lambda run: (int(run[1]["threads"]), checkpoint_name(run[0]))):
        print(row(path, found))


def finished(paths: Iterable[Path]) -> list[tuple[Path, dict]]:
    """Each file of ``paths`` that holds a run's JSON line, with its figures; each other one named on stderr (a run
    cut off before it wrote them) and left out."""
    runs = []
    for path in paths:
        try:
            runs.append((path, json.loads(path.read_text())))
        except json.JSONDecodeError:
            print(f"{path}: not a finished run's figures (empty or cut off), left out", file=sys.stderr)
    return runs


if __name__ == "__main__":
    main()

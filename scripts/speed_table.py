"""The speed table of BENCHMARKS.md from one `scripts/bench_speed.sh` output directory: for each checkpoint and thread
count, its throughput / float32 in the same run (prefill and decode at batches 1 and 8) and its memory / float32
(with the runtime's caches: oneDNN's copy of int8 weights, the int4 kernel's of 4-bit ones).

    .venv/bin/python scripts/speed_table.py bench/speed_<date>_<cpu>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = (("prefill", "1"), ("prefill", "8"), ("decode", "1"), ("decode", "8"))


def row(path: Path) -> str:
    found = json.loads(path.read_text())
    ratios = found["ratios"]
    cells = [f"{ratios[kind][batch]:.2f}" for kind, batch in COLUMNS]
    name = path.stem.removeprefix("speed_")
    memory = f"{ratios['memory']:.2f} ({ratios['memory_with_runtime_cache']:.2f})"
    return f"| {name} | {found['threads']} | " + " | ".join(cells) + f" | {memory} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    print("| checkpoint | threads | prefill b1 | prefill b8 | decode b1 | decode b8 | memory (+ runtime caches) / "
          "float32 |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(args.directory.glob("speed_*.json")):
        print(row(path))


if __name__ == "__main__":
    main()

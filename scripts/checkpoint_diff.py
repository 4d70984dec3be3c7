"""Tensor-by-tensor difference of two safetensors checkpoints (llmquant's and llm-compressor's, say): the names only
one has, the tensors whose dtype or shape differ, and for each differing tensor how many elements differ and by how
much (absolute, and relative to the first checkpoint's value), summed up by tensor kind (the last part of the name).

    .venv/bin/python scripts/checkpoint_diff.py DIR_A DIR_B [--json OUT]
    .venv/bin/python scripts/checkpoint_diff.py DIR_A DIR_B --take input_scale --into DIR_C

``--take SUFFIX --into DIR_C`` also writes a copy of DIR_A in which every tensor whose name ends with SUFFIX is
DIR_B's (one file, model.safetensors), to evaluate what those tensors alone change.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def tensors(directory: Path) -> dict[str, tuple[Path, str]]:
    """Every tensor name of the checkpoint's safetensors files -> (file, name)."""
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            names = handle.keys()  # (a safetensors handle is not iterable)
            found.update({name: (file, name) for name in names})
    return found


def read(where: tuple[Path, str]) -> torch.Tensor:
    with safe_open(str(where[0]), "pt") as handle:
        return handle.get_tensor(where[1])


def compare(first: Path, second: Path) -> dict:
    a, b = tensors(first), tensors(second)
    report: dict = {"only_first": sorted(a.keys() - b.keys()), "only_second": sorted(b.keys() - a.keys()),
                    "mismatched": [], "differing": [], "identical": 0}
    for name in sorted(a.keys() & b.keys()):
        x, y = read(a[name]), read(b[name])
        if x.dtype != y.dtype or x.shape != y.shape:
            report["mismatched"].append({"name": name, "first": [str(x.dtype), list(x.shape)],
                                         "second": [str(y.dtype), list(y.shape)]})
            continue
        xf, yf = x.float(), y.float()
        if torch.equal(xf, yf):
            report["identical"] += 1
            continue
        gap = (xf - yf).abs()
        report["differing"].append({"name": name, "elements": int((xf != yf).sum()), "of": x.numel(),
                                    "max_abs": float(gap.max()),
                                    "max_rel": float((gap / xf.abs().clamp(min=1e-30)).max())})
    kinds = collections.Counter(row["name"].rsplit(".", 1)[-1] for row in report["differing"])
    report["differing_by_kind"] = dict(kinds)
    return report


def take(first: Path, second: Path, suffix: str, into: Path) -> int:
    """Write ``into``: ``first`` with ``second``'s tensors whose names end with ``suffix``; how many were taken."""
    shutil.copytree(first, into)
    state = {}
    for file in sorted(first.glob("*.safetensors")):
        state.update(load_file(str(file)))
        (into / file.name).unlink()
    others = {name: read(where) for name, where in tensors(second).items() if name.endswith(suffix)}
    taken = {name: others[name] for name in state if name in others}
    save_file({**state, **taken}, str(into / "model.safetensors"), metadata={"format": "pt"})
    index = into / "model.safetensors.index.json"
    index.unlink(missing_ok=True)  # (one file now)
    return len(taken)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--json", default=None)
    parser.add_argument("--take", default=None, metavar="SUFFIX")
    parser.add_argument("--into", default=None, type=Path, metavar="DIR")
    args = parser.parse_args()
    if (args.take is None) != (args.into is None):
        parser.error("--take and --into go together")
    report = compare(args.first, args.second)
    differing = report["differing"]
    print(f"identical {report['identical']}, differing {len(differing)} {report['differing_by_kind']}, "
          f"mismatched {len(report['mismatched'])}, only in the first {len(report['only_first'])}, "
          f"only in the second {len(report['only_second'])}")
    if differing:
        print(f"largest relative difference {max(row['max_rel'] for row in differing):.3g} "
              f"({max(differing, key=lambda row: row['max_rel'])['name']})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.take is not None:
        print(f"{take(args.first, args.second, args.take, args.into)} tensors *{args.take} of {args.second} "
              f"written into a copy of {args.first}: {args.into}")


if __name__ == "__main__":
    main()

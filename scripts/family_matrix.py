"""The family x method matrix: every model family of the tests (`llmquant.testing.tiny_models.FAMILIES`: tiny random
configs from transformers) quantized by every method, as a table.

    .venv/bin/python scripts/family_matrix.py       # rewrites its section of BENCHMARKS.md

A cell is "yes" when the run finished: the transforms kept the float function within their tolerance (the
engine checks it on every layer) and the quantized model is within the column's bound of the float model
(relative error of the logits on fixed random ids), with what did not apply said (a rotation turned off, Linears
left unsmoothed, each with its reason below the table); or the one-line refusal, which comes before any
calibration. tests/test_families.py computes the same matrix, checks the bounds and fails when the table in
BENCHMARKS.md differs from it, so the table cannot drift from the code.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

import llmquant
from llmquant.errors import LlmquantError
from llmquant.nn.quant_linear import set_runtime
from llmquant.quant.scheme import W8A8_SCHEMES
from llmquant.testing.tiny_models import FAMILIES, VOCAB, logits, make_model, relative_error

ROOT = Path(__file__).resolve().parents[1]

BENCHMARKS = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- family matrix: scripts/family_matrix.py writes this -->\n", "<!-- end of the family matrix -->\n"
W4 = {"scheme": "w_uint4_per_group_asym", "group_size": 16}
STATIC = "w_int8_per_channel_a_int8_per_tensor_static"
TOKEN_KV = "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic"
METHODS: dict[str, tuple[list[dict], float]] = {  # column -> (recipes, bound on the logits' relative error)
    "W8A8, the 8 schemes": ([{"scheme": name} for name in W8A8_SCHEMES], 0.3),
    "W4 RTN": ([W4], 0.4),
    "W4 GPTQ": ([{**W4, "algorithm": "gptq"}], 0.4),
    "W4 AWQ": ([{**W4, "algorithm": "awq"}], 0.4),
    "SmoothQuant 0.5": ([{"scheme": STATIC, "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]}], 0.3),
    "SmoothQuant auto": ([{"scheme": STATIC, "pre_opts": [{"name": "smoothquant", "alpha": "auto"}]}], 0.3),
    "QuaRot R1-R4": ([{"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "pre_opts": [{"name": "quarot"}]}],
                     0.1),
    "INT8 KV, save, load, int8 runtime": ([{"scheme": TOKEN_KV}], 0.1),
}


@dataclass
class Cell:
    """One family x method: "yes" (with notes on what did not apply) or the refusal; the errors of its runs."""

    outcome: str = "yes"
    notes: list[str] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)


def _calibration() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (4, 32), generator=generator), torch.randint(0, VOCAB, (2, 32), generator=generator)


def _notes(manifest: dict) -> list[str]:
    """What did not apply in one run: rotations turned off, Linears left unsmoothed (with the reasons)."""
    notes = []
    rotation = manifest.get("rotation", {})
    plans = [rotation.get("plan", []), *rotation.get("other_layer_plans", [])]  # (layers made otherwise: their own)
    for step in plans[0]:
        elsewhere = [s for plan in plans[1:] for s in plan if s["rotation"] == step["rotation"]]
        if not step["applies"]:
            some = " (some layers)" if any(s["applies"] for s in elsewhere) else ""
            notes.append(f"{step['rotation']}{some} off: {step['note'].split(': ', 1)[-1]}")
    for name, why in manifest.get("not_smoothed", {}).items():
        notes.append(f"{name} not smoothed: {why}")
    for name, why in manifest.get("not_quantizable", {}).items():
        notes.append(f"{name} left float: {why}")
    return notes


def _round_trip(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """Save, load on the int8 runtime, and compare with the model in memory on the same runtime: bit for bit."""
    with tempfile.TemporaryDirectory() as directory:
        llmquant.save(model, None, Path(directory) / "ckpt")
        loaded, _ = llmquant.load(Path(directory) / "ckpt", runtime="int8", device="cpu")
    set_runtime(model, "int8")
    if not torch.equal(logits(model, ids), logits(loaded, ids)):
        raise AssertionError("the loaded checkpoint's logits differ from the model's")


def cell(family: str, method: str) -> Cell:
    recipes, _ = METHODS[method]
    calib, ids = _calibration()
    found = Cell()
    reference = logits(make_model(family), ids)
    refusals = []
    for recipe in recipes:
        try:
            model = llmquant.quantize(make_model(family), recipe, calib=calib, progress=False)
        except LlmquantError as err:
            refusals.append(str(err))
            continue
        found.errors.append(relative_error(reference, logits(model, ids)))
        found.notes += [n for n in _notes(model.llmquant_manifest.results) if n not in found.notes]
        if method.startswith("INT8 KV"):
            _round_trip(model, ids)
    if refusals and not found.errors:
        return Cell(outcome=f"refused: {refusals[0]}")
    if refusals:  # some of the column's schemes (those with a KV cache, say): the note names the first reason
        found.notes.append(f"{len(refusals)} of {len(recipes)} schemes refused: {refusals[0]}")
    return found


def matrix() -> dict[str, dict[str, Cell]]:
    logging.disable(logging.WARNING)  # (the notes say what the warnings would)
    try:
        return {family: {method: cell(family, method) for method in METHODS} for family in FAMILIES}
    finally:
        logging.disable(logging.NOTSET)


def _shown(found: Cell) -> str:
    if found.outcome != "yes":
        return found.outcome
    off = sorted({note.split(" off:")[0] for note in found.notes if " off:" in note})
    unsmoothed = [note.split(" not smoothed")[0] for note in found.notes if " not smoothed" in note]
    parts = [f"{', '.join(off)} off"] if off else []
    if unsmoothed:
        parts.append(f"{len(unsmoothed)} unsmoothed")
    parts += [note.split(":")[0] for note in found.notes if " schemes refused: " in note]
    floating = [note for note in found.notes if " left float: " in note]
    if floating:
        parts.append(f"{len(floating)} not quantizable")
    return "yes" + (f" ({'; '.join(parts)})" if parts else "")


def markdown(found: dict[str, dict[str, Cell]]) -> str:
    lines = ["| family | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for family, cells in found.items():
        lines.append(f"| {family} | " + " | ".join(_shown(cells[m]) for m in METHODS) + " |")
    lines += ["", "What did not apply, and why:", ""]
    for family, cells in found.items():
        notes = list(dict.fromkeys(note for method in METHODS for note in cells[method].notes))
        lines += [f"- {family}: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def committed_table() -> str:
    """The matrix as BENCHMARKS.md holds it (between `BEGIN` and `END`)."""
    text = BENCHMARKS.read_text()
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)]


def write_table(table: str) -> None:
    text = BENCHMARKS.read_text()
    BENCHMARKS.write_text(text[:text.index(BEGIN) + len(BEGIN)] + table + text[text.index(END):])


if __name__ == "__main__":
    torch.set_num_threads(1)
    table = markdown(matrix())
    write_table(table)
    print(table)

"""`llmquant sweep`: a grid of schemes x pre-optimization methods on one model, in one resumable run.

A *method* is a name for a list of pre_opts (``smooth_0.5`` -> ``[{name: smoothquant, alpha: 0.5}]``).
Each cell reloads the float model (quantization works in place), quantizes it with the base recipe,
the cell's scheme and the method's pre_opts, and measures its perplexity on the evaluation windows the
float model was measured on once. What ``output`` receives::

    sweep.json                          the settings and the float perplexity (checked on a rerun)
    cells/<scheme>/<method>/result.json the cell's figures; written last, so it marks a finished cell
    cells/<scheme>/<method>/llmquant.json  the cell's quantize manifest
    sweep.md, sweep.csv, sweep.png      the table (schemes x methods), every figure, the chart

Running the same command again skips every cell whose result.json exists; files are written to a
temporary name and renamed, so an interrupted cell leaves no result behind. ``output`` must be new, empty
or an earlier sweep (its sweep.json is there): a sweep writes only the names above and deletes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import llmquant
from llmquant import data
from llmquant.api import as_recipe, calibration_ids
from llmquant.device import dtype_name, resolve_device, resolve_dtype
from llmquant.errors import LlmquantError
from llmquant.evaluation.perplexity import perplexity
from llmquant.nn.quant_linear import set_runtime
from llmquant.quant.scheme import W8A8_SCHEMES, scheme_from_name
from llmquant.recipe import DEFAULT_SAMPLES, Recipe, read_mapping

PreOpts = list[dict[str, Any]]
BUILTIN_METHODS: dict[str, PreOpts] = {  # seed 000's three columns, and no pre-optimization at all
    "smooth_0.85": [{"name": "smoothquant", "alpha": 0.85}],
    "smooth_0.5": [{"name": "smoothquant", "alpha": 0.5}],
    "smooth_fc_fc_0.5+rotation": [{"name": "smooth_fc_fc", "alpha": 0.5}, {"name": "quarot", "online_had": False}],
    "none": [],
    "smooth_auto": [{"name": "smoothquant", "alpha": "auto"}],
    # the best per-tensor static recipe found on the default model (BENCHMARKS.md): offline rotation, then
    # SmoothQuant with alpha searched per group on the rotated activations
    "rotation+smooth_auto": [{"name": "quarot", "rotations": ["R1", "R2"], "online_had": False},
                             {"name": "smoothquant", "alpha": "auto"}],
}
DEFAULT_METHODS = ("smooth_0.85", "smooth_0.5", "smooth_fc_fc_0.5+rotation")
DEFAULT_SCHEMES = W8A8_SCHEMES
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]*$")  # a method name is a folder name
SETTINGS_FILE, RESULT_FILE, MANIFEST_FILE = "sweep.json", "result.json", "llmquant.json"


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a scheme and a named list of pre_opts."""

    scheme: str
    method: str
    pre_opts: PreOpts

    @property
    def key(self) -> tuple[str, str]:
        return self.scheme, self.method

    def folder(self, output: Path) -> Path:
        return output / "cells" / self.scheme / self.method


@dataclass(frozen=True)
class CellResult:
    """What a finished cell measured (``error`` instead of a perplexity when quantizing it failed)."""

    scheme: str
    method: str
    pre_opts: PreOpts
    perplexity: float | None
    float_perplexity: float
    quantize_seconds: float
    eval_seconds: float
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.perplexity is None else self.perplexity / self.float_perplexity


@dataclass(frozen=True)
class SweepSummary:
    """The finished grid: every cell's result, how many ran now, and where the outputs are."""

    results: list[CellResult]
    ran: int
    float_perplexity: float
    table: Path
    seconds: float

    def best(self) -> CellResult | None:
        measured = [r for r in self.results if r.perplexity is not None]
        return min(measured, key=lambda r: r.perplexity or math.inf) if measured else None

    def line(self) -> str:
        best = self.best()
        found = (f"best {best.scheme} + {best.method}: ppl {best.perplexity:.3f} (float {self.float_perplexity:.3f})"
                 if best is not None else "no cell gave a perplexity")
        failed = sum(r.error is not None for r in self.results)
        return (f"sweep: {len(self.results)} cells ({self.ran} run now, {len(self.results) - self.ran} already done"
                f"{f', {failed} failed' if failed else ''}) in {self.seconds:.1f} s; table in {self.table} "
                f"(and .csv, .png); {found}")


# --- the grid -------------------------------------------------------------------------------------
def resolve_methods(entries: Iterable[str] | None = None) -> dict[str, PreOpts]:
    """Methods by name: each entry is a built-in name or a .json/.yaml file mapping names to pre_opts lists."""
    methods: dict[str, PreOpts] = {}
    for entry in entries if entries is not None else DEFAULT_METHODS:
        found = _methods_file(Path(entry)) if entry.endswith((".json", ".yaml", ".yml")) else _builtin(entry)
        for name, pre_opts in found.items():
            if name in methods and methods[name] != pre_opts:
                raise LlmquantError(f"method '{name}' is given twice with different pre_opts")
            methods[name] = pre_opts
    if not methods:
        raise LlmquantError("--methods needs at least one method")
    return methods


def _builtin(name: str) -> dict[str, PreOpts]:
    if name not in BUILTIN_METHODS:
        raise LlmquantError(f"unknown method '{name}'; allowed: {', '.join(BUILTIN_METHODS)}, "
                            "or a .json/.yaml file mapping method names to pre_opts lists")
    return {name: BUILTIN_METHODS[name]}


def _methods_file(path: Path) -> dict[str, PreOpts]:
    shape = "method names to pre_opts lists, e.g. {smooth_0.7: [{name: smoothquant, alpha: 0.7}]}"
    found = read_mapping(path, "methods file", shape)
    for name, pre_opts in found.items():
        if not isinstance(name, str) or not _SAFE_NAME.match(name):
            raise LlmquantError(f"methods file {path}: method name {name!r} must use only letters, digits, _ . + -")
        if not isinstance(pre_opts, list) or not all(isinstance(p, dict) for p in pre_opts):
            raise LlmquantError(f"methods file {path}: method '{name}' must be a list of pre_opts, {shape}")
    return found


def build_cells(base: Recipe, schemes: Iterable[str], methods: dict[str, PreOpts]) -> list[tuple[Cell, Recipe]]:
    """Every (scheme, method) with its recipe, validated before any model work."""
    schemes = list(schemes)
    if not schemes:
        raise LlmquantError("--schemes needs at least one scheme")
    for scheme in schemes:
        scheme_from_name(scheme)  # unknown scheme: one line naming the allowed ones
    for method, pre_opts in methods.items():
        try:
            as_recipe({**base.model_dump(), "pre_opts": pre_opts})
        except LlmquantError as err:
            raise LlmquantError(f"method '{method}': {err}") from None
    return [(Cell(scheme, method, pre_opts), as_recipe({**base.model_dump(), "scheme": scheme, "pre_opts": pre_opts}))
            for scheme in schemes for method, pre_opts in methods.items()]


# --- files ----------------------------------------------------------------------------------------
def check_output(output: Path) -> None:
    """A sweep writes into a new or empty directory, or one an earlier sweep wrote (its sweep.json is there):
    one line for a file or a directory of other files, before any work."""
    if not output.exists():
        return
    if not output.is_dir():
        raise LlmquantError(f"--output {output} is a file, not a directory; expected a new or empty directory, or "
                            "an earlier sweep's to resume")
    if any(output.iterdir()) and not (output / SETTINGS_FILE).is_file():
        raise LlmquantError(f"--output {output} holds files but no sweep (no {SETTINGS_FILE}); a sweep writes its "
                            "table and cells there: choose a new or empty directory")


def write_atomically(path: Path, content: str | bytes) -> None:
    """Write to a fresh temporary name beside ``path``, then rename: a reader sees all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    file = tmp.open("xb")  # "x": a fresh file, never an existing one (the unlink below removes only ours)
    try:
        with file:
            file.write(content if isinstance(content, bytes) else content.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_result(cell: Cell, output: Path) -> CellResult | None:
    """The cell's finished result, or None if it has not run (or ran with other pre_opts: an error)."""
    path = cell.folder(output) / RESULT_FILE
    if not path.exists():
        return None
    result = CellResult(**json.loads(path.read_text()))
    if result.pre_opts != cell.pre_opts:
        raise LlmquantError(f"{path} was run with other pre_opts for method '{cell.method}' ({result.pre_opts}); "
                            "rename the method or use another --output")
    return result


def settings_of(model: str | None, base: Recipe, eval_corpus: str, max_windows: int | None,
                runtime: str = "int8", device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """What every cell's figure depends on besides its scheme and method (a rerun must match it); where it runs
    only when that is not the CPU in the model's own dtype (as sweeps made before the GPU path recorded it)."""
    recipe = base.model_dump(mode="json", exclude={"scheme", "pre_opts"})  # (GPTQ's knobs only with GPTQ)
    settings = {"model": model or "default", "recipe": recipe, "runtime": runtime,
                "eval": {"corpus": eval_corpus, "seqlen": base.calib.seqlen, "max_windows": max_windows}}
    placed, chosen = resolve_device(device), resolve_dtype(dtype)
    if placed.type != "cpu" or chosen is not None:
        settings["placement"] = {"device": str(placed), "dtype": None if chosen is None else dtype_name(chosen)}
    return settings


def check_settings(output: Path, settings: dict[str, Any]) -> float | None:
    """The float perplexity of an earlier run with the same settings, None for a fresh directory."""
    path = output / SETTINGS_FILE
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    if stored.get("settings") != settings:
        raise LlmquantError(f"{output} holds a sweep with other settings (model, recipe fields, corpus, seqlen or "
                            f"windows; see {path}); use another --output or the same flags")
    return stored.get("float_perplexity")


# --- running --------------------------------------------------------------------------------------
def run_cell(cell: Cell, recipe: Recipe, model_path: str | None, calib: torch.Tensor, windows: torch.Tensor,
             float_ppl: float, output: Path, runtime: str = "int8", device: str | None = None,
             dtype: str | None = None) -> CellResult:
    """Load the float model (on ``device``, in ``dtype``: `llmquant.load`), quantize it as ``recipe`` says, measure
    it with ``runtime`` (the int8 kernels where a layer has them, the same function as the simulation), write
    manifest then result."""
    model, _ = llmquant.load(model_path, device=device, dtype=dtype)
    start = time.perf_counter()
    try:
        llmquant.quantize(model, recipe, calib=calib, progress=False, device=device)
        set_runtime(model, runtime)
        quantized = time.perf_counter()
        ppl = perplexity(model, windows)
    except LlmquantError as err:  # a cell that cannot be done (a rotation that does not fit, NaN) shows as an error
        failed = CellResult(cell.scheme, cell.method, cell.pre_opts, None, float_ppl, time.perf_counter() - start,
                            0.0, str(err))
        return write_result(cell, output, failed)
    manifest = model.llmquant_manifest
    manifest.results.update({"float_ppl": float_ppl, "quantized_ppl": ppl, "ppl_ratio": ppl / float_ppl})
    write_atomically(cell.folder(output) / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2))
    return write_result(cell, output, CellResult(cell.scheme, cell.method, cell.pre_opts, ppl, float_ppl,
                                                  quantized - start, time.perf_counter() - quantized))


def write_result(cell: Cell, output: Path, result: CellResult) -> CellResult:
    """The cell's result.json, written last: its presence marks the cell as finished."""
    write_atomically(cell.folder(output) / RESULT_FILE, json.dumps(asdict(result), indent=2))
    return result


def run_sweep(
    model: str | None,
    base: Recipe,
    output: Path,
    schemes: Iterable[str] | None = None,
    methods: dict[str, PreOpts] | None = None,
    eval_corpus: str = "pydoc",
    max_windows: int | None = 40,
    progress: bool = True,
    runtime: str = "int8",
    device: str | None = None,
    dtype: str | None = None,
) -> SweepSummary:
    """Run every cell of ``schemes`` x ``methods`` not yet finished in ``output``, then write the table; every
    model on ``device`` in ``dtype`` (`llmquant.load`)."""
    start = time.perf_counter()
    check_output(output)
    if base.calib.samples is None:  # every cell calibrates on the same windows, drawn once: a count, even where the
        # base recipe needs none (a cell that needs none measures its layers' output errors on one a process)
        base = base.model_copy(update={"calib": base.calib.model_copy(update={"samples": DEFAULT_SAMPLES})})
    cells = build_cells(base, list(schemes or DEFAULT_SCHEMES), methods or resolve_methods(None))
    settings = settings_of(model, base, eval_corpus, max_windows, runtime, device, dtype)
    float_ppl = check_settings(output, settings)
    done = {cell.key: read_result(cell, output) for cell, _ in cells}
    todo = [(cell, recipe) for cell, recipe in cells if done[cell.key] is None]
    if todo or float_ppl is None:
        calib, windows, float_model = prepare_data(model, base, eval_corpus, max_windows, device, dtype)
        if float_ppl is None:
            float_ppl = perplexity(float_model, windows, progress=progress)
            write_atomically(output / SETTINGS_FILE, json.dumps({"settings": settings, "float_perplexity": float_ppl},
                                                                indent=2))
        del float_model
        bar = tqdm(todo, desc="sweep", unit="cell", disable=not progress)
        for cell, recipe in bar:
            bar.set_postfix_str(f"{cell.scheme} + {cell.method}")
            done[cell.key] = run_cell(cell, recipe, model, calib, windows, float_ppl, output, runtime, device, dtype)
    results = [r for r in done.values() if r is not None]
    table = write_outputs(output, results, float_ppl, describe(model, base, eval_corpus, max_windows))
    return SweepSummary(results, len(todo), float_ppl, table, time.perf_counter() - start)


def prepare_data(
    model: str | None, base: Recipe, eval_corpus: str, max_windows: int | None, device: str | None = None,
    dtype: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Calibration ids and evaluation windows shared by every cell, and the float model they came with."""
    calib_texts = data.corpus_parts(base.calib.dataset, "calib")  # a bad corpus fails before any model work
    eval_text = data.corpus(eval_corpus, "eval")
    float_model, tokenizer = llmquant.load(model, device=device, dtype=dtype)
    if tokenizer is None:
        raise LlmquantError(f"{model} has no tokenizer files; the sweep needs one")
    limit = getattr(float_model.config, "max_position_embeddings", None)
    if limit is not None and base.calib.seqlen > limit:  # else every cell would fail alike
        raise LlmquantError(f"seqlen {base.calib.seqlen} exceeds the model's max_position_embeddings {limit}")
    windows = data.eval_windows(data.tokenize(tokenizer, eval_text), base.calib.seqlen, max_windows)
    return calibration_ids(base, tokenizer, calib_texts), windows, float_model


def describe(model: str | None, base: Recipe, eval_corpus: str, max_windows: int | None) -> str:
    windows = f"at most {max_windows} windows" if max_windows is not None else "all windows"
    return (f"Perplexity of {model or 'the default model'} on {eval_corpus} (seqlen {base.calib.seqlen}, {windows}); "
            f"calibration: {base.calib.samples} samples of {base.calib.dataset} on the {base.propagation()} model's "
            f"activations (calib.propagate), weights {base.algorithm}")


# --- outputs --------------------------------------------------------------------------------------
def write_outputs(output: Path, results: list[CellResult], float_ppl: float, caption: str) -> Path:
    """sweep.md (schemes x methods), sweep.csv (every figure) and sweep.png; returns the table's path."""
    table = output / "sweep.md"
    write_atomically(table, markdown_table(results, float_ppl, caption))
    write_atomically(output / "sweep.csv", csv_text(results))
    write_atomically(output / "sweep.png", chart_png(results, float_ppl, caption))
    return table


def _axes(results: list[CellResult]) -> tuple[list[str], list[str]]:
    return list(dict.fromkeys(r.scheme for r in results)), list(dict.fromkeys(r.method for r in results))


def markdown_table(results: list[CellResult], float_ppl: float, caption: str) -> str:
    schemes, methods = _axes(results)
    by_cell = {(r.scheme, r.method): r for r in results}
    lines = [f"{caption}. Float32 perplexity: {float_ppl:.3f}.", "",
             "| scheme | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for scheme in schemes:
        cells = [_shown(by_cell.get((scheme, method))) for method in methods]
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _shown(result: CellResult | None) -> str:
    if result is None:
        return ""
    return "error" if result.perplexity is None else f"{result.perplexity:.3f}"


def csv_text(results: list[CellResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["scheme", "method", "perplexity", "float_perplexity", "ratio", "quantize_seconds",
                     "eval_seconds", "pre_opts", "error"])
    for r in results:
        writer.writerow([r.scheme, r.method, r.perplexity, r.float_perplexity, r.ratio, round(r.quantize_seconds, 3),
                         round(r.eval_seconds, 3), json.dumps(r.pre_opts), r.error or ""])
    return buffer.getvalue()


def chart_png(results: list[CellResult], float_ppl: float, caption: str) -> bytes:
    """Perplexity per scheme, one marker series per method, the float perplexity as a dashed line."""
    from matplotlib.figure import Figure

    schemes, methods = _axes(results)
    by_cell = {(r.scheme, r.method): r.perplexity for r in results}
    figure = Figure(figsize=(max(6.0, 1.2 * len(schemes) + 2.5), 5.0))
    axes = figure.subplots()
    step = 0.5 / max(len(methods), 1)
    for i, method in enumerate(methods):
        points = [(x, by_cell.get((s, method))) for x, s in enumerate(schemes)]
        xs = [x + (i - (len(methods) - 1) / 2) * step for x, y in points if y is not None]
        axes.plot(xs, [y for _, y in points if y is not None], marker="o", linestyle="none", label=method)
    axes.axhline(float_ppl, color="black", linestyle="--", linewidth=1, label=f"float32 ({float_ppl:.2f})")
    measured = [p for p in by_cell.values() if p is not None] + [float_ppl]
    if max(measured) / min(measured) > 10:
        axes.set_yscale("log")
    axes.set_xticks(range(len(schemes)), [s.replace("_kv_cache_", "\nkv_cache_") for s in schemes],
                    rotation=25, ha="right", fontsize=7)
    axes.set_ylabel("perplexity")
    axes.set_title(caption, fontsize=8, wrap=True)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()

"""`llmquant sweep` on the tiny checkpoint: a 2 x 2 grid writes the table, CSV, chart and per-cell
manifests with the figures `quantize` gives for the same recipe; a rerun redoes nothing; an interrupted
cell leaves no result and the rerun finishes only what is missing; bad input is one line, exit code 2."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest

import llmquant
import llmquant.sweep
from llmquant import data
from llmquant.cli import main
from llmquant.evaluation.perplexity import perplexity
from llmquant.recipe import Recipe
from llmquant.sweep import DEFAULT_SCHEMES, build_cells, resolve_methods

SCHEMES = ["w_int8_per_channel_a_int8_per_tensor_static", "w_int8_per_tensor_a_int8_per_tensor_static"]
CUSTOM_METHOD = "fc_fc_0.8"  # from a methods file (rotation is left out of the grid: it is the slow part)





@pytest.fixture(scope="module")
def methods_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("methods") / "methods.yaml"
    path.write_text(f"{CUSTOM_METHOD}:\n  - {{name: smooth_fc_fc, alpha: 0.8}}\n")
    return path


def sweep_args(tiny_dir: Path, corpus: Path, output: Path, *methods: str, schemes: list[str] = SCHEMES) -> list[str]:
    return ["sweep", "--model", str(tiny_dir), "--schemes", *schemes, "--methods", *methods,
            "--calib", str(corpus), "--eval-corpus", str(corpus), "--calib-samples", "2", "--seqlen", "32",
            "--max-windows", "2", "--output", str(output), "--quiet"]


def run(args: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(args)
    return code, printed.getvalue()


def result_files(output: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in sorted(output.glob("cells/*/*/result.json"))}


@pytest.fixture(scope="module")
def finished(tiny_dir: Path, corpus: Path, methods_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("sweep") / "out"
    code, printed = run(sweep_args(tiny_dir, corpus, output, "smooth_0.5", str(methods_file)))
    assert code == 0
    assert "sweep: 4 cells (4 run now, 0 already done)" in printed and f"table in {output / 'sweep.md'}" in printed
    return output


def test_grid_writes_table_csv_chart_and_manifests(finished: Path, tiny_dir: Path, corpus: Path) -> None:
    rows = list(csv.DictReader((finished / "sweep.csv").open()))
    grid = {(s, m) for s in SCHEMES for m in ("smooth_0.5", CUSTOM_METHOD)}
    assert {(r["scheme"], r["method"]) for r in rows} == grid
    ppl = {(r["scheme"], r["method"]): float(r["perplexity"]) for r in rows}
    assert all(math.isfinite(p) and p > 1 for p in ppl.values()) and not any(r["error"] for r in rows)

    model, tokenizer = llmquant.load(tiny_dir)  # the float line: computed once, on the same windows
    windows = data.eval_windows(data.tokenize(tokenizer, corpus.read_text()), 32, 2)
    expected = perplexity(model, windows)
    assert all(float(r["float_perplexity"]) == pytest.approx(expected) for r in rows)

    table = (finished / "sweep.md").read_text().splitlines()
    assert "2 samples of" in table[0] and "on the float model's activations (calib.propagate)" in table[0]
    assert table[2] == f"| scheme | smooth_0.5 | {CUSTOM_METHOD} |"
    for scheme in SCHEMES:
        [line] = [line for line in table if line.startswith(f"| {scheme} |")]
        assert line == f"| {scheme} | {ppl[scheme, 'smooth_0.5']:.3f} | {ppl[scheme, CUSTOM_METHOD]:.3f} |"
    assert (finished / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    manifest = json.loads((finished / "cells" / SCHEMES[1] / CUSTOM_METHOD / "llmquant.json").read_text())
    assert manifest["recipe"]["scheme"] == SCHEMES[1]
    assert manifest["recipe"]["pre_opts"] == [{"name": "smooth_fc_fc", "alpha": 0.8}]
    assert {g["producer"] for g in manifest["results"]["smooth_groups"]} == {"self_attn.v_proj", "mlp.up_proj"}
    assert manifest["results"]["quantized_ppl"] == pytest.approx(ppl[SCHEMES[1], CUSTOM_METHOD])


def test_a_cell_equals_quantize_with_the_same_recipe(
    finished: Path, tiny_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    args = ["quantize", "--model", str(tiny_dir), "--scheme", SCHEMES[0], "--pre-opt", "smoothquant", "--alpha", "0.5",
            "--calib", str(corpus), "--eval-corpus", str(corpus), "--calib-samples", "2", "--seqlen", "32",
            "--max-windows", "2", "--output", str(tmp_path / "q"), "--quiet"]
    assert run(args)[0] == 0
    quantized = json.loads((tmp_path / "q" / "llmquant.json").read_text())["results"]["quantized_ppl"]
    cell = json.loads((finished / "cells" / SCHEMES[0] / "smooth_0.5" / "result.json").read_text())
    assert cell["perplexity"] == pytest.approx(quantized, rel=1e-9)


def test_second_run_redoes_nothing(finished: Path, tiny_dir: Path, corpus: Path, methods_file: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    before = result_files(finished)
    assert len(before) == 4
    monkeypatch.setattr(llmquant.sweep, "run_cell", lambda *a, **k: pytest.fail("a finished cell ran again"))
    code, printed = run(sweep_args(tiny_dir, corpus, finished, "smooth_0.5", str(methods_file)))
    assert code == 0 and "4 cells (0 run now, 4 already done)" in printed
    assert result_files(finished) == before


def test_interrupted_cell_leaves_no_result_and_the_rerun_finishes_it(
    tiny_dir: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    args = sweep_args(tiny_dir, corpus, output, "none", "smooth_0.5", schemes=SCHEMES[:1])
    calls = []

    def interrupted_on_the_second_cell(*args: object, **kwargs: object) -> float:
        calls.append(1)
        if len(calls) == 3:  # the float model, the first cell, then Ctrl-C in the second cell
            raise KeyboardInterrupt
        return perplexity(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(llmquant.sweep, "perplexity", interrupted_on_the_second_cell)
    assert run(args)[0] == 130
    assert "finished cells are kept" in capsys.readouterr().err
    first = result_files(output)
    assert list(first) == [output / "cells" / SCHEMES[0] / "none" / "result.json"]
    assert not [p for p in output.rglob("*") if ".tmp-" in p.name]
    assert not (output / "cells" / SCHEMES[0] / "smooth_0.5" / "llmquant.json").exists()

    monkeypatch.setattr(llmquant.sweep, "perplexity", perplexity)
    code, printed = run(args)
    assert code == 0 and "2 cells (1 run now, 1 already done)" in printed
    assert result_files(output)[next(iter(first))] == next(iter(first.values()))


def test_default_grid_is_seed_000s_table() -> None:
    cells = build_cells(Recipe(), DEFAULT_SCHEMES, resolve_methods(None))
    assert [c.method for c, _ in cells[:3]] == ["smooth_0.85", "smooth_0.5", "smooth_fc_fc_0.5+rotation"]
    assert len(cells) == 24 and {c.scheme for c, _ in cells} == set(llmquant.W8A8_SCHEMES)
    recipes = {c.method: r for c, r in cells[:3]}
    assert [p.alpha for p in recipes["smooth_0.85"].pre_opts] == [0.85]
    rotation = recipes["smooth_fc_fc_0.5+rotation"]
    assert rotation.pre_opts[0].name == "smooth_fc_fc" and rotation.pre_opts[0].alpha == 0.5
    assert rotation.quarot() is not None and rotation.quarot().active_rotations() == ("R1", "R2")


@pytest.mark.parametrize(
    ("methods", "expected"),
    [
        (["smooth_0.5", "bogus"], "unknown method 'bogus'; allowed: smooth_0.85, smooth_0.5, smooth_fc_fc_0.5+rot"),
        (["BAD.yaml"], "method 'm': recipe field 'pre_opts.0.smoothquant.alpha' = 2"),
        (["/no/such/methods.json"], "cannot read methods file /no/such/methods.json"),
    ],
)
def test_bad_method_is_one_line_and_writes_nothing(
    tiny_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], methods: list[str], expected: str
) -> None:
    (tmp_path / "BAD.yaml").write_text("m: [{name: smoothquant, alpha: 2}]\n")
    methods = [str(tmp_path / m) if m == "BAD.yaml" else m for m in methods]
    assert main(sweep_args(tiny_dir, corpus, tmp_path / "out", *methods)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_rerun_with_other_settings_is_refused(
    finished: Path, tiny_dir: Path, corpus: Path, methods_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = sweep_args(tiny_dir, corpus, finished, "smooth_0.5", str(methods_file))
    args[args.index("--seqlen") + 1] = "16"
    assert main(args) == 2
    assert "holds a sweep with other settings" in capsys.readouterr().err


def test_a_cell_that_cannot_be_quantized_is_shown_as_an_error(
    tiny_dir: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fit(*args: object, **kwargs: object) -> None:
        raise llmquant.LlmquantError("R1 does not fit this model")

    monkeypatch.setattr(llmquant, "quantize", no_fit)
    code, printed = run(sweep_args(tiny_dir, corpus, tmp_path / "out", "none", schemes=SCHEMES[:1]))
    assert code == 0 and "1 cells (1 run now, 0 already done, 1 failed)" in printed
    assert "no cell gave a perplexity" in printed
    assert f"| {SCHEMES[0]} | error |" in (tmp_path / "out" / "sweep.md").read_text()
    [row] = csv.DictReader((tmp_path / "out" / "sweep.csv").open())
    assert row["perplexity"] == "" and row["error"] == "R1 does not fit this model"


def test_seqlen_beyond_the_model_is_one_line_before_any_cell(
    tiny_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = sweep_args(tiny_dir, corpus, tmp_path / "out", "none", schemes=SCHEMES[:1])
    args[args.index("--seqlen") + 1] = "1024"  # the tiny checkpoint has 256 positions
    assert main(args) == 2
    expected = "llmquant: error: seqlen 1024 exceeds the model's max_position_embeddings 256"
    assert capsys.readouterr().err.strip() == expected
    assert not (tmp_path / "out").exists()

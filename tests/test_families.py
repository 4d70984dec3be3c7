"""Every model family of `FAMILIES` with every method (scripts/family_matrix.py): each cell works within its bound
or refuses in one line, what is left as it was is said, and the table in BENCHMARKS.md is the one the code
gives. `llmquant detect` on each family prints its norms, groups, rotations and float Linears."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

import llmquant
from conftest import FAMILIES, VOCAB, load_script, make_model
from llmquant.cli import _untouched_line, main


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("family_matrix")


@pytest.fixture(scope="module")
def found(script: ModuleType) -> dict:
    return script.matrix()


def test_every_cell_works_within_its_bound_or_refuses_in_one_line(script: ModuleType, found: dict) -> None:
    assert set(found) == set(FAMILIES) and all(set(cells) == set(script.METHODS) for cells in found.values())
    for family, cells in found.items():
        for method, cell in cells.items():
            if cell.outcome != "yes":
                assert cell.outcome.startswith("refused: ") and "\n" not in cell.outcome, (family, method)
                continue
            recipes, bound = script.METHODS[method]
            refused = [n for n in cell.notes if " schemes refused: " in n]  # (a column's KV-cache schemes, say)
            assert len(cell.errors) + (int(refused[0].split(" of ")[0]) if refused else 0) == len(recipes), (
                family, method)
            assert max(cell.errors) < bound, (family, method, cell.errors)


def test_the_committed_table_is_the_one_the_code_gives(script: ModuleType, found: dict) -> None:
    assert script.committed_table() == script.markdown(found), "run: .venv/bin/python scripts/family_matrix.py"


def test_what_did_not_apply_is_said_with_its_reason(found: dict) -> None:
    phi3 = found["phi3"]["SmoothQuant 0.5"].notes  # fused qkv and gate_up: their readers have no channel producer
    assert "self_attn.o_proj not smoothed: no norm or Linear feeds it channel for channel" in phi3
    assert any(n.startswith("R2 off") for n in found["gptneox"]["QuaRot R1-R4"].notes)
    assert any(n.startswith("R1 off") and "post_feedforward_layernorm" in n
               for n in found["gemma2"]["QuaRot R1-R4"].notes)  # sandwich norms
    assert not found["gemma"]["SmoothQuant auto"].notes and not found["gemma"]["QuaRot R1-R4"].notes  # (1 + w)


def test_the_summary_line_lists_what_stays_float_and_why_in_the_manifest() -> None:
    calib = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    recipe = {"scheme": "w_int8_per_channel_a_int8_per_tensor_static",
              "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]}
    model = llmquant.quantize(make_model("phi3"), recipe, calib=calib, progress=False)
    results = model.llmquant_manifest.results
    assert results["left_float"] == ["lm_head"]
    assert set(results["not_smoothed"]) == {"self_attn.o_proj", "mlp.down_proj"}
    assert _untouched_line(results) == ("left float: lm_head; not smoothed: self_attn.o_proj, mlp.down_proj of each "
                                        "layer (reasons in llmquant.json)")
    rotated = llmquant.quantize(make_model("gemma2"), {"pre_opts": [{"name": "quarot"}], "ignore": []}, calib=calib,
                                progress=False)
    assert _untouched_line(rotated.llmquant_manifest.results) == (
        "left float: nothing; rotations off: R1 (reasons in llmquant.json)")


@pytest.mark.parametrize("family", ["gemma2", "phi3", "olmo2", "opt"])
def test_detect_prints_norms_groups_rotations_and_float_linears(family: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    make_model(family).save_pretrained(tmp_path / family)
    assert main(["detect", "--model", str(tmp_path / family)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["left_float_by_default"] == ["lm_head"]
    norms, unsmoothed = printed["norms"], printed["not_smoothed"]
    readers = {name for group in printed["smooth_groups"] for name in group["linears"]}
    assert readers.isdisjoint(unsmoothed) and readers | set(unsmoothed) == set(printed["model_map"]["linears"])
    if family == "gemma2":
        assert norms["post_feedforward_layernorm"] == "RMSNorm form, gain w + 1"
        assert not next(r for r in printed["rotation_plan"] if r["rotation"] == "R1")["applies"]
    if family == "phi3":
        assert set(unsmoothed) == {"self_attn.o_proj", "mlp.down_proj"} and norms["input_layernorm"] == (
            "RMSNorm form, gain w")
    if family == "olmo2":
        assert "self_attn.q_norm" in norms and "self_attn.q_proj" in unsmoothed
    if family == "opt":
        assert norms["self_attn_layer_norm"] == "LayerNorm form, gain w, with bias" and not unsmoothed

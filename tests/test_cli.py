"""The command line: the main job on a tiny checkpoint, JSON output, and one clear line per user error."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmquant.cli import build_parser, main
from llmquant.errors import LlmquantError
from llmquant.testing.tiny_checkpoint import write_tiny_checkpoint

SMALL = ["--calib-samples", "4", "--seqlen", "32", "--max-windows", "2", "--quiet"]
ROOT = Path(__file__).parent.parent


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: name -> "module:function" (read without tomllib: Python 3.10)."""
    found = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert found is not None, "pyproject.toml has no [project.scripts]"
    return dict(re.findall(r'^([\w.-]+)\s*=\s*"([^"]+)"', found.group(1), re.M))


SCRIPTS = console_scripts()


def subcommands() -> list[str]:
    """The subcommands `build_parser` defines (a new one is covered by the --help test at once)."""
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)



def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_quantize_then_eval_json(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    scheme = "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_static"
    assert main(["quantize", "--model", str(tiny_dir), "--scheme", scheme, "--output", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "| float32 |" in printed and f"| {scheme} |" in printed
    manifest = json.loads((out / "llmquant.json").read_text())
    assert manifest["results"]["quantized_ppl"] > 0 and manifest["results"]["float_ppl"] > 0
    assert (out / "tokenizer.json").exists()

    assert main(["eval", "--model", str(out), "--ppl", "pydoc", "--seqlen", "32", "--max-windows", "2", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["ppl"]["pydoc"] == pytest.approx(manifest["results"]["quantized_ppl"], rel=1e-6)
    assert last["seconds"] > 0


def test_recipe_file_gives_the_same_model_as_the_flags(tiny_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("scheme: w_int8_per_channel_a_int8_per_token_dynamic\ncalib: {samples: 4, seqlen: 32}\n")
    common = ["quantize", "--model", str(tiny_dir), "--no-eval", "--quiet"]
    assert main([*common, "--config", str(recipe), "--output", str(tmp_path / "a")]) == 0
    flags = ["--scheme", "w_int8_per_channel_a_int8_per_token_dynamic", "--calib-samples", "4", "--seqlen", "32"]
    assert main([*common, *flags, "--output", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_set_gives_the_model_of_a_recipe_file_holding_the_fields(tiny_dir: Path, tmp_path: Path) -> None:
    whole, base = tmp_path / "whole.yaml", tmp_path / "base.yaml"
    whole.write_text("scheme: w_int4_per_group_sym\ngroup_size: 16\nalgorithm: gptq\ngptq: {asymmetric: 0.25}\n"
                     "calib: {samples: 4, seqlen: 32}\n")
    base.write_text("scheme: w_int4_per_group_sym\ngroup_size: 32\ncalib: {samples: 4, seqlen: 32}\n")
    common = ["quantize", "--model", str(tiny_dir), "--no-eval", "--quiet"]
    assert main([*common, "--config", str(whole), "--output", str(tmp_path / "a")]) == 0
    settings = ["--set", "group_size=16", "--set", "algorithm=gptq", "--set", "gptq.asymmetric=0.25"]
    assert main([*common, "--config", str(base), *settings, "--output", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "llmquant.json").read_text())["recipe"] for d in ("a", "b"))
    assert a == b and b["gptq"]["asymmetric"] == 0.25
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_detect_prints_the_layer_map(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect", "--model", str(tiny_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    found = printed["model_map"]
    assert found["decoder_layers"] == "model.layers" and "mlp.down_proj" in found["linears"]
    plan = {row["rotation"]: row for row in printed["rotation_plan"]}  # hidden 64, head_dim 16, mlp 128
    assert [plan[r]["size"] for r in ("R1", "R2", "R3", "R4")] == [64, 16, 16, 128]
    assert all(row["applies"] for row in plan.values()) and plan["R4"]["targets"] == ["mlp.down_proj"]
    assert plan["R4"]["online_flops_per_token"] == 128 * 7 and "construction" in plan["R1"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--scheme", "w_int9"], "unknown scheme 'w_int9'; allowed: none, w_int8_per_tensor_a_int8"),
        (["--kv-cache", "fp8"], "unknown kv cache 'fp8'; allowed: int8_per_tensor"),
        (["--calib-samples", "-1"], "recipe field 'calib.samples' = -1"),
        (["--calib-samples", "0", "--scheme", "w_int8_per_channel_a_int8_per_tensor_static"],
         "calib.samples 0 quantizes without calibration samples, but this recipe needs them for static input scales"),
        (["--group-size", "0"], "recipe field 'group_size' = 0"),
        (["--calib", "nosuch"], "unknown corpus 'nosuch'; allowed: pydoc"),
        (["--calib", "/nonexistent/file.txt"], "corpus file /nonexistent/file.txt does not exist"),
        (["--calib", "pydoc+"], "corpus mixture 'pydoc+' has an empty or repeated part; allowed: distinct corpora"),
        (["--calib", "SHORT.txt"], "tokens, too short for windows of seqlen 32"),
        (["--seqlen", "1024", "--calib-samples", "2"], "seqlen 1024 exceeds the model's max_position_embeddings 256"),
        (["--calib", "wikitext2"], "dataset 'wikitext2' could not be loaded from the hub"),
        (["--set", "pre_opts.awq.alpha=1"], "--set pre_opts.awq: pre_opts has no entry named 'awq'; it has: none"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_user_errors_are_one_line(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    args = ["quantize", "--model", str(tiny_dir), "--output", str(tmp_path / "out"), "--no-eval", "--quiet"]
    if "SHORT.txt" in extra:
        (tmp_path / "SHORT.txt").write_text("too short")
        extra = ["--calib", str(tmp_path / "SHORT.txt"), "--seqlen", "32", "--calib-samples", "2"]
    with pytest.raises(SystemExit) if extra == ["--bogus"] else _no_exit():
        code = main([*args, *extra])
        assert code == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "out").exists()


class _no_exit:  # noqa: N801 - a tiny context manager used like pytest.raises
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_bad_recipe_field_names_the_field(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"scheme": "w_int8_per_channel", "calib": {"samples": "many"}, "colour": 1}))
    assert main(["quantize", "--model", str(tiny_dir), "--config", str(recipe), "--output", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert "recipe field 'calib.samples' = 'many'" in line and "recipe field 'colour'" in line


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("./no/such/dir", "model path ./no/such/dir does not exist"),
        ("/tmp/nothing.gguf", "model file /tmp/nothing.gguf does not exist"),
        ("nobody/no-such-model-xyz", "cannot load model 'nobody/no-such-model-xyz'"),
    ],
)
def test_missing_model_is_one_line(model: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", model]) == 2
    assert expected in _error_line(capsys)


def test_nan_activations_stop_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = write_tiny_checkpoint(tmp_path / "broken", nan=True)
    args = ["quantize", "--model", str(broken), "--output", str(tmp_path / "o"), "--no-eval", *SMALL]
    assert main(args) == 2
    assert "model.layers.0 produced NaN or inf activations" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_python_dash_m_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmquant", "quantize", "--scheme", "nope", "--output", str(tmp_path / "x")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown scheme 'nope'" in result.stderr


def test_layer_map_from_detect_gives_the_same_model_as_detection(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["detect", "--model", str(tiny_dir)]) == 0
    layer_map = tmp_path / "map.json"
    layer_map.write_text(capsys.readouterr().out)
    common = ["quantize", "--model", str(tiny_dir), "--no-eval", "--quiet", "--pre-opt", "smoothquant",
              "--alpha", "0.5", "--calib-samples", "4", "--seqlen", "32"]
    assert main([*common, "--output", str(tmp_path / "a")]) == 0
    assert main([*common, "--layer-map", str(layer_map), "--output", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    manifest = json.loads((tmp_path / "b" / "llmquant.json").read_text())
    assert {g["producer"] for g in manifest["results"]["smooth_groups"]} == {
        "input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj"}

    layer_map.write_text('{"groups": []}')
    assert main([*common, "--layer-map", str(layer_map), "--output", str(tmp_path / "c")]) == 2
    allowed = ("allowed: left_float_by_default, model_map, moe_layers, norms, not_smoothed, plan, recipe, "
               "rotation_plan, smooth_groups")
    assert f"unknown keys ['groups']; {allowed}" in _error_line(capsys)


def test_detect_prints_what_a_recipe_would_do_to_the_model(tiny_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """With --config (and --set) detect prints the recipe as it would run and its plan, one row a module and setting
    for all decoder layers (the tiny Llama has 2; groups of 128 fit down_proj's 128 inputs, the others' 64 take
    groups of 64); the printout still reads back as a --layer-map."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("scheme: w_int4_per_group_sym_a_uint4_per_token_asym_dynamic\ngroup_size: 32\n"
                      "kv_cache: int4_per_token_asym\noverrides:\n  - targets: ['re:.*o_proj']\n"
                      "    scheme: w_int8_per_channel_a_int8_per_token_dynamic\n")
    assert main(["detect", "--model", str(tiny_dir), "--config", str(recipe), "--set", "group_size=128",
                 "--set", "kv_cache_keep_first=1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["recipe"]["group_size"] == 128 and printed["recipe"]["kv_cache_keep_first"] == 1
    rows = {row["module"].removeprefix("model.layers.*."): row for row in printed["plan"]}
    assert [row["count"] for row in rows.values()] == [2] * 7 + [1, 2]
    assert rows["self_attn.q_proj"]["weights"] == "int4-sym-per-group64-static"
    assert rows["self_attn.q_proj"]["group_size_fallback"] == 64
    assert rows["mlp.down_proj"]["weights"] == "int4-sym-per-group128-static" and "group_size_fallback" not in rows[
        "mlp.down_proj"]
    assert rows["self_attn.o_proj"]["weights"] == "int8-sym-per-channel-static"
    assert rows["self_attn.o_proj"]["input"] == "int8-sym-per-token-dynamic"
    assert rows["lm_head"] == {"module": "lm_head", "weights": "float", "input": "float", "count": 1}
    assert rows["self_attn"] == {"module": "model.layers.*.self_attn", "kv_cache": "int4-asym-per-token-dynamic",
                                 "keep_first": 1, "count": 2}
    layer_map = tmp_path / "detected.json"
    layer_map.write_text(json.dumps(printed))
    assert main(["quantize", "--model", str(tiny_dir), "--layer-map", str(layer_map), "--calib-samples", "0",
                 "--no-eval", "--quiet", "--output", str(tmp_path / "out")]) == 0


def test_the_documented_subcommands_are_all_found() -> None:
    assert {"quantize", "eval", "sweep", "bench", "detect"} <= set(subcommands())


@pytest.mark.parametrize("command", ["", *subcommands()])
def test_help_of_llmquant_and_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"] if command else ["--help"])
    assert exited.value.code == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"usage: llmquant {command}".rstrip()) and "options:" in printed.out
    assert printed.err == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_of_every_installed_command(script: str, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Each [project.scripts] entry point of pyproject.toml, called as its console script is (`llmquant-lm-eval`
    runs lm-eval's command line with the llmquant model registered)."""
    module, _, function = SCRIPTS[script].partition(":")
    try:
        entry = getattr(importlib.import_module(module), function)
    except LlmquantError as err:  # lm-eval not installed: the adapter says so in one line
        pytest.skip(str(err))
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exited:
        entry()
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out

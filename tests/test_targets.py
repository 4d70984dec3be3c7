"""`quantize --target`: what vLLM and transformers cannot run is refused before any model work, what they
run differently is warned about, and the written checkpoint is loaded back as the target would."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmquant
from conftest import make_model
from llmquant.cli import main
from llmquant.errors import LlmquantError
from llmquant.export.targets import (
    check_recipe,
    check_target,
    smoke_check,
    transformers_linear_findings,
    vllm_linear_findings,
)
from llmquant.quant.scheme import Scheme
from llmquant.quant.spec import QuantSpec
from llmquant.recipe import Recipe
from llmquant.testing.tiny_checkpoint import write_tiny_checkpoint

SMALL = ["--calib-samples", "4", "--seqlen", "32", "--no-eval", "--quiet"]
W8A8 = "w_int8_per_channel_a_int8_per_token_dynamic"
QUAROT = [{"name": "quarot"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def _int8(granularity: str, dynamic: bool = False, symmetric: bool = True, group_size: int | None = None) -> QuantSpec:
    return QuantSpec(bits=8, granularity=granularity, dynamic=dynamic, symmetric=symmetric, group_size=group_size)


def _refusal(target: str, **fields: object) -> str:
    findings = check_recipe(target, Recipe.build(**fields))  # type: ignore[arg-type]
    assert findings and findings[0].refuse, findings
    return findings[0].message


def _warnings(target: str, **fields: object) -> list[str]:
    findings = check_recipe(target, Recipe.build(**fields))  # type: ignore[arg-type]
    assert not any(f.refuse for f in findings), findings
    return [f.message for f in findings]


# --- vLLM ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheme",
    ["w_int8_per_tensor_a_int8_per_tensor_static", "w_int8_per_channel_a_int8_per_tensor_static", W8A8],
)
def test_vllm_runs_w8a8_static_per_tensor_and_dynamic_per_token(scheme: str) -> None:
    assert check_recipe("vllm", Recipe.build(scheme=scheme)) == []


def test_vllm_refuses_dynamic_per_tensor_inputs() -> None:
    message = _refusal("vllm", scheme="w_int8_per_channel_a_int8_per_tensor_dynamic")
    assert "static per tensor or dynamic per token only" in message and "int8-sym-per-tensor-dynamic" in message


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (_int8("channel", symmetric=False), "symmetric weights only"),
        (_int8("group", group_size=64), "per tensor or per channel, not weights int8-sym-per-group64"),
    ],
    ids=["asymmetric", "grouped"],
)
def test_vllm_refuses_w8a8_weights_its_int8_kernels_do_not_take(weights: QuantSpec, expected: str) -> None:
    findings = vllm_linear_findings(Scheme(weights=weights, input_activations=_int8("token", dynamic=True)))
    assert len(findings) == 1 and findings[0].refuse and expected in findings[0].message


def test_vllm_takes_asymmetric_static_inputs() -> None:  # vLLM's azp path: only the weights must be symmetric
    scheme = Scheme(weights=_int8("channel"), input_activations=_int8("tensor", symmetric=False))
    assert vllm_linear_findings(scheme) == []


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        ("w_int8_per_channel", "llmquant writes 8-bit weights int-quantized"),
        ("w_int3_per_group_sym", "vLLM has no kernel for weight-only int3"),
    ],
)
def test_vllm_refuses_weight_only_int8_and_int3(scheme: str, expected: str) -> None:
    assert expected in _refusal("vllm", scheme=scheme)


@pytest.mark.parametrize("scheme", ["w_int4_per_group_sym", "w_uint4_per_group_asym"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_vllm_runs_w4_symmetric_or_with_zero_points(scheme: str, group_size: int) -> None:
    assert check_recipe("vllm", Recipe.build(scheme=scheme, group_size=group_size)) == []


def test_vllm_warns_about_group_sizes_gpu_marlin_does_not_take_and_refuses_odd_ones() -> None:
    [warning] = _warnings("vllm", scheme="w_int4_per_group_sym", group_size=16)
    assert "CPU kernel runs group size 16, its GPU Marlin kernels do not" in warning
    assert "needs an even group size" in _refusal("vllm", scheme="w_int4_per_group_sym", group_size=17)


@pytest.mark.parametrize("kv", ["int8_per_tensor", "int8_per_token"])
def test_vllm_refuses_int8_kv_caches_it_cannot_load(kv: str) -> None:
    message = _refusal("vllm", scheme=W8A8, kv_cache=kv)
    assert "loads only FP8 KV-cache schemes" in message and "--kv-cache-dtype fp8" in message


def test_overrides_are_checked_too() -> None:
    overrides = [{"targets": ["re:.*down_proj"], "scheme": "w_int8_per_channel_a_int8_per_tensor_dynamic"}]
    assert "dynamic per token only" in _refusal("vllm", scheme=W8A8, overrides=overrides)


# --- online rotations ----------------------------------------------------------------------------------
def test_transformers_refuses_online_rotations() -> None:
    message = _refusal("transformers", scheme=W8A8, pre_opts=QUAROT)
    assert "transformers cannot run the online rotations R3, R4" in message and "online_had: false" in message


def test_vllm_refuses_r3_and_runs_r4_to_r6_as_transforms() -> None:
    message = _refusal("vllm", scheme=W8A8, pre_opts=QUAROT)
    assert "vLLM cannot run the online rotation R3" in message and "rotations: [R1, R2, R4]" in message
    for rotations in (["R1", "R2", "R4"], ["R1", "R2", "R4", "R5"], ["R1", "R2", "R4", "R6"]):
        [warning] = _warnings("vllm", scheme=W8A8, pre_opts=[{"name": "quarot", "rotations": rotations}])
        assert f"vLLM runs the online rotations {', '.join(rotations[2:])} as dense input transforms" in warning


@pytest.mark.parametrize("target", ["vllm", "transformers"])
def test_offline_rotations_are_fine(target: str) -> None:
    for quarot in ({"name": "quarot", "online_had": False}, {"name": "quarot", "rotations": ["R1", "R2"]}):
        assert check_recipe(target, Recipe.build(scheme=W8A8, pre_opts=[quarot])) == []


def test_the_fake_target_takes_everything() -> None:
    recipe = Recipe.build(scheme="w_int8_per_channel_a_int8_per_tensor_dynamic", kv_cache="int8_per_token",
                          pre_opts=[{"name": "quarot", "rotations": ["R1", "R2", "R3", "R4", "R5"]}])
    assert check_recipe("fake", recipe) == []


# --- transformers --------------------------------------------------------------------------------------
def test_transformers_warns_about_asymmetric_packed_weights(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="llmquant"):
        check_target("transformers", Recipe.build(scheme="w_uint4_per_group_asym"))
    assert "CompressedTensorsConfig(dequantize=True)" in caplog.text
    assert transformers_linear_findings(Scheme(weights=QuantSpec(bits=4, granularity="group", group_size=32))) == []


@pytest.mark.parametrize("kv", ["int8_per_tensor", "int8_per_token"])
def test_transformers_runs_w8a8_with_int8_kv_caches(kv: str) -> None:  # compressed-tensors applies the KV scheme
    assert check_recipe("transformers", Recipe.build(scheme=W8A8, kv_cache=kv)) == []


# --- the command line ----------------------------------------------------------------------------------
def test_refusal_comes_before_any_model_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scheme = "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_static"
    args = ["quantize", "--model", "/nonexistent/model", "--scheme", scheme, "--target", "vllm"]
    assert main([*args, "--output", str(tmp_path / "q"), *SMALL]) == 2  # the model path is never looked at
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmquant: error: --target vllm: vLLM loads only FP8 KV-cache")
    assert not (tmp_path / "q").exists()


def test_unknown_target_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "--target", "tgi", "--output", "x"])
    assert exit_.value.code == 2 and "argument --target: invalid choice: 'tgi'" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["transformers", "fake"])
def test_quantize_loads_the_w8a8_checkpoint_back(
    tiny_dir: Path, tmp_path: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--scheme", W8A8, "--target", target, "--output", str(out),
                 *SMALL]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"round trip ({target}): loaded, generated [") and "finite logits" in last
    assert len(json.loads(last.split("generated ")[1].split("]")[0] + "]")) == 4


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: it really loads")
def test_vllm_round_trip_is_skipped_without_vllm(tiny_dir: Path, tmp_path: Path) -> None:
    model = make_model("llama")
    llmquant.quantize(model, W8A8, calib=torch.randint(0, 128, (2, 16)), progress=False)
    result = smoke_check("vllm", llmquant.save(model, None, tmp_path / "ckpt"))
    assert result is not None and result.skipped.startswith("vLLM is not installed")


# --- the round trip itself ----------------------------------------------------------------------------
@pytest.fixture
def w8a8_dir(tmp_path: Path, calib_ids: torch.Tensor) -> Path:
    model = make_model("llama")
    llmquant.quantize(model, W8A8, calib=calib_ids, progress=False)
    return llmquant.save(model, None, tmp_path / "ckpt")


@pytest.mark.parametrize("target", ["transformers", "fake"])
def test_non_finite_logits_after_reload_are_one_error(w8a8_dir: Path, target: str) -> None:
    weights = w8a8_dir / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.down_proj.weight_scale"][0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(LlmquantError, match=r"^the reloaded checkpoint produced NaN or inf logits$"):
        smoke_check(target, w8a8_dir)


def test_transformers_reloads_asymmetric_w4_by_dequantizing(tmp_path: Path, calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    llmquant.quantize(model, {"scheme": "w_uint4_per_group_asym", "group_size": 32}, calib=calib_ids, progress=False)
    result = smoke_check("transformers", llmquant.save(model, None, tmp_path / "ckpt"), new_tokens=3)
    assert result is not None and len(result.tokens) == 3


def test_a_checkpoint_with_online_rotations_is_refused_after_export(tmp_path: Path, calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    llmquant.quantize(model, {"scheme": W8A8, "pre_opts": QUAROT}, calib=calib_ids, progress=False)
    directory = llmquant.save(model, None, tmp_path / "ckpt")
    with pytest.raises(LlmquantError, match=r"needs llmquant's loader .*input_rotations.*qk_rotations"):
        smoke_check("transformers", directory)
    with pytest.raises(LlmquantError, match=r"needs llmquant's loader \(llmquant_structure: qk_rotations\)"):
        smoke_check("vllm", directory)  # (vLLM reads R4 from the transform_config, not R3)
    assert smoke_check("fake", directory) is not None  # llmquant's loader rebuilds them


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: it really loads")
def test_r4_passes_the_vllm_structure_check(tmp_path: Path, calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    recipe = {"scheme": W8A8, "pre_opts": [{"name": "quarot", "rotations": ["R1", "R2", "R4"]}]}
    llmquant.quantize(model, recipe, calib=calib_ids, progress=False)
    result = smoke_check("vllm", llmquant.save(model, None, tmp_path / "ckpt"))
    assert result is not None and result.skipped.startswith("vLLM is not installed")

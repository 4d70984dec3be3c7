"""The device and dtype policy: every algorithm where the policy says, the int8 runtime there, bf16 checkpoints,
and (with a GPU) the GPU and the CPU agreeing. Parametrized over the devices present (`conftest.DEVICES`): the CPU
always, CUDA where there is one, so CI (no GPU) runs the CPU half."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llmquant
from conftest import DEVICES, VOCAB, logits, make_model, relative_error
from llmquant.cli import main
from llmquant.device import DevicePolicy, resolve_device, resolve_dtype
from llmquant.errors import LlmquantError
from llmquant.evaluation.perplexity import perplexity
from llmquant.nn.int8_linear import CUDA_INT_MM_MIN_ROWS, int8_matmul
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.pipeline.memory import activation_storage

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RECIPES = {
    "rtn-w8a8-static-kv": {"scheme": "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_static"},
    "smoothquant-auto+gptq": {"scheme": "w_int8_per_channel_a_int8_per_tensor_static", "algorithm": "gptq",
                              "pre_opts": [{"name": "smoothquant", "alpha": "auto"}]},
    "awq-w4": {"scheme": "w_uint4_per_group_asym", "group_size": 32, "algorithm": "awq"},
    "gptq-w4-float-hessians": {"scheme": "w_int4_per_group_sym", "group_size": 32, "algorithm": "gptq",
                               "gptq": {"true_sequential": False}},
    "quarot+gptq-w8a8-kv": {"scheme": "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic",
                            "algorithm": "gptq", "pre_opts": [{"name": "quarot"}]},
}


def quantized(recipe: dict, calib_ids: torch.Tensor, device: str, **options: object) -> torch.nn.Module:
    """The tiny Llama quantized on ``device``; ``dtype=...`` among the options casts it first (the policy's)."""
    return llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False, device=device, **options)


def quantized_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() if isinstance(m, QuantLinear) for t in (*m.buffers(), *m.parameters())]


# --- the policy's words -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("device", "dtype", "offload", "message"), [
    ("tpu", "auto", "layers", "allowed: auto, cpu, cuda, cuda:N"),
    ("cpu", "int4", "layers", "unknown dtype 'int4'; allowed: auto, float32, bfloat16, float16"),
    ("cpu", "auto", "disk", "unknown offload 'disk'; allowed: layers, none"),
])
def test_unknown_words_are_one_line_errors(device: str, dtype: str, offload: str, message: str) -> None:
    with pytest.raises(LlmquantError, match=message):
        DevicePolicy.resolve(device, dtype, offload)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["quantize", "eval", "bench", "sweep"])
def test_cuda_without_a_gpu_is_one_line_and_exit_code_2(command: str, tiny_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    output = ["--output", str(tmp_path / "out")] if command in ("quantize", "sweep") else []
    model = ["--model", str(tiny_dir)] if command != "bench" else ["--model", str(tiny_dir), "--baseline",
                                                                    str(tiny_dir)]
    assert main([command, *model, "--device", "cuda", *output]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU is available" in err


def test_auto_follows_llmquant_device_and_dtypes_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQUANT_DEVICE", "cpu")
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_dtype("auto") is None and resolve_dtype("bfloat16") is torch.bfloat16


def test_under_torchrun_auto_and_cuda_mean_the_process_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMQUANT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)  # a device named by its number stays


# --- every algorithm where the policy says -----------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(RECIPES))
def test_every_algorithm_quantizes_on_the_device_and_the_layers_come_back(
    name: str, device: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor
) -> None:
    model = quantized(RECIPES[name], calib_ids, device)
    manifest = model.llmquant_manifest
    assert manifest.results["placement"]["device"].startswith(device)
    assert all(t.device.type == "cpu" for t in model.parameters())  # each layer went back where it rested
    assert all(t.device.type == "cpu" for t in quantized_tensors(model))
    assert (manifest.results["peak_gpu_mb"] is not None) == (device == "cuda")
    reference = quantized(RECIPES[name], calib_ids, "cpu")
    if device == "cpu":
        assert torch.equal(logits(reference, eval_ids), logits(model, eval_ids))
    else:  # float rounding apart, which can move a searched choice (AWQ's ratio): as close to the float model
        float_logits = logits(make_model("llama"), eval_ids)
        here, there = (relative_error(float_logits, logits(m, eval_ids)) for m in (model, reference))
        assert here == pytest.approx(there, rel=0.25)


@pytest.mark.parametrize("device", DEVICES)
def test_offload_none_keeps_the_whole_model_on_the_device(device: str, calib_ids: torch.Tensor) -> None:
    model = quantized(RECIPES["gptq-w4-float-hessians"], calib_ids, device, offload="none")
    assert {t.device.type for t in (*model.parameters(), *quantized_tensors(model))} == {device}


@pytest.mark.parametrize("device", DEVICES)
def test_the_int8_runtime_computes_the_simulation_on_the_device(device: str, calib_ids: torch.Tensor,
                                                              eval_ids: torch.Tensor) -> None:
    model = quantized(RECIPES["rtn-w8a8-static-kv"], calib_ids, device, offload="none")
    assert set_runtime(model, "int8") == 7 * 2 + 2
    stored = logits(model, eval_ids)
    with torch.no_grad():  # batch 1, one new token at a time: fewer rows than CUDA's _int_mm takes (padded)
        generated = model.generate(eval_ids[:1, :8].to(device), max_new_tokens=4, do_sample=False)
    set_runtime(model, "fake")
    assert torch.equal(stored, logits(model, eval_ids))
    with torch.no_grad():
        assert torch.equal(generated, model.generate(eval_ids[:1, :8].to(device), max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, CUDA_INT_MM_MIN_ROWS - 1, 40])
def test_int8_products_of_any_row_count_are_exact(device: str, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randint(-128, 128, (rows, 64), generator=generator, dtype=torch.int8)
    w = torch.randint(-128, 128, (48, 64), generator=generator, dtype=torch.int8)
    product = int8_matmul(x.to(device), w.to(device)).cpu()
    assert product.shape == (rows, 48) and torch.equal(product, (x.long() @ w.long().T).int())


@pytest.mark.parametrize("device", DEVICES)
def test_batched_perplexity_is_the_perplexity_of_one_window_at_a_time(device: str) -> None:
    model = make_model("llama").to(device)
    windows = torch.randint(0, VOCAB, (5, 24), generator=torch.Generator().manual_seed(3))
    assert perplexity(model, windows, batch=3) == pytest.approx(perplexity(model, windows, batch=1), rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_model_gives_a_bf16_checkpoint_that_loads_to_the_same_logits(
    device: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = quantized(RECIPES["quarot+gptq-w8a8-kv"], calib_ids, device, dtype=torch.bfloat16)
    rotation = model.llmquant_manifest.results["rotation"]["equivalence_error"]
    assert 0 < rotation["layers_max"] < 1.6e-2  # bf16 rounding of the rotated weights, within its tolerance
    llmquant.save(model, None, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake", device="cpu")
    floats = [p for n, p in loaded.named_parameters() if "bias" in n or "norm" in n or "embed" in n]
    assert floats and all(p.dtype == torch.bfloat16 for p in floats)
    assert torch.equal(logits(loaded, eval_ids), logits(model, eval_ids))


@pytest.mark.parametrize("device", DEVICES)
def test_activations_wait_on_the_device_while_they_fit(device: str, calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    policy = DevicePolicy.resolve(device)
    where = activation_storage("memory", policy, model, calib_ids).where
    assert where == ("device" if device == "cuda" else "memory")
    if device == "cuda":
        squeezed = DevicePolicy.resolve(device, max_gpu_memory=0)
        assert activation_storage("memory", squeezed, model, calib_ids).where == "pinned"
        pinned = quantized(RECIPES["awq-w4"], calib_ids, device, max_gpu_memory=0)
        on_device = quantized(RECIPES["awq-w4"], calib_ids, device)
        assert pinned.llmquant_manifest.results["activations"] == "pinned"
        for a, b in zip(quantized_tensors(pinned), quantized_tensors(on_device), strict=True):
            assert torch.equal(a, b)


# --- the GPU and the CPU agree (with a GPU) ------------------------------------------------------------------
@cuda_only
@pytest.mark.parametrize("scheme", ["w_int8_per_channel_a_int8_per_token_dynamic", "w_uint4_per_group_asym"])
def test_round_to_nearest_gives_the_cpu_codes_on_the_gpu(scheme: str, calib_ids: torch.Tensor) -> None:
    recipe = {"scheme": scheme, "group_size": 32}
    on_gpu, on_cpu = quantized(recipe, calib_ids, "cuda"), quantized(recipe, calib_ids, "cpu")
    for (name, a), b in zip(
        ((n, m) for n, m in on_gpu.named_modules() if isinstance(m, QuantLinear)),
        (m for m in on_cpu.modules() if isinstance(m, QuantLinear)), strict=True,
    ):
        assert torch.equal(a.codes(), b.codes()), name
        # CUDA divides by a Python number as a product with its reciprocal: scales may differ in the last bit
        torch.testing.assert_close(a.weight_scale, b.weight_scale, rtol=2e-7, atol=0)


@cuda_only
def test_gptq_perplexity_on_the_gpu_is_within_half_a_percent_of_the_cpu_one(calib_ids: torch.Tensor) -> None:
    recipe = {"scheme": "w_int4_per_group_sym", "group_size": 32, "algorithm": "gptq"}
    windows = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(4))
    on_gpu, on_cpu = quantized(recipe, calib_ids, "cuda"), quantized(recipe, calib_ids, "cpu")
    assert perplexity(on_gpu, windows) == pytest.approx(perplexity(on_cpu, windows), rel=5e-3)


def test_working_memory_is_what_the_cpu_cap_leaves_and_never_more_than_the_system_has() -> None:
    from llmquant.device import available_memory_bytes, resident_bytes

    assert DevicePolicy().working_memory() == pytest.approx(0.9 * available_memory_bytes(), rel=0.05)
    left = DevicePolicy(max_memory=resident_bytes() + 64 * 2**20).working_memory()
    assert 48 * 2**20 < left <= 64 * 2**20
    assert DevicePolicy(max_memory=1).working_memory() == 0  # below what is resident already: nothing left
    with pytest.raises(LlmquantError, match="max_memory must be a size"):
        DevicePolicy.resolve("cpu", max_memory=-1)

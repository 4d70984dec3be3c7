"""Save and load: compressed-tensors layout, identical logits after the round trip, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmquant
from conftest import logits, make_model
from llmquant.export import checkpoint
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.quant_linear import QuantLinear, set_runtime
from llmquant.quant import QuantSpec

ROUND_TRIP = [
    "w_int8_per_tensor_a_int8_per_tensor_kv_cache_int8_per_tensor_static",
    "w_int8_per_channel_a_int8_per_tensor_dynamic",
    "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic",
    "w_uint4_per_group_asym",
    "w_int8_per_group_sym",
]


@pytest.mark.parametrize("runtime", ["fake", "int8"])
@pytest.mark.parametrize("scheme", ROUND_TRIP)
def test_round_trip_gives_identical_logits(
    family: str, scheme: str, runtime: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = make_model(family)
    llmquant.quantize(model, {"scheme": scheme, "group_size": 32}, calib=calib_ids, progress=False)
    llmquant.save(model, None, tmp_path / "ckpt")
    set_runtime(model, runtime)
    before = logits(model, eval_ids)
    loaded, tokenizer = llmquant.load(tmp_path / "ckpt", runtime=runtime)
    assert tokenizer is None
    assert torch.equal(before, logits(loaded, eval_ids))
    assert any(isinstance(m, KVCacheQuantizer) for m in loaded.modules()) == ("kv_cache" in scheme)


def test_checkpoint_follows_the_compressed_tensors_layout(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = make_model("llama")
    scheme = "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_static"
    llmquant.quantize(model, scheme, calib=calib_ids, progress=False)
    llmquant.save(model, None, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and config["ignore"] == ["lm_head"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    assert group["input_activations"] == {**group["input_activations"], "strategy": "tensor", "dynamic": False}
    assert config["kv_cache_scheme"]["strategy"] == "tensor"
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    prefix = "model.layers.0."
    assert tensors[prefix + "mlp.down_proj.weight"].dtype == torch.int8
    assert tensors[prefix + "mlp.down_proj.weight_scale"].shape == (64, 1)
    assert tensors[prefix + "mlp.down_proj.input_scale"].shape == (1,)
    assert tensors[prefix + "self_attn.k_scale"].shape == (1,)
    assert "lm_head.weight" not in tensors  # tied to the embeddings, stored once
    manifest = json.loads((tmp_path / "ckpt" / "llmquant.json").read_text())
    assert manifest["recipe"]["scheme"] == scheme


def test_asymmetric_8_bit_codes_are_stored_signed_and_read_back(calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                                                                 tmp_path: Path) -> None:
    """8-bit asymmetric codes in [0, 255] (uint8 in memory) are stored as q - 128 in int8, as
    compressed-tensors expects; 4-bit ones are checked packed in test_w4_checkpoint.py."""
    model = make_model("llama")
    spec = QuantSpec(bits=8, symmetric=False, granularity="channel")
    layer = model.model.layers[0].mlp.up_proj
    quantized = QuantLinear.from_linear(layer, spec, None)
    assert quantized.codes().dtype == torch.uint8 and int(quantized.codes().max()) > 127
    error = (quantized.dequantized_weight() - layer.weight.detach()).abs().max()
    assert float(error) < float(quantized.weight_scale.max())
    model.model.layers[0].mlp.up_proj = quantized
    reference = logits(model, eval_ids)
    llmquant.save(model, None, tmp_path / "ckpt")
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert stored.dtype == torch.int8 and torch.equal(stored.to(torch.int32) + 128, quantized.codes().to(torch.int32))
    loaded, _ = llmquant.load(tmp_path / "ckpt")
    assert torch.equal(logits(loaded, eval_ids), reference)


def test_interrupted_save_leaves_nothing_at_the_destination(
    calib_ids: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model("llama")
    llmquant.quantize(model, "w_int8_per_channel_a_int8_per_token_dynamic", calib=calib_ids, progress=False)

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llmquant.save(model, None, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_saving_over_an_existing_checkpoint_replaces_only_its_files(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    """A directory llmquant did not write is refused; its own checkpoint is replaced with overwrite=True,
    and a file the user put beside it stays (tests/test_output_dir.py has every case)."""
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    model = make_model("llama")
    llmquant.quantize(model, "w_int8_per_channel", calib=calib_ids, progress=False)
    with pytest.raises(llmquant.LlmquantError, match="holds files but no llmquant checkpoint"):
        llmquant.save(model, None, target)
    (target / "notes.txt").unlink()
    llmquant.save(model, None, target)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(llmquant.LlmquantError, match="pass --overwrite to replace it"):
        llmquant.save(model, None, target)
    llmquant.save(model, None, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine" and (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("scheme", llmquant.W8A8_SCHEMES)
def test_int8_runtime_agrees_with_the_simulation(
    scheme: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = make_model("qwen2")
    llmquant.quantize(model, scheme, calib=calib_ids, progress=False)
    simulated = logits(model, eval_ids)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="int8")
    runtimes = {m.runtime for m in loaded.modules() if type(m).__name__ == "QuantLinear"}
    assert runtimes == {"int8"}
    # the simulation computes the same integer products (exact in float32) and applies the scales alike
    assert torch.equal(simulated, logits(loaded, eval_ids))


@pytest.mark.parametrize("scheme", ["w_int4_per_group_sym", "w_int3_per_group_sym"])
def test_int8_runtime_runs_w4_and_w3_on_the_int4_kernel(scheme: str, calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = make_model("llama")
    llmquant.quantize(model, {"scheme": scheme, "group_size": 32}, calib=calib_ids, progress=False)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="int8")
    assert {m.runtime for m in loaded.modules() if type(m).__name__ == "QuantLinear"} == {"int8"}
    with pytest.raises(llmquant.LlmquantError, match="unknown runtime 'int4'; allowed: fake, int8"):
        llmquant.load(tmp_path / "ckpt", runtime="int4")

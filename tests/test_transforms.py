"""Online input rotations (R4 before down_proj, R5 before o_proj, R6 before the readers of a norm) written as
compressed-tensors' transform_config with their matrices, as vLLM reads them: x -> x (W / sqrt(n)) before the Linear
must be llmquant's x -> x Q."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from compressed_tensors.transform import TransformConfig
from safetensors import safe_open

import llmquant
from conftest import logits, make_model
from llmquant.export.transforms import transform_group
from llmquant.nn.online_rotation import input_rotation_of
from llmquant.quant.rotation import Rotation

W8A8 = "w_int8_per_channel_a_int8_per_token_dynamic"


def test_r4_and_r5_are_written_as_vllm_reads_them(calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                                                   tmp_path: Path) -> None:
    recipe = {"scheme": W8A8, "pre_opts": [{"name": "quarot", "rotations": ["R1", "R2", "R4", "R5"]}]}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    llmquant.save(model, None, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    transforms = TransformConfig.model_validate(config["transform_config"])  # as vLLM reads it
    layers = range(model.config.num_hidden_layers)
    expected = {"hadamard_128": [f"model.layers.{i}.mlp.down_proj" for i in layers],  # intermediate size 128
                "hadamard_64": [f"model.layers.{i}.self_attn.o_proj" for i in layers]}  # hidden size 64
    assert {name: group.apply[0].targets for name, group in transforms.config_groups.items()} == expected
    for group in transforms.config_groups.values():
        [args] = group.apply
        assert args.location == "input" and not args.inverse and group.type == "random-hadamard"
    x = torch.randn(5, 128, dtype=torch.float64)
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as stored:
        keys = sorted(key for key in stored.keys() if key.endswith("_input.weight"))  # noqa: SIM118 - no __iter__
        # one matrix a group, on its first Linear: vLLM shares it between the group's Linears
        assert keys == ["model.layers.0.mlp.down_proj.hadamard_128_input.weight",
                        "model.layers.0.self_attn.o_proj.hadamard_64_input.weight"]
        for key in keys:
            matrix = stored.get_tensor(key)
            n = matrix.shape[0]
            assert matrix.dtype == torch.float32 and set(matrix.unique().tolist()) == {-1.0, 1.0}
            for i in layers:  # every Linear of the group rotates by that matrix
                linear = key.replace("model.layers.0.", f"model.layers.{i}.").rsplit(".", 2)[0]
                rotation = input_rotation_of(model.get_submodule(linear))
                vllm_input = x[:, :n] @ (matrix.double() / math.sqrt(n))  # vLLM: divided by sqrt(n) once, x W
                assert torch.allclose(vllm_input, rotation.apply(x[:, :n]), atol=1e-12)
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake")  # the rotations rebuilt, the matrices left aside
    assert torch.equal(logits(loaded, eval_ids), logits(model, eval_ids))


def test_r6_before_every_reader_of_a_norm_is_written_and_round_trips(calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                                                                       tmp_path: Path) -> None:
    recipe = {"scheme": W8A8, "pre_opts": [{"name": "quarot", "rotations": ["R2", "R4", "R6"]},
                                           {"name": "smoothquant", "alpha": 0.5}]}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    llmquant.save(model, None, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    groups = TransformConfig.model_validate(config["transform_config"]).config_groups
    readers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    expected = sorted(f"model.layers.{i}.{name}" for i in range(model.config.num_hidden_layers) for name in readers)
    assert sorted(groups["hadamard_64"].apply[0].targets) == expected
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake")
    assert torch.equal(logits(loaded, eval_ids), logits(model, eval_ids))


def test_groups_are_named_by_what_the_rotation_is() -> None:
    assert transform_group(Rotation(1536)) == "hadamard_1536"
    assert transform_group(Rotation(64, randomize=True, seed=3)) == "hadamard_64_seed3"
    assert transform_group(Rotation(64, "random", seed=1)) == "random_64_seed1"
    assert transform_group(Rotation(64, randomize=True, seed=3)) != transform_group(Rotation(64, randomize=True))


def test_a_model_without_online_rotations_has_no_transform_config(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    recipe = {"scheme": W8A8, "pre_opts": [{"name": "quarot", "rotations": ["R1", "R2"]}]}
    llmquant.save(llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False), None, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert "transform_config" not in config
    with safe_open(tmp_path / "c" / "model.safetensors", "pt") as stored:
        keys = stored.keys()
        assert keys and not any("_input.weight" in key for key in keys)

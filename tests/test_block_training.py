"""Each layer's quantized weights trained against its float output (EfficientQAT's Block-AP): training that lowers the
layer's held-out output error and moves codes by one at most, the held-out check that turns a worse layer back bit for
bit, a recipe whose layers come out closer to the float ones and whose checkpoint gives the same logits, and bad
recipes and runs as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import llmquant
from conftest import DEVICES, VOCAB, logits, make_model
from llmquant.algorithms.block_training import (
    BlockTrainingConfig,
    SampleSplit,
    relative_output_error,
    split_rows,
    state_bytes,
    train_block,
)
from llmquant.algorithms.scale_training import trainable_layers
from llmquant.cli import _recipe_from_args, build_parser
from llmquant.device import DevicePolicy, resident_bytes, to_device
from llmquant.errors import LlmquantError
from llmquant.model.model_map import detect_model_map
from llmquant.parallel import Ranks
from llmquant.pipeline import quantize as run_pipeline
from llmquant.pipeline.layer_io import capture_layer_inputs, run_layer
from llmquant.quant.primitives import grid_steps

W4A4KV4 = {"scheme": "w_int4_per_channel_sym_a_uint4_per_token_asym_dynamic", "kv_cache": "int4_per_token_asym",
           "algorithm": "gptq", "pre_opts": [{"name": "quarot", "rotations": ["R2", "R3", "R4"]}],
           "calib": {"samples": 12, "seqlen": 32}}


@pytest.fixture(scope="module")
def calib12() -> torch.Tensor:
    return torch.randint(0, VOCAB, (12, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def calib24() -> torch.Tensor:
    return torch.randint(0, VOCAB, (24, 32), generator=torch.Generator().manual_seed(3))


def first_layer(calib: torch.Tensor, device: str = "cpu",
                scheme: dict | None = None) -> tuple[torch.nn.Module, object, list[torch.Tensor]]:
    """The tiny Llama's first decoder layer quantized W4A4KV4 (or ``scheme``) by round to nearest (its float outputs
    on ``calib`` taken before), on ``device``, a function giving sample i's inputs there, and those float outputs."""
    model = make_model("llama")
    inputs = capture_layer_inputs(model, detect_model_map(model), calib)
    layer = model.model.layers[0]
    targets = run_layer(layer, inputs, "layer 0", batch=1)
    llmquant.quantize(model, {**W4A4KV4, **(scheme or {}), "algorithm": "rtn", "pre_opts": []}, calib=calib,
                      progress=False)
    on = torch.device(device)
    return layer.to(on), lambda i: (inputs.hidden[i].to(on), to_device(inputs.kwargs[i], on)), targets


def codes(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: linear.codes().clone() for name, linear in trainable_layers(layer).items()}


def test_training_lowers_the_held_out_error_and_moves_codes_by_one_at_most(calib24: torch.Tensor) -> None:
    """Four passes over 16 samples, 8 held out: the held-out error of the layer's output falls (0.1341 -> 0.1180 on an
    AMX Xeon, against 0.1231 with the scales alone); only the scales and the codes change, no code by more than one,
    and the offsets are gone."""
    layer, sample, targets = first_layer(calib24)
    before_state = {k: v.clone() for k, v in layer.state_dict().items()}
    start = codes(layer)
    result = train_block(layer, sample, targets, BlockTrainingConfig(epochs=4, lr=1e-2, codes_lr=5e-2, holdout=8))
    assert result.kept and result.steps == 64 and result.held_out_after < 0.92 * result.held_out_before
    assert result.held_out_after == pytest.approx(relative_output_error(layer, sample, targets, range(16, 24)))
    changed = {k for k, v in layer.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed and all(k.endswith(("weight_scale", "weight_packed")) for k in changed)
    after = codes(layer)
    assert result.codes_changed == sum(int((after[n] != c).sum()) for n, c in start.items()) > 0
    assert all(int((after[n].int() - c.int()).abs().max()) <= 1 for n, c in start.items())
    assert all(linear.code_offsets is None for linear in trainable_layers(layer).values())
    assert result.describe()["kept"] and result.describe()["codes_changed"] == result.codes_changed


def test_fp8_codes_train_by_one_step_of_their_e4m3_grid_at_most(calib24: torch.Tensor) -> None:
    """FP8 W8A8 with an FP8 KV cache: the codes train as offsets in steps of their E4M3 grid; the held-out error falls
    below what the scales alone reach, and no code moves by more than one step of its binade (`grid_steps`)."""
    fp8 = {"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "kv_cache": "fp8_per_tensor"}
    errors = {}
    for codes_lr in (0.0, 5e-2):
        layer, sample, targets = first_layer(calib24, scheme=fp8)
        start = codes(layer)
        result = train_block(layer, sample, targets, BlockTrainingConfig(epochs=4, lr=1e-2, codes_lr=codes_lr,
                                                                          holdout=8))
        errors[codes_lr] = result.held_out_after
    assert result.kept and result.codes_changed > 0 and errors[5e-2] < errors[0.0]
    linears = trainable_layers(layer)
    assert all(linears[n].codes().dtype == torch.float8_e4m3fn for n in start)
    assert all(((codes(layer)[n].float() - c.float()).abs() <= grid_steps(c.float(), linears[n].weight_spec)).all()
               for n, c in start.items())


def test_without_a_codes_step_only_the_scales_train(calib24: torch.Tensor) -> None:
    layer, sample, targets = first_layer(calib24)
    start = codes(layer)
    result = train_block(layer, sample, targets, BlockTrainingConfig(epochs=4, lr=1e-2, codes_lr=0.0, holdout=8))
    assert result.kept and result.codes_changed == 0 and result.held_out_after < result.held_out_before
    assert all(torch.equal(codes(layer)[n], c) for n, c in start.items())


@pytest.mark.parametrize("device", DEVICES)
def test_a_layer_trains_on_its_device_as_on_the_cpu(calib24: torch.Tensor, device: str) -> None:
    """The same training on ``device`` (a GPU where there is one; on the CPU, run twice: deterministic) ends at the
    same held-out error within 1e-3, relative."""
    results = {}
    for where in ("cpu", device):
        layer, sample, targets = first_layer(calib24, where)
        results[where] = train_block(layer, sample, targets, BlockTrainingConfig(epochs=2, holdout=8))
    assert results[device].held_out_after == pytest.approx(results["cpu"].held_out_after, rel=1e-3)
    assert results[device].held_out_before == pytest.approx(results["cpu"].held_out_before, rel=1e-3)


def test_the_held_out_check_turns_a_worse_layer_back(calib12: torch.Tensor) -> None:
    """Steps far too large (each scale moved by up to e^1, each code by one, a step) make the held-out error worse:
    the layer's scales and codes stay bit for bit."""
    layer, sample, targets = first_layer(calib12)
    before_state = {k: v.clone() for k, v in layer.state_dict().items()}
    result = train_block(layer, sample, targets, BlockTrainingConfig(epochs=1, lr=1.0, codes_lr=1.0, holdout=4))
    assert not result.kept and result.held_out_after > result.held_out_before
    assert all(torch.equal(v, before_state[k]) for k, v in layer.state_dict().items())


def test_a_recipe_trains_each_layer_closer_to_its_float_output(calib24: torch.Tensor, tmp_path: Path,
                                                               eval_ids: torch.Tensor) -> None:
    """With ``block_training`` the first layer's output error (the manifest's, over all 24 samples) falls below GPTQ's
    alone (0.1129 -> 0.1022 on an AMX Xeon), and so does the sum over both layers (0.2029 -> 0.1951: the second
    layer's held-out check turned its training back); each layer's record is in the manifest, and the saved checkpoint
    gives the same logits."""
    calibrated = {**W4A4KV4, "calib": {"samples": 24, "seqlen": 32}}
    plain = llmquant.quantize(make_model("llama"), calibrated, calib=calib24, progress=False)
    recipe = {**calibrated, "block_training": {"epochs": 4, "lr": 1e-2, "codes_lr": 5e-2, "holdout": 8,
                                               "target": "layer"}}  # (the manifest's output error is against it)
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib24, progress=False)
    rows, plain_rows = model.llmquant_manifest.layers, plain.llmquant_manifest.layers
    assert all(row["block_training"]["steps"] == 64 for row in rows) and rows[0]["block_training"]["kept"]
    summary = model.llmquant_manifest.results["block_training"]
    assert summary["layers"] == 2 and summary["kept"] == sum(row["block_training"]["kept"] for row in rows) >= 1
    assert summary["codes_changed"] == sum(r["block_training"]["codes_changed"] for r in rows
                                           if r["block_training"]["kept"])
    assert rows[0]["output_error"] < plain_rows[0]["output_error"]
    assert sum(r["output_error"] for r in rows) < sum(r["output_error"] for r in plain_rows)
    assert "block training" in llmquant.Recipe.build(**recipe).learns_from_samples()
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake")
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))
    written = json.loads((tmp_path / "ckpt" / "llmquant.json").read_text())
    assert written["recipe"]["block_training"] == {"epochs": 4.0, "lr": 0.01, "codes_lr": 0.05, "holdout": 8,
                                                   "target": "layer"}


def test_aimed_at_the_float_model_a_layer_sees_the_error_of_the_layers_before(calib24: torch.Tensor) -> None:
    """``target: model``: the first layer's inputs are the float model's, so its training is the same as with
    ``layer``; the second layer's targets are the float model's own outputs, which its quantized inputs are already
    away from, so its error before training is larger than against the float layer on the same inputs (0.161 against
    0.100 on an AMX Xeon)."""
    calibrated = {**W4A4KV4, "calib": {"samples": 24, "seqlen": 32}}
    rows = {}
    for target in ("layer", "model"):
        recipe = {**calibrated, "block_training": {"epochs": 1, "lr": 1e-2, "codes_lr": 5e-2, "holdout": 8,
                                                   "target": target}}
        model = llmquant.quantize(make_model("llama"), recipe, calib=calib24, progress=False)
        rows[target] = [row["block_training"] for row in model.llmquant_manifest.layers]
    assert rows["model"][0] == {**rows["layer"][0], "seconds": rows["model"][0]["seconds"]}
    assert rows["model"][1]["held_out_error_before"] > 1.2 * rows["layer"][1]["held_out_error_before"]


def test_a_layer_left_float_trains_nothing(calib24: torch.Tensor) -> None:
    recipe = {**W4A4KV4, "calib": {"samples": 24, "seqlen": 32}, "block_training": {"epochs": 1, "holdout": 8},
              "overrides": [{"targets": ["re:model\\.layers\\.1\\..*"], "scheme": "none"}]}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib24, progress=False)
    rows = model.llmquant_manifest.layers
    assert "block_training" in rows[0] and "block_training" not in rows[1]
    assert model.llmquant_manifest.results["block_training"]["layers"] == 1


@pytest.mark.parametrize(("recipe", "message"), [
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "calib": {"samples": 4}, "block_training": {}},
     "block_training.holdout 8 leaves none of the 4 calibration samples to train on; allowed: 0 to 3"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "calib": {"samples": 8}, "clip_search": {"samples": 4},
      "block_training": {"holdout": 4}},
     "block_training.holdout 4 leaves none of the 4 calibration samples the clip search leaves to train on; allowed: "
     "0 to 3"),
    ({"scheme": "none", "block_training": {}}, r"block_training trains the scales of quantized weights, but the "
                                               r"recipe's schemes \(none\) quantize no weight"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "block_training": {"lr": 0}},
     "recipe field 'block_training.lr' = 0: Input should be greater than 0"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "block_training": {"target": "logits"}},
     "recipe field 'block_training.target' = 'logits': Input should be 'layer' or 'model'"),
])
def test_bad_block_training_recipes_are_one_line_errors(recipe: dict, message: str) -> None:
    with pytest.raises(LlmquantError, match=message) as error:
        llmquant.Recipe.build(**recipe)
    assert "\n" not in str(error.value)


def test_the_train_blocks_flag_reaches_the_recipe() -> None:
    args = build_parser().parse_args(["quantize", "--scheme", "w_int4_per_group_sym", "--group-size", "32",
                                      "--algo", "gptq", "--train-blocks", "2", "--output", "unused"])
    assert _recipe_from_args(args).block_training.config() == BlockTrainingConfig(epochs=2.0)
    assert BlockTrainingConfig().target == "model"  # (EfficientQAT's: the float model's output; better measured)
    assert "block_training" not in _recipe_from_args(build_parser().parse_args(
        ["quantize", "--scheme", "w_int4_per_group_sym", "--output", "unused"])).model_dump()


def train_blocks_on_rank(rank: int, world: int, port: int, calib: torch.Tensor, out: str) -> None:
    from distributed_worker import process_group

    with process_group(rank, world, port):
        recipe = {**W4A4KV4, "block_training": {"epochs": 2, "lr": 1e-2, "codes_lr": 5e-2, "holdout": 2}}
        model = llmquant.quantize(make_model("llama"), recipe, calib=calib, progress=False)
        rows = [row["block_training"] for row in model.llmquant_manifest.layers]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "rows": rows}, Path(out) / f"{rank}.pt")


def test_two_processes_train_the_same_layers(calib12: torch.Tensor, tmp_path: Path) -> None:
    """torchrun's data parallelism: each step takes a sample on each of the two processes and averages their gradients,
    the held-out samples (the last 2 of 12, on the second process) decide for both; both end with the same checkpoint,
    bit for bit, after 10 steps a layer (2 epochs over 10 training samples, 2 a step), and the first layer keeps a
    lower held-out error."""
    from test_distributed import free_port

    mp.spawn(train_blocks_on_rank, args=(2, free_port(), calib12, str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"{rank}.pt") for rank in range(2))
    assert first["state"].keys() == second["state"].keys()
    assert all(torch.equal(first["state"][k], second["state"][k]) for k in first["state"])
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in found["rows"]] for found in (first, second)]
    assert strip[0] == strip[1] and all(row["steps"] == 10 for row in strip[0])
    assert strip[0][0]["kept"] and strip[0][0]["held_out_error_after"] < strip[0][0]["held_out_error_before"]


class SecondOfTwo(Ranks):
    """Rank 1 of two processes holding as many samples each (the collectives answered here)."""

    def __init__(self) -> None:
        super().__init__(1, 2)

    def total(self, value: float) -> float:
        return 2 * value


def test_the_held_out_samples_are_the_last_of_all_processes() -> None:
    assert split_rows(12, 2) == SampleSplit(list(range(10)), [10, 11], 10)
    assert split_rows(6, 2, SecondOfTwo()) == SampleSplit([0, 1, 2, 3], [4, 5], 10)  # (samples 6 .. 11 of 12)
    with pytest.raises(LlmquantError, match=r"^model.layers.0: block_training.holdout 6 leaves none of the last of "
                                            r"the 2 processes' 6 calibration samples to train on; allowed: fewer "
                                            r"than 6$"):
        split_rows(6, 6, SecondOfTwo(), "model.layers.0")


def test_the_training_state_is_counted_and_refused_above_the_memory_cap(calib12: torch.Tensor) -> None:
    """`state_bytes`: 25 bytes a quantized weight with the codes trained, 8 with the scales alone; the manifest row
    records it; a cap that leaves less than that refuses the layer in one line before any training."""
    layer, _, _ = first_layer(calib12)
    weights = sum(linear.codes().numel() for linear in trainable_layers(layer).values())
    assert state_bytes(layer, BlockTrainingConfig()) == 25 * weights
    assert state_bytes(layer, BlockTrainingConfig(codes_lr=0.0)) == 8 * weights
    recipe = llmquant.Recipe.build(**{**W4A4KV4, "algorithm": "rtn", "block_training": {"holdout": 2}})
    manifest = run_pipeline(make_model("llama"), recipe, calib12, progress=False)
    assert manifest.layers[0]["block_training"]["state_mib"] == round(25 * weights / 2**20, 1)
    assert manifest.layers[0]["block_training"]["graph_mib"] > 0
    capped = DevicePolicy.resolve("cpu", max_memory=resident_bytes() + 2**10)  # (already above it: 0 bytes left)
    with pytest.raises(LlmquantError, match=r"model.layers.0: block training needs [0-9.]+ MiB for its weights' "
                                            r"gradients and optimizer state, more than the 0.0 MiB free where the "
                                            r"layer computes, under the run's memory caps; allowed: a larger "
                                            r"--max-memory or --max-gpu-memory; codes_lr: 0 trains the scales "
                                            r"alone, 8 bytes a weight, or no block_training") as error:
        run_pipeline(make_model("llama"), recipe, calib12, progress=False, policy=capped)
    assert "\n" not in str(error.value)


def test_a_first_step_whose_graph_exceeds_what_the_caps_leave_is_refused_before_any_update(
        calib24: torch.Tensor) -> None:
    """The first step measures its autograd graph (`saved_tensor_bytes`: the tensors saved for the backward pass, the
    layer's own parameters left out): at least the float weights it makes from the codes; with 1 byte less than it
    left, the layer is refused in one line and keeps its scales and codes; with the graph left, it trains."""
    layer, sample, targets = first_layer(calib24)
    weights = sum(linear.codes().numel() for linear in trainable_layers(layer).values())
    config = BlockTrainingConfig(epochs=1, lr=1e-2, codes_lr=5e-2, holdout=8)
    result = train_block(layer, sample, targets, config)
    assert 4 * weights <= result.graph_bytes < 64 * weights
    assert result.describe()["graph_mib"] == round(result.graph_bytes / 2**20, 1)
    layer, sample, targets = first_layer(calib24)
    start, scales = codes(layer), {n: lin.weight_scale.clone() for n, lin in trainable_layers(layer).items()}
    with pytest.raises(LlmquantError, match=r"^model.layers.0: block training's autograd graph of one calibration "
                                            r"sample takes [0-9.]+ MiB, more than the [0-9.]+ MiB "
                                            r"its weights' state leaves free where the layer computes, under the "
                                            r"run's memory caps; allowed: a larger --max-memory or --max-gpu-memory, "
                                            r"shorter calibration samples, or no block_training$") as error:
        train_block(layer, sample, targets, config, where="model.layers.0", memory_left=result.graph_bytes - 1)
    assert "\n" not in str(error.value)
    assert all(torch.equal(codes(layer)[n], c) for n, c in start.items())
    assert all(torch.equal(lin.weight_scale, scales[n]) for n, lin in trainable_layers(layer).items())
    layer, sample, targets = first_layer(calib24)
    assert train_block(layer, sample, targets, config, memory_left=result.graph_bytes).graph_bytes == result.graph_bytes

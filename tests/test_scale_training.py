"""The weights' scales trained end to end (EfficientQAT's E2E-QP): the straight-through quantizers, the differentiable
simulation of a quantized Linear against its other paths and against the scales' exact gradient, the coarse KL against
the full one, training that lowers the loss (KL from the float model, or cross-entropy) and keeps the codes, the
held-out check that turns worse scales back, the same scales after save/load and from two processes, training on more
windows than calibrate, a saved checkpoint trained afterwards (`llmquant train-scales`) as the recipe trains it, and bad
recipes and runs as one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import llmquant
from conftest import DEVICES, VOCAB, logits, make_model, relative_error
from llmquant.algorithms.generated_windows import end_of_sequence_ids, generated_windows
from llmquant.algorithms.scale_training import (
    ScaleTrainingConfig,
    TeacherTargets,
    TrainedScales,
    coarse_kl,
    held_out_loss,
    teacher_targets,
    train_scales,
    trainable_layers,
    trainable_norms,
)
from llmquant.cli import main
from llmquant.errors import LlmquantError
from llmquant.nn import causal_blocks
from llmquant.nn.attention_choice import set_attention
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.quant_linear import QuantLinear
from llmquant.parallel import Ranks
from llmquant.quant import QuantSpec, dequantize, fake_quantize, straight_through
from llmquant.quant.primitives import from_blocks, grid_steps, to_blocks

W4A4KV4 = {"scheme": "w_int4_per_group_sym_a_uint4_per_token_asym_dynamic", "group_size": 32,
           "kv_cache": "int4_per_token_asym", "pre_opts": [{"name": "quarot", "rotations": ["R2", "R3", "R4"]}],
           "kv_cache_center_keys": True}


@pytest.fixture(scope="module")
def calib12() -> torch.Tensor:
    return torch.randint(0, VOCAB, (12, 32), generator=torch.Generator().manual_seed(3))


def quantized(calib: torch.Tensor, recipe: dict | None = None) -> torch.nn.Module:
    return llmquant.quantize(make_model("llama"), recipe or W4A4KV4, calib=calib, progress=False)


def with_teacher(calib: torch.Tensor, top_k: int = 16, family: str = "llama") -> tuple[torch.nn.Module,
                                                                                        TeacherTargets]:
    """The quantized tiny model, and the float one's targets on ``calib`` (taken before quantization)."""
    model = make_model(family)
    teacher = teacher_targets(model, calib, top_k)
    return llmquant.quantize(model, W4A4KV4, calib=calib, progress=False), teacher


def trained_checkpoint(quantized_on: torch.Tensor, recipe: dict, trained_on: torch.Tensor, config: dict,
                       folder: Path) -> tuple[torch.nn.Module, TrainedScales]:
    """A checkpoint of ``recipe`` quantized on ``quantized_on``, saved, loaded and trained by `train_scales` on
    ``trained_on`` (the float model's targets taken as the recipe takes them): the model and the run's record."""
    llmquant.save(quantized(quantized_on, recipe), None, folder)
    loaded, _ = llmquant.load(folder, runtime="fake")
    teacher = teacher_targets(make_model("llama"), trained_on, 64)
    return loaded, train_scales(loaded, trained_on, ScaleTrainingConfig(**config), teacher, progress=False)


def scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.weight_scale.clone() for name, layer in trainable_layers(model).items()}


def gains(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: norm.weight.detach().clone() for name, norm in trainable_norms(model).items()}


# --- the pieces ------------------------------------------------------------------------------------------------
def test_straight_through_is_the_quantized_value_with_the_identitys_gradient() -> None:
    spec = QuantSpec(bits=4, granularity="token", dynamic=True)
    x = torch.randn(3, 16, requires_grad=True)
    y = straight_through(x, fake_quantize(x, spec))
    assert torch.allclose(y, fake_quantize(x, spec), atol=1e-6)
    (y * torch.arange(16.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(16.0).expand(3, 16))
    plain = torch.randn(3, 16)
    quantized_plain = fake_quantize(plain, spec)
    assert straight_through(plain, quantized_plain) is quantized_plain  # nothing to differentiate: bit for bit


def test_the_kv_quantizer_passes_the_gradient_straight_through() -> None:
    quantizer = KVCacheQuantizer(QuantSpec(bits=4, granularity="token", dynamic=True, symmetric=False))
    key, value = torch.randn(1, 2, 5, 8, requires_grad=True), torch.randn(1, 2, 5, 8, requires_grad=True)
    quantized_key, quantized_value = quantizer(key, value)
    assert torch.allclose(quantized_key, fake_quantize(key.detach(), quantizer.spec), atol=1e-6)
    (quantized_key.sum() + 2 * quantized_value.sum()).backward()
    assert torch.equal(key.grad, torch.ones_like(key)) and torch.equal(value.grad, torch.full_like(value, 2.0))


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, granularity="group", group_size=32),
    QuantSpec(bits=4, granularity="channel"),  # (one scale a row: the product's columns scaled, no weight gradient)
    QuantSpec(bits=4, granularity="channel", symmetric=False),
    QuantSpec(bits=8, granularity="channel"),  # (int8 codes, not packed)
    QuantSpec(bits=8, granularity="tensor"),
], ids=["int4_group32", "int4_channel", "int4_channel_asym", "int8_channel", "int8_tensor"])
def test_a_linear_learning_its_scales_computes_the_simulation_and_the_scales_exact_gradient(spec: QuantSpec) -> None:
    """With its scales requiring a gradient a QuantLinear takes the differentiable path: the same outputs as its
    integer simulation (float rounding), and dL/ds_g = sum over the group of dL/dW * (q - z), whether it builds the
    weight (groups) or scales its product's columns (one scale a row or one for the tensor); the codes it unpacked
    stay while its scales are set again (`set_scale` with ``keep_codes``), and go with `drop_caches`."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    inputs = QuantSpec(bits=4, granularity="token", dynamic=True, symmetric=False)
    layer = QuantLinear.from_linear(linear, spec, inputs)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = layer(x)
    layer.weight_scale.requires_grad_(True)
    y = layer(x)
    assert torch.allclose(y, expected, atol=1e-5)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    weight_grad = upstream.T @ fake_quantize(x, inputs)  # dL/dW for y = x_q W^T + b
    codes = to_blocks(layer.codes().float(), spec) - layer.weight_qparams()[1]
    exact = (to_blocks(weight_grad, spec) * codes).sum(1).reshape(layer.weight_scale.shape)
    assert torch.allclose(layer.weight_scale.grad, exact, rtol=1e-4, atol=1e-6)
    unpacked = layer._integer_codes
    assert (unpacked is not None) == layer.packed
    layer.set_scale(layer.weight_scale.detach() * 2, keep_codes=True)
    assert layer._integer_codes is unpacked
    layer.drop_caches()
    assert layer._integer_codes is None
    layer.set_scale(layer.weight_scale / 2)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)  # (the integer path again)


def test_every_scale_gets_the_gradient_of_the_models_attention_through_the_blocked_one() -> None:
    """A prefill long enough for the causal blocks (`llmquant.nn.causal_blocks`, the default attention of
    `llmquant.load`) passes the gradient back to q, k and v as the model's own attention does: the blocks' op has no
    backward, so with a gradient to pass the blocked attention is sdpa's (without that, q/k/v's scales were never
    trained: their gradient stopped at the attention)."""
    ids = torch.randint(0, VOCAB, (1, causal_blocks.MIN_POSITIONS + 8), generator=torch.Generator().manual_seed(5))
    model = quantized(ids[:, :32].repeat(4, 1))
    layers = trainable_layers(model)
    grads = {}
    for attention in ("model", "blocks"):
        set_attention(model, attention)
        for layer in layers.values():
            layer.weight_scale.requires_grad_(True)
            layer.weight_scale.grad = None
        model(input_ids=ids, use_cache=False).logits.logsumexp(-1).mean().backward()
        grads[attention] = {name: layer.weight_scale.grad for name, layer in layers.items()}
        for layer in layers.values():
            layer.weight_scale.requires_grad_(False)
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads["blocks"].values())
    assert any(name.endswith("q_proj") for name in grads["blocks"])
    for name, grad in grads["model"].items():
        assert relative_error(grad, grads["blocks"][name]) < 1e-4, name


def test_offsets_on_the_codes_round_straight_through_within_the_codes_range() -> None:
    """With ``code_offsets`` d the weight is (round(q + d) clamped - z) s, and dL/dd = dL/dW * s (straight through)."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 24), spec, None)
    codes = layer.codes().clone()
    offsets = torch.zeros(codes.shape)
    offsets[0, :4] = torch.tensor([0.4, 0.6, -0.6, 20.0])
    layer.code_offsets = offsets.requires_grad_(True)
    layer.weight_scale.requires_grad_(True)
    x = torch.randn(5, 64)
    y = layer(x)
    moved = codes.float().clone()
    moved[0, :4] = (codes[0, :4].float() + torch.tensor([0.0, 1.0, -1.0, 20.0])).clamp(-8, 7)
    assert torch.allclose(y, torch.nn.functional.linear(x, dequantize(moved, *layer.weight_qparams(), spec),
                                                        layer.bias), atol=1e-5)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    scale = from_blocks(layer.weight_scale.detach().reshape(-1, 1).expand(-1, 32), codes.shape, spec)
    assert torch.allclose(offsets.grad, (upstream.T @ x) * scale, rtol=1e-4, atol=1e-6)
    layer.code_offsets = None
    layer.weight_scale.requires_grad_(False)
    assert torch.equal(layer.codes(), codes)  # (the offsets change no stored code)


def test_the_coarse_kl_is_the_full_kl_with_every_token_and_at_most_it_with_fewer() -> None:
    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(2, 5, 40) * 3, torch.randn(2, 5, 40) * 3
    log_p, log_q = torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1)
    full = (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    def coarse(k: int) -> torch.Tensor:
        top = log_p.topk(k, dim=-1)
        return coarse_kl(student_logits, TeacherTargets(top.indices.to(torch.int32), top.values))

    assert torch.allclose(coarse(40), full, rtol=1e-5)
    assert 0 < coarse(4) <= coarse(16) <= full + 1e-6  # (coarser bins: a smaller KL, data-processing inequality)


def test_the_teacher_targets_are_the_float_models_most_likely_tokens(calib12: torch.Tensor) -> None:
    model = make_model("llama")
    teacher = teacher_targets(model, calib12[:2], 8)
    with torch.no_grad():
        log_p = torch.log_softmax(model(calib12[:2]).logits, -1)
    top = log_p.topk(8, dim=-1)
    assert teacher.ids.dtype == torch.int32 and torch.equal(teacher.ids, top.indices.to(torch.int32))
    assert torch.allclose(teacher.log_probs, top.values, atol=1e-6)


# --- training ----------------------------------------------------------------------------------------------------
def test_training_lowers_the_kl_changes_only_the_scales_and_keeps_the_codes(calib12: torch.Tensor) -> None:
    """Eight passes over 12 random samples: their mean KL from the float model falls from 1.61e-4 to 0.71e-4 (on a
    Zen 4 EPYC; the tiny random model's distributions are close to uniform)."""
    model, teacher = with_teacher(calib12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    codes = {name: layer.codes().clone() for name, layer in trainable_layers(model).items()}
    kl_before = held_out_loss(model, calib12, teacher)
    wanted = [p.requires_grad for p in model.parameters()]
    result = train_scales(model, calib12, ScaleTrainingConfig(epochs=8, lr=1e-2, holdout=0, top_k=16), teacher,
                          progress=False)
    assert result.kept and result.steps == 96 and result.tokens == 96 * 32
    assert result.layers == 14 and result.scales == sum(s.numel() for s in scales(model).values())
    assert held_out_loss(model, calib12, teacher) < 0.75 * kl_before
    described = result.describe()
    assert described["loss"] == "kl" and described["loss_last_tenth"] < described["loss_first_tenth"]
    assert described["layers_without_gradient"] == 0 and described["first_without_gradient"] is None
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("weight_scale") for k in changed)
    assert all(torch.equal(layer.codes(), codes[name]) for name, layer in trainable_layers(model).items())
    for layer in trainable_layers(model).values():  # plain tensors again: inference takes the integer paths
        assert not layer.weight_scale.requires_grad and layer.weight_scale.is_leaf
    assert [p.requires_grad for p in model.parameters()] == wanted  # as they were


def test_layers_no_gradient_reaches_are_counted_and_named(calib12: torch.Tensor,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A layer whose output leaves the graph (here detached by a hook) keeps its scales, and the record names it: the
    check that would have shown q/k/v's scales untrained behind the blocked attention's op."""
    model, teacher = with_teacher(calib12)
    cut = "model.layers.1.self_attn.k_proj"
    model.get_submodule(cut).register_forward_hook(lambda module, inputs, output: output.detach())
    kept = model.get_submodule(cut).weight_scale.clone()
    with caplog.at_level("WARNING"):
        result = train_scales(model, calib12, ScaleTrainingConfig(epochs=1, lr=1e-2, holdout=0, top_k=16), teacher,
                              progress=False)
    assert result.unreached == [cut]
    assert result.describe()["layers_without_gradient"] == 1 and result.describe()["first_without_gradient"] == cut
    assert torch.equal(model.get_submodule(cut).weight_scale, kept)
    assert f"no gradient reached the scales of 1 of the 14 layers (the first: {cut})" in caplog.text


def test_training_the_norms_gains_too_changes_them_and_the_scales_only(calib12: torch.Tensor) -> None:
    """With ``norms``, the two norms of each layer and the final one train with the scales (the KL falls from 1.61e-4
    to 0.69e-4 on a Zen 4 EPYC, against 0.71e-4 for the scales alone); after, they are plain weights again."""
    model, teacher = with_teacher(calib12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    codes = {name: layer.codes().clone() for name, layer in trainable_layers(model).items()}
    kl_before = held_out_loss(model, calib12, teacher)
    wanted = [p.requires_grad for p in model.parameters()]
    result = train_scales(model, calib12, ScaleTrainingConfig(epochs=8, lr=1e-2, holdout=0, top_k=16, norms=True),
                          teacher, progress=False)
    assert result.kept and result.norms == 5 and result.describe()["norms"] == 5
    assert held_out_loss(model, calib12, teacher) < 0.75 * kl_before
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    norms = {f"{name}.weight" for name in trainable_norms(model)}
    assert norms == {f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm",
                                                                             "post_attention_layernorm")} | {
        "model.norm.weight"}
    assert norms <= changed and all(k.endswith("weight_scale") for k in changed - norms)
    assert all(torch.equal(layer.codes(), codes[name]) for name, layer in trainable_layers(model).items())
    assert not any(torch.nn.utils.parametrize.is_parametrized(norm) for norm in trainable_norms(model).values())
    assert [p.requires_grad for p in model.parameters()] == wanted


def test_a_gain_stored_as_an_offset_from_one_trains_as_a_gain(calib12: torch.Tensor) -> None:
    """Gemma's norms apply 1 + w: the trained factor multiplies 1 + w, so a channel whose w is 0 (a gain of one)
    trains too, and every gain keeps its sign."""
    model, teacher = with_teacher(calib12, family="gemma")
    norm = trainable_norms(model)["model.layers.0.input_layernorm"]
    with torch.no_grad():
        norm.weight[0] = 0.0
    before = gains(model)
    train_scales(model, calib12, ScaleTrainingConfig(epochs=4, lr=1e-2, holdout=0, top_k=16, norms=True), teacher,
                 progress=False)
    assert float(norm.weight.detach()[0]) != 0.0
    assert all(((w + 1) * (before[name] + 1) > 0).all() for name, w in gains(model).items())


def test_training_the_codes_too_moves_some_by_one_and_lowers_the_kl_further(calib12: torch.Tensor) -> None:
    """With ``codes_lr`` the codes train as offsets rounded straight through: eight passes over the 12 samples move
    314 of the 73,728 codes (on a Zen 4 EPYC), and the KL falls below what the scales alone reach (1.61e-4 -> 0.62e-4
    against 0.71e-4); the codes stay in range and are stored, the offsets gone."""
    runs = {}
    for codes_lr in (0.0, 3e-2):
        model, teacher = with_teacher(calib12)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        codes = {name: layer.codes().clone() for name, layer in trainable_layers(model).items()}
        result = train_scales(model, calib12, ScaleTrainingConfig(epochs=8, lr=1e-2, holdout=0, top_k=16,
                                                                  codes_lr=codes_lr), teacher, progress=False)
        runs[codes_lr] = held_out_loss(model, calib12, teacher)
    changed = {name: int((layer.codes() != codes[name]).sum()) for name, layer in trainable_layers(model).items()}
    assert result.codes_changed == sum(changed.values()) > 0 and result.describe()["codes_changed"] > 0
    assert all(int((layer.codes().int() - codes[name].int()).abs().max()) <= 1
               for name, layer in trainable_layers(model).items())
    assert all(layer.code_offsets is None for layer in trainable_layers(model).values())
    state = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert all(k.endswith(("weight_scale", "weight_packed")) for k in state)
    assert runs[3e-2] < runs[0.0]


@pytest.mark.parametrize("options", [{}, {"norms": True}, {"codes_lr": 1.0}])
def test_the_held_out_check_turns_worse_scales_back(calib12: torch.Tensor, options: dict) -> None:
    """A step far too large (each scale moved by up to e^1 a step) makes the held-out KL worse (1.81e-4 -> 2.47e-2 on
    a Zen 4 EPYC): the start's scales (and the norms' gains, the codes) stay, bit for bit."""
    model, teacher = with_teacher(calib12)
    start, start_gains = scales(model), gains(model)
    codes = {name: layer.codes().clone() for name, layer in trainable_layers(model).items()}
    result = train_scales(model, calib12, ScaleTrainingConfig(epochs=1, lr=1.0, holdout=4, top_k=16, **options),
                          teacher, progress=False)
    assert not result.kept and result.held_out_after > 2 * result.held_out_before
    assert all(torch.equal(scales(model)[name], value) for name, value in start.items())
    assert all(torch.equal(gains(model)[name], value) for name, value in start_gains.items())
    assert all(torch.equal(layer.codes(), codes[name]) for name, layer in trainable_layers(model).items())


def test_the_cross_entropy_loss_fits_the_samples_own_tokens(calib12: torch.Tensor) -> None:
    """Without a teacher: eight passes over 12 random samples, their mean NLL falls from 4.888 to 4.732 (on a Zen 4
    EPYC), below what the float model gives them: the samples are fitted, not the float model."""
    model = quantized(calib12)
    nll_before = held_out_loss(model, calib12)
    result = train_scales(model, calib12, ScaleTrainingConfig(epochs=8, lr=3e-2, holdout=0, loss="ce"),
                          progress=False)
    assert result.kept and result.describe()["loss"] == "ce"
    assert held_out_loss(model, calib12) < min(nll_before, held_out_loss(make_model("llama"), calib12)) - 0.05


@pytest.mark.parametrize("options", [{}, {"norms": True}, {"codes_lr": 0.1}])
def test_a_recipe_trains_the_scales_and_the_checkpoint_gives_the_same_logits(calib12: torch.Tensor, tmp_path: Path,
                                                                              eval_ids: torch.Tensor,
                                                                              options: dict) -> None:
    recipe = {**W4A4KV4, "scale_training": {"epochs": 2, "lr": 1e-2, "holdout": 0, **options}}
    model = quantized(calib12, recipe)
    untrained = quantized(calib12)
    entry = model.llmquant_manifest.results["scale_training"]
    assert entry["steps"] == 24 and entry["kept"] and model.llmquant_manifest.seconds["scale_training"] > 0
    assert any(not torch.equal(scales(model)[n], s) for n, s in scales(untrained).items())
    assert options.get("norms", False) == any(not torch.equal(gains(model)[n], g)
                                              for n, g in gains(untrained).items())
    assert bool(options) == ("norms" in options or entry["codes_changed"] > 0)
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake")
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))
    written = json.loads((tmp_path / "ckpt" / "llmquant.json").read_text())
    assert written["recipe"]["scale_training"] == {"epochs": 2.0, "batch": 1, "lr": 0.01, "holdout": 0, "loss": "kl",
                                                   "top_k": 64, "norms": False, "codes_lr": 0.0,
                                                   "samples": None, "extra_windows": "corpus"} | options
    assert written["seconds"]["scale_training_teacher"] > 0


# --- training on more samples than calibrate ----------------------------------------------------------------------
def test_the_windows_drawn_for_training_start_with_the_calibration_ones(tiny_dir: Path, corpus: Path) -> None:
    """`Recipe.drawn_samples` draws scale_training.samples windows; its first calib.samples are the windows a recipe
    without them calibrates on."""
    from transformers import AutoTokenizer

    from llmquant.api import calibration_ids

    tokenizer, text = AutoTokenizer.from_pretrained(tiny_dir), corpus.read_text()
    base = {"scheme": "w_int4_per_group_sym", "group_size": 32, "calib": {"samples": 4, "seqlen": 32, "seed": 5}}
    alone = calibration_ids(llmquant.Recipe.build(**base), tokenizer, text)
    both = calibration_ids(llmquant.Recipe.build(**base, scale_training={"samples": 9, "holdout": 1}), tokenizer, text)
    assert alone.shape == (4, 32) and both.shape == (9, 32) and torch.equal(both[:4], alone)
    assert llmquant.Recipe.build(**base, scale_training={"holdout": 1}).drawn_samples() == 4


def test_training_on_more_samples_calibrates_on_the_first_and_trains_on_all(calib12: torch.Tensor,
                                                                            tmp_path: Path) -> None:
    """GPTQ calibrated on the first 8 rows, the scales trained on all 12 but the last 2: the same scales, bit for bit,
    as a checkpoint calibrated on those 8 and trained on the 12 (so the extra rows reach training and the teacher,
    and nothing else)."""
    config = {"epochs": 1, "lr": 1e-2, "holdout": 2}
    gptq = {**W4A4KV4, "algorithm": "gptq", "calib": {"samples": 8}}
    inside = quantized(calib12, {**gptq, "scale_training": {**config, "samples": 12}})
    entry = inside.llmquant_manifest.results["scale_training"]
    assert (entry["samples"], entry["held_out"], entry["steps"]) == (10, 2, 10)
    loaded, result = trained_checkpoint(calib12[:8], gptq, calib12, config, tmp_path / "ckpt")
    assert result.describe() | {"seconds": 0} == entry | {"seconds": 0}
    assert all(torch.equal(scales(inside)[name], value) for name, value in scales(loaded).items())


def test_generated_windows_are_the_float_models_own(calib12: torch.Tensor) -> None:
    """LLM-QAT's windows: a random first token, the next 3 the model's most likely, the rest sampled from it (never an
    end-of-sequence token); seeded. Under the model (its head sharpened, so that its choices are not near uniform)
    they are far likelier than random tokens are."""
    model = make_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    windows = generated_windows(model, 6, 24, seed=1, batch=4, never=[5, 7])
    assert windows.shape == (6, 24) and windows.dtype == torch.long
    assert torch.equal(windows, generated_windows(model, 6, 24, seed=1, batch=4, never=[5, 7]))
    assert not torch.equal(windows, generated_windows(model, 6, 24, seed=2, batch=4, never=[5, 7]))
    assert not torch.isin(windows[:, 1:], torch.tensor([5, 7])).any()
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=windows).logits, -1)
    assert torch.equal(windows[:, 1:4], log_probs[:, :3].argmax(-1))  # (the greedy tokens)
    sampled = log_probs[:, 3:-1].gather(-1, windows[:, 4:, None]).mean()
    random = log_probs[:, 3:-1].gather(-1, calib12[:6, 4:24, None]).mean()
    assert sampled > random + 1.0
    with pytest.raises(LlmquantError, match="generated windows need seqlen >= 2"):
        generated_windows(model, 2, 1)


def test_training_on_generated_windows_trains_on_the_float_models_windows(calib12: torch.Tensor,
                                                                           tmp_path: Path) -> None:
    """``extra_windows: generated``: the 4 windows beyond the 8 calibration ones come from the float model (seeded by
    calib.seed, its end-of-sequence tokens never chosen): the same scales, bit for bit, as a checkpoint calibrated on
    the 8 and trained on them and the generated ones; the given ids hold the calibration rows only."""
    config = {"epochs": 1, "lr": 1e-2, "holdout": 2}
    gptq = {**W4A4KV4, "algorithm": "gptq", "calib": {"samples": 8, "seed": 3}}
    recipe = llmquant.Recipe.build(**gptq, scale_training={**config, "samples": 12, "extra_windows": "generated"})
    assert (recipe.training_samples(), recipe.generated_samples(), recipe.drawn_samples()) == (12, 4, 8)
    inside = quantized(calib12[:8], recipe.model_dump())
    entry = inside.llmquant_manifest.results["scale_training"]
    assert (entry["samples"], entry["held_out"], entry["steps"]) == (10, 2, 10)
    assert inside.llmquant_manifest.seconds["scale_training_generation"] > 0
    float_model = make_model("llama")
    generated = generated_windows(float_model, 4, 32, seed=3, never=end_of_sequence_ids(float_model))
    loaded, result = trained_checkpoint(calib12[:8], gptq, torch.cat([calib12[:8], generated]), config,
                                        tmp_path / "ckpt")
    assert result.describe() | {"seconds": 0, "generated": 4} == entry | {"seconds": 0}
    assert all(torch.equal(scales(inside)[name], value) for name, value in scales(loaded).items())


def test_generated_windows_need_samples_beyond_the_calibration() -> None:
    with pytest.raises(LlmquantError, match=r"scale_training.extra_windows 'generated' generates the windows beyond "
                                            r"calib.samples 8, but scale_training.samples is 8; allowed: samples above "
                                            r"8, or extra_windows 'corpus'"):
        llmquant.Recipe.build(**W4A4KV4, calib={"samples": 8},
                              scale_training={"samples": 8, "extra_windows": "generated"})


def test_the_command_line_draws_the_training_windows(tiny_dir: Path, corpus: Path, tmp_path: Path) -> None:
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"scheme": "w_int4_per_group_sym", "group_size": 32,
                                  "calib": {"dataset": str(corpus), "samples": 4, "seqlen": 32},
                                  "scale_training": {"holdout": 1, "samples": 6, "lr": 1e-2}}))
    assert main(["quantize", "--model", str(tiny_dir), "--config", str(config), "--no-eval", "--quiet",
                 "--output", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "llmquant.json").read_text())
    assert written["recipe"]["scale_training"]["samples"] == 6
    assert (written["results"]["scale_training"]["samples"], written["results"]["scale_training"]["held_out"]) == (5, 1)


# --- a saved checkpoint trained afterwards (`llmquant train-scales`) ---------------------------------------------
def stored_scales(directory: Path) -> dict[str, torch.Tensor]:
    model, _ = llmquant.load(directory, runtime="fake")
    return scales(model)


def test_training_a_saved_checkpoint_is_the_recipes_step(tiny_dir: Path, corpus: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """`llmquant train-scales` on a checkpoint of a recipe without scale_training writes what quantizing with the
    step writes: the same scales bit for bit, the same logits, the step in the manifest's recipe and the same
    record (training windows drawn beyond the calibration ones, the clip search's held out of them)."""
    recipe = {**W4A4KV4, "calib": {"dataset": str(corpus), "samples": 6, "seqlen": 32}, "clip_search": {"samples": 2}}
    training = {"holdout": 1, "samples": 8, "lr": 1e-2, "epochs": 2}
    for name, fields in (("plain", recipe), ("inside", {**recipe, "scale_training": training})):
        (tmp_path / f"{name}.json").write_text(json.dumps(fields))
        assert main(["quantize", "--model", str(tiny_dir), "--config", str(tmp_path / f"{name}.json"), "--no-eval",
                     "--quiet", "--output", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert main(["train-scales", str(tmp_path / "plain"), "--samples", "8", "--epochs", "2",  # (--model: the manifest)
                 "--set", "holdout=1", "--set", "lr=0.01", "--no-eval", "--quiet",
                 "--output", str(tmp_path / "trained")]) == 0
    assert "scale training: 10 steps on 5 windows" in capsys.readouterr().out  # 4 + 2 drawn, less 1 held out; x2
    inside, trained = stored_scales(tmp_path / "inside"), stored_scales(tmp_path / "trained")
    assert inside.keys() == trained.keys() and all(torch.equal(inside[n], trained[n]) for n in inside)
    assert not all(torch.equal(trained[n], value) for n, value in stored_scales(tmp_path / "plain").items())
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(llmquant.load(tmp_path / "inside")[0], ids),
                       logits(llmquant.load(tmp_path / "trained")[0], ids))
    written = {name: json.loads((tmp_path / name / "llmquant.json").read_text()) for name in ("inside", "trained")}
    assert written["trained"]["recipe"] == written["inside"]["recipe"]
    assert written["trained"]["results"]["quantized_from"] == str(tiny_dir.resolve())
    records = [{k: v for k, v in found["results"]["scale_training"].items() if k != "seconds"}
               for found in written.values()]
    assert records[0] == records[1] and records[1]["kept"]
    assert written["trained"]["results"]["clip_search"] == written["inside"]["results"]["clip_search"]


def test_training_a_saved_checkpoint_compares_it_with_the_float_model(tiny_dir: Path, corpus: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """With the evaluation on, the checkpoint's own figures (evaluated alike) give the untrained row; the trained
    perplexity is the written checkpoint's, loaded with the attention the training process ran (``model``)."""
    (tmp_path / "recipe.json").write_text(json.dumps({**W4A4KV4, "calib": {"dataset": str(corpus), "samples": 6,
                                                                            "seqlen": 32}}))
    evaluation = ["--eval-corpus", str(corpus), "--max-windows", "4", "--quiet"]
    assert main(["quantize", "--model", str(tiny_dir), "--config", str(tmp_path / "recipe.json"), *evaluation,
                 "--output", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main(["train-scales", str(tmp_path / "plain"), "--model", str(tiny_dir), "--set", "holdout=1",
                 "--set", "lr=0.01", *evaluation, "--output", str(tmp_path / "trained")]) == 0
    printed = capsys.readouterr().out
    plain, trained = (json.loads((tmp_path / name / "llmquant.json").read_text())["results"]
                      for name in ("plain", "trained"))
    assert trained["float_ppl"] == plain["float_ppl"]
    assert trained["scale_training"]["untrained_ppl"] == plain["quantized_ppl"]
    assert f"| {tmp_path / 'plain'} | {plain['quantized_ppl']:.3f} |" in printed
    assert f"| scales trained | {trained['quantized_ppl']:.3f} | {trained['ppl_ratio']:.4f} |" in printed
    from llmquant.data import corpus_windows
    from llmquant.evaluation.perplexity import perplexity

    model, tokenizer = llmquant.load(tmp_path / "trained", attention="model")
    windows = corpus_windows(tokenizer, str(corpus), 32, 4)
    assert perplexity(model, windows) == pytest.approx(trained["quantized_ppl"], rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_a_saved_checkpoint_trains_where_it_is_asked(plain_and_trained: Path, tiny_dir: Path, device: str) -> None:
    """`train_checkpoint_scales` on ``device``: the model trains and rests there, its held-out loss falls, and its
    scales agree with those `quantize` trained on the CPU with the same step (``inside``; on a GPU within 1e-3: float
    sums in another order)."""
    model, _ = llmquant.train_checkpoint_scales(plain_and_trained / "plain", tiny_dir, {"holdout": 1, "lr": 1e-2},
                                                device, progress=False)
    assert {p.device.type for p in model.parameters()} == {torch.device(device).type}
    record = model.llmquant_manifest.results["scale_training"]
    assert record["kept"] and record["held_out_loss_after"] < record["held_out_loss_before"]
    reference = stored_scales(plain_and_trained / "inside")
    assert all(relative_error(value.cpu(), reference[name]) < 1e-3 for name, value in scales(model).items())


def test_two_processes_train_a_saved_checkpoint_as_the_recipe_does(plain_and_trained: Path, tiny_dir: Path,
                                                                    corpus: Path, tmp_path: Path) -> None:
    """`llmquant train-scales --nproc 2` (torchrun, each step's samples shared) on a checkpoint of one process writes
    the scales `llmquant quantize --nproc 2` writes with the step (round to nearest: the same checkpoint from 1 or 2
    processes before training)."""
    recipe = json.loads((plain_and_trained / "inside.json").read_text())
    (tmp_path / "recipe.json").write_text(json.dumps({**recipe, "scale_training": {"holdout": 2, "lr": 1e-2}}))
    common = ["--no-eval", "--quiet", "--nproc", "2"]
    for command in (["quantize", "--model", str(tiny_dir), "--config", str(tmp_path / "recipe.json"), *common,
                     "--output", str(tmp_path / "inside")],
                    ["train-scales", str(plain_and_trained / "plain"), "--set", "holdout=2", "--set", "lr=0.01",
                     *common, "--output", str(tmp_path / "trained")]):
        done = subprocess.run([sys.executable, "-m", "llmquant", *command], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    inside, trained = stored_scales(tmp_path / "inside"), stored_scales(tmp_path / "trained")
    assert all(torch.equal(inside[name], trained[name]) for name in inside)
    record = json.loads((tmp_path / "trained" / "llmquant.json").read_text())["results"]["scale_training"]
    assert record["steps"] == 3 and record["kept"]  # 8 samples less 2 held out, 2 a step


@pytest.fixture(scope="module")
def plain_and_trained(tiny_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``plain`` (a W4A4KV4 checkpoint of 8 calibration samples) and ``inside`` (the same with its
    scales trained, Adam's step 1e-2)."""
    root = tmp_path_factory.mktemp("train_scales")
    recipe = {**W4A4KV4, "algorithm": "rtn", "calib": {"dataset": str(corpus), "samples": 8, "seqlen": 32}}
    for name, fields in (("plain", recipe), ("inside", {**recipe, "scale_training": {"holdout": 1, "lr": 1e-2}})):
        (root / f"{name}.json").write_text(json.dumps(fields))
        assert main(["quantize", "--model", str(tiny_dir), "--config", str(root / f"{name}.json"), "--no-eval",
                     "--quiet", "--output", str(root / name)]) == 0
    return root


@pytest.mark.parametrize(("checkpoint", "args", "message"), [
    ("missing", [], r"is not a checkpoint llmquant wrote \(no quantized config.json and llmquant.json\); allowed: "
                    "the --output of llmquant quantize"),
    ("inside", [], r"scales were trained already \(its recipe has scale_training\); allowed: a checkpoint "
                   "quantized without it"),
    ("plain", ["--set", "lr=0"], "recipe field 'scale_training.lr' = 0: Input should be greater than 0"),
    ("plain", ["--set", "holdout=9"], "scale_training.holdout 9 leaves none of the 8 calibration samples"),
], ids=["not-a-checkpoint", "trained-already", "bad-field", "too-few-samples"])
def test_bad_train_scales_runs_are_one_line_errors(plain_and_trained: Path, tiny_dir: Path,
                                                   capsys: pytest.CaptureFixture, checkpoint: str, args: list[str],
                                                   message: str) -> None:
    output = plain_and_trained / f"out-{checkpoint}"
    assert main(["train-scales", str(plain_and_trained / checkpoint), "--model", str(tiny_dir), "--no-eval", "--quiet",
                 *args, "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("llmquant: error:")
    assert re.search(message, error), error
    assert not output.exists()


def test_given_ids_must_hold_every_training_window(calib12: torch.Tensor) -> None:
    recipe = {**W4A4KV4, "calib": {"samples": 8}, "scale_training": {"samples": 16}}
    with pytest.raises(LlmquantError, match=r"scale_training.samples 16 trains on 16 rows of calib, the first "
                                            r"calib.samples 8 of them calibrating, but 12 were given; allowed: 16 "
                                            r"rows, or no scale_training.samples") as error:
        quantized(calib12, recipe)
    assert "\n" not in str(error.value)


# --- several processes ---------------------------------------------------------------------------------------------
def train_on_rank(rank: int, world: int, port: int, calib: torch.Tensor, training: dict, out: str) -> None:
    from distributed_worker import process_group

    with process_group(rank, world, port):
        recipe = {**W4A4KV4, "algorithm": "rtn", "calib": {"samples": 8}, "scale_training": training}
        model = quantized(calib[:llmquant.Recipe.build(**recipe).drawn_samples()], recipe)
        codes = {name: layer.codes().clone() for name, layer in trainable_layers(model).items()}
        torch.save({"scales": scales(model), "gains": gains(model), "codes": codes,
                    "entry": model.llmquant_manifest.results["scale_training"]}, Path(out) / f"rank{rank}.pt")


def average_on_rank(rank: int, world: int, port: int, out: str) -> None:
    from distributed_worker import process_group
    from llmquant import parallel

    parallel.GRADIENT_BUCKET_BYTES = 48  # buckets: the first alone, the float64 alone, the last two together
    with process_group(rank, world, port):
        tensors = [torch.zeros(3, 2), torch.zeros(4, dtype=torch.float64), torch.zeros(3, 2).t(), torch.zeros(5)]
        for i, tensor in enumerate(tensors[:3]):  # (the third a view whose strides are not the contiguous ones)
            tensor.grad = (rank + 1) * (i + 1) * torch.arange(tensor.numel(), dtype=tensor.dtype).view(tensor.shape)
        if rank == 1:  # (no gradient on rank 0: an expert no token reached there)
            tensors[3].grad = torch.arange(5.0)
        Ranks.current().average_gradients(tensors)
        found = [(tensor.grad, tensor.grad.stride(), tensor.stride()) for tensor in tensors]
        torch.save(found, Path(out) / f"{rank}.pt")


def test_gradients_are_averaged_over_two_processes_in_their_dtypes_and_layouts(tmp_path: Path) -> None:
    """`Ranks.average_gradients` (scale and block training's step) sends small gradients of one dtype together, in
    buckets of a set size: each comes back the mean of the two processes', in its own dtype and strides, a missing one
    counted as zeros."""
    from test_distributed import free_port

    mp.spawn(average_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    expected = [1.5 * torch.arange(6.0).view(3, 2), 3.0 * torch.arange(4, dtype=torch.float64),
                4.5 * torch.arange(6.0).view(2, 3), 0.5 * torch.arange(5.0)]
    for rank in range(2):
        found = torch.load(tmp_path / f"{rank}.pt")
        for (grad, grad_stride, stride), mean in zip(found, expected, strict=True):
            assert grad.dtype == mean.dtype and torch.equal(grad, mean) and grad_stride == stride


@pytest.mark.parametrize(("training", "steps"), [
    ({"epochs": 1, "lr": 1e-2, "holdout": 2}, 3),  # 6 training samples, 2 a step
    ({"epochs": 4, "lr": 1e-2, "holdout": 2, "norms": True, "codes_lr": 0.08, "samples": 12}, 20),  # 4 x 10 of 12
    ({"epochs": 1, "lr": 1e-2, "holdout": 2, "samples": 12, "extra_windows": "generated"}, 5),  # 4 by rank 0
], ids=["scales", "norms-codes-extra-windows", "generated-windows"])
def test_two_processes_train_the_same_model(calib12: torch.Tensor, tmp_path: Path, training: dict,
                                            steps: int) -> None:
    """Each step averages the two processes' gradients (one sample each) and the held-out check their mean NLL: both
    end with the same scales, norms' gains and codes, bit for bit, after half the steps of one process (with
    training windows beyond the calibration ones, every process draws them all, or the first generates them); no layer
    is left without a gradient."""
    from test_distributed import free_port

    mp.spawn(train_on_rank, args=(2, free_port(), calib12, training, str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    for part in ("scales", "gains", "codes"):
        assert first[part].keys() == second[part].keys()
        assert all(torch.equal(first[part][n], second[part][n]) for n in first[part]), part
    entries = [{k: v for k, v in found["entry"].items() if k != "seconds"} for found in (first, second)]
    assert entries[0] == entries[1] and entries[0]["steps"] == steps and entries[0]["kept"]
    assert entries[0]["layers_without_gradient"] == 0  # every rank's gradient reached every layer
    if training.get("norms"):
        assert entries[0]["norms"] > 0 and entries[0]["codes_changed"] > 0


def test_fp8_codes_train_to_neighbouring_e4m3_values_and_lower_the_kl_further(calib12: torch.Tensor) -> None:
    """FP8 W8A8 codes train as offsets in steps of their E4M3 grid (`grid_steps`): some codes move, each by at most
    one step of its binade, and stay float8; the KL falls below what the scales alone reach."""
    recipe = {"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic"}
    runs = {}
    for codes_lr in (0.0, 3e-2):
        model = make_model("llama")
        teacher = teacher_targets(model, calib12, 16)
        model = llmquant.quantize(model, recipe, calib=calib12, progress=False)
        start = {name: layer.codes().clone() for name, layer in trainable_layers(model).items()}
        result = train_scales(model, calib12, ScaleTrainingConfig(epochs=8, lr=1e-2, holdout=0, top_k=16,
                                                                  codes_lr=codes_lr), teacher, progress=False)
        runs[codes_lr] = held_out_loss(model, calib12, teacher)
    layers = trainable_layers(model)
    assert all(layers[name].codes().dtype == torch.float8_e4m3fn for name in start)
    moved = {name: (layers[name].codes().float() - codes.float()).abs() for name, codes in start.items()}
    assert result.codes_changed == sum(int((m > 0).sum()) for m in moved.values()) > 0
    assert all((moved[name] <= grid_steps(codes.float(), layers[name].weight_spec)).all()
               for name, codes in start.items())
    assert runs[3e-2] < runs[0.0]


# --- bad input ---------------------------------------------------------------------------------------------------
def test_the_loss_and_the_teacher_go_together(calib12: torch.Tensor) -> None:
    model, teacher = with_teacher(calib12)
    with pytest.raises(LlmquantError, match=r"loss 'kl' needs the float model's targets .*; allowed: loss kl with "
                                            "them, ce without"):
        train_scales(model, calib12, ScaleTrainingConfig(), progress=False)
    with pytest.raises(LlmquantError, match="loss 'ce' takes no teacher targets"):
        train_scales(model, calib12, ScaleTrainingConfig(loss="ce"), teacher, progress=False)


@pytest.mark.parametrize(("recipe", "message"), [
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "calib": {"samples": 4}, "scale_training": {}},
     "scale_training.holdout 8 leaves none of the 4 calibration samples to train on; allowed: 0 to 3"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "calib": {"samples": 8},
      "clip_search": {"samples": 4}, "scale_training": {"holdout": 4}},
     "leaves none of the 4 calibration samples the clip search leaves to train on; allowed: 0 to 3"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "calib": {"samples": 8},
      "scale_training": {"samples": 4, "holdout": 1}},
     r"scale_training.samples 4 is fewer than calib.samples 8, which it always trains on; allowed: 8 or more, or "
     r"none \(the calibration samples\)"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "calib": {"samples": 4}, "clip_search": {"samples": 2},
      "scale_training": {"samples": 10}},
     "scale_training.holdout 8 leaves none of the 8 samples the clip search leaves to train on; allowed: 0 to 7, or "
     "more scale_training.samples"),
    ({"scheme": "none", "scale_training": {}}, r"the recipe's schemes \(none\) quantize no weight"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "scale_training": {"lr": 0}},
     "recipe field 'scale_training.lr' = 0: Input should be greater than 0"),
])
def test_bad_scale_training_recipes_are_one_line_errors(recipe: dict, message: str) -> None:
    with pytest.raises(LlmquantError, match=message) as error:
        llmquant.Recipe.build(**recipe)
    assert "\n" not in str(error.value)


def test_a_streamed_model_is_refused_in_one_line(tiny_dir: Path, corpus: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"scheme": "w_int4_per_group_sym", "group_size": 32,
                                  "calib": {"dataset": str(corpus), "samples": 4, "seqlen": 32},
                                  "scale_training": {"holdout": 1}}))
    assert main(["quantize", "--model", str(tiny_dir), "--config", str(config), "--no-eval", "--quiet",
                 "--output", str(tmp_path / "out"), "--max-memory", "1GB"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "scale_training runs the whole quantized model forward and backward, but the model " \
                               "is streamed from disk (--max-memory)" in error[0]
    assert not (tmp_path / "out").exists()


def test_the_train_scales_flag_reaches_the_recipe() -> None:
    from llmquant.cli import _recipe_from_args, build_parser

    args = build_parser().parse_args(["quantize", "--scheme", "w_int4_per_group_sym", "--group-size", "32",
                                      "--algo", "gptq", "--train-scales", "2", "--output", "unused"])
    assert _recipe_from_args(args).scale_training.config() == ScaleTrainingConfig(epochs=2.0)
    more = build_parser().parse_args(["quantize", "--scheme", "w_int4_per_group_sym", "--group-size", "32",
                                      "--train-scales", "1", "--train-samples", "64", "--output", "unused"])
    recipe = _recipe_from_args(more)
    assert recipe.scale_training.samples == 64 and recipe.drawn_samples() == 64 and recipe.calibration_samples() == 32
    alone = build_parser().parse_args(["quantize", "--scheme", "w_int4_per_group_sym", "--group-size", "32",
                                       "--train-samples", "64", "--output", "unused"])
    with pytest.raises(LlmquantError, match=r"--train-samples sets how many windows scale training sees; it needs "
                                            r"--train-scales \(or scale_training in the recipe\)"):
        _recipe_from_args(alone)


def test_a_mixture_of_experts_trains_its_experts_scales(calib12: torch.Tensor) -> None:
    """Experts no token reaches in a step have no gradient there (Adam leaves them); the routed ones move."""
    model = llmquant.quantize(make_model("mixtral"), {"scheme": "w_int4_per_group_sym", "group_size": 32,
                                                      "scale_training": {"epochs": 1, "lr": 1e-2, "holdout": 2}},
                              calib=calib12, progress=False)
    untrained = llmquant.quantize(make_model("mixtral"), {"scheme": "w_int4_per_group_sym", "group_size": 32},
                                  calib=calib12, progress=False)
    entry = model.llmquant_manifest.results["scale_training"]
    assert entry["steps"] == 10 and entry["layers"] == len(trainable_layers(model))
    moved = [n for n, s in scales(untrained).items() if not torch.equal(scales(model)[n], s)]
    assert entry["kept"] and any(".experts." in n for n in moved)  # (held-out KL 2.94e-4 -> 2.72e-4 on a Zen 4)


@pytest.mark.parametrize("options", [{}, {"codes_lr": 0.1, "holdout": 0}])
def test_training_inside_quantize_is_training_the_saved_checkpoint(calib12: torch.Tensor, tmp_path: Path,
                                                                   options: dict) -> None:
    """The recipe's step and `train_scales` on a saved checkpoint of the recipe without it (the float model's targets
    taken alike): the same scales and codes, bit for bit (what BENCHMARKS.md's probe of a checkpoint relies on)."""
    config = {"epochs": 2, "lr": 1e-2, "holdout": 4, **options}
    inside = quantized(calib12, {**W4A4KV4, "scale_training": config})
    loaded, result = trained_checkpoint(calib12, W4A4KV4, calib12, config, tmp_path / "ckpt")
    assert result.describe() | {"seconds": 0} == inside.llmquant_manifest.results["scale_training"] | {"seconds": 0}
    assert result.kept and (result.codes_changed > 0) == bool(options)
    assert all(torch.equal(scales(inside)[name], value) for name, value in scales(loaded).items())
    inside_layers = trainable_layers(inside)
    assert all(torch.equal(inside_layers[name].codes(), layer.codes())
               for name, layer in trainable_layers(loaded).items())

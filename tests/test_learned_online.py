"""Layer-wise learned online rotations (`llmquant.algorithms.learned_online`): the Linears that read one input share
a site, learning lowers the layer's output error it optimises, the learned rotations fold keeping the float function
(the engine's check and the float model's logits), they are orthogonal and stored exactly, a checkpoint gives the
same logits back, vLLM's transform_config carries them, and bad recipes are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import llmquant
from conftest import logits, make_model, relative_error
from llmquant.algorithms.learned_online import (
    OnlineLearningConfig,
    OnlineLearningStep,
    cayley,
    kronecker_factors,
    shared_input_sites,
)
from llmquant.algorithms.lifecycle import LayerContext
from llmquant.errors import LlmquantError
from llmquant.nn.online_rotation import attach_input_rotation, input_rotation_of
from llmquant.quant.rotation import Rotation, storable
from llmquant.quant.scheme import scheme_from_name
from llmquant.recipe import Recipe

W4A4 = "w_int4_per_channel_sym_a_int4_per_token_dynamic"
ROTATIONS = ["R2", "R3", "R4", "R6"]


def recipe(learn: dict | None, scheme: str = W4A4, **fields: object) -> dict:
    quarot = {"name": "quarot", "rotations": ROTATIONS, **({"learn_online": learn} if learn is not None else {})}
    return {"scheme": scheme, "pre_opts": [quarot], **fields}


def learned(family: str, calib_ids: torch.Tensor, learn: dict, **fields: object) -> torch.nn.Module:
    model = make_model(family)
    llmquant.quantize(model, recipe(learn, **fields), calib=calib_ids, progress=False)
    return model


class _OneLinear(nn.Module):
    """A "layer" of one Linear reading x Q, Q a Hadamard."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n, n, bias=False)
        attach_input_rotation(self.linear, Rotation(n))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)


def _toy_context(n: int = 32) -> tuple[_OneLinear, torch.Tensor, LayerContext]:
    """`_OneLinear` fed x = z Q^T (64 samples of 16 tokens), z with channel 3 thirty times the others, W4A4."""
    torch.manual_seed(0)
    layer = _OneLinear(n)
    z = torch.randn(64, 16, n)
    z[..., 3] *= 30
    x = Rotation(n).apply(z, inverse=True)
    scheme = scheme_from_name(W4A4)
    ctx = LayerContext(layer=layer, index=0, where="toy", specs={"linear": (scheme.weights, scheme.input_activations)},
                       run_sample=lambda count: layer(x[:count]), feed=lambda *_: None, feed_each=lambda _: None,
                       batches=lambda batch: iter([(x[i : i + batch], {}) for i in range(0, len(x), batch)]))
    return layer, x, ctx


def test_learning_undoes_a_rotation_that_makes_an_outlier() -> None:
    """Inputs x = z H^T, z with one channel 30x the others: the Hadamard in front of the Linear gives it z, the worst
    input for 4-bit per-token quantization. The learned U spreads the outlier again: the quantized output error falls
    by more than 30%, the float output stays the same, the rotation becomes a learned orthogonal one."""
    layer, x, ctx = _toy_context()
    with torch.no_grad():
        before = layer(x)
    entry = OnlineLearningStep(OnlineLearningConfig(iterations=64, batch=16, lr=3e-2, weights=False)).transform(ctx)
    found = entry["learned_online_rotations"]
    assert found["sites"] == [["linear"]] and found["kept"]
    assert found["loss_learned"] < 0.7 * found["loss_start"]  # measured: 0.55
    with torch.no_grad():
        assert relative_error(before, layer(x)) < 1e-5
    assert input_rotation_of(layer.linear).kind == "learned"


def test_kronecker_factors_and_their_orthogonal_product() -> None:
    assert kronecker_factors(576) == (24, 24) and kronecker_factors(1536) == (32, 48)
    assert kronecker_factors(32) == (4, 8) and kronecker_factors(7) == (1, 7)
    torch.manual_seed(0)
    a1, a2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    u = torch.kron(cayley(a1), cayley(a2))
    assert (u.T @ u - torch.eye(32, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(cayley(torch.zeros(5, 5)), torch.eye(5))


def test_kronecker_factors_learn_the_outlier_away_with_a_held_out_check() -> None:
    """The toy above with U = U1 (x) U2 (4 x 4 and 8 x 8: 80 learned entries instead of 1,024), its keep-check on the
    last of the four batches, which it does not learn from: the held-out loss falls, the float output stays."""
    layer, x, ctx = _toy_context()
    with torch.no_grad():
        before = layer(x)
    config = OnlineLearningConfig(iterations=64, batch=16, lr=3e-2, weights=False, form="kronecker", holdout=1)
    found = OnlineLearningStep(config).transform(ctx)["learned_online_rotations"]
    assert found["form"] == "kronecker" and found["checked_on"] == "held-out" and found["kept"]
    assert found["loss_learned"] < 0.8 * found["loss_start"]  # measured: 0.51
    with torch.no_grad():
        assert relative_error(before, layer(x)) < 1e-5
    rotation = input_rotation_of(layer.linear)
    assert rotation.kind == "learned"
    u = Rotation(32).matrix().double().T @ rotation.dense.double()  # U = Q^T (Q U)
    assert (u - torch.eye(32, dtype=torch.float64)).abs().max() > 1e-2  # (it moved)
    rearranged = u.reshape(4, 8, 4, 8).permute(0, 2, 1, 3).reshape(16, 64)  # [(i, k), (j, l)] = U1[i, k] U2[j, l]
    singular = torch.linalg.svdvals(rearranged)
    assert singular[1] < 1e-5 * singular[0]  # rank one: a Kronecker product (Van Loan's rearrangement)


def _with_outlier_after_the_hadamard(model: nn.Module, size: float = 0.5) -> nn.Module:
    """Adds ``size`` h / w to every token's embedding, h the Hadamard's column 3 (unit length) and w layer 0's input
    norm gain: that norm's output gets a common part along h, and its online Hadamard a channel 3 that dwarfs the rest
    (the embeddings' rows have norm about 0.16; measured on an AVX2 EPYC: the loss falls to 0.49 of the Hadamards' at
    0.5, to 0.63 at 1.0, not at all at 0)."""
    column = Rotation(model.config.hidden_size).matrix()[:, 3].float()
    with torch.no_grad():
        gain = model.model.layers[0].input_layernorm.weight
        model.model.embed_tokens.weight.add_(size * column / gain)
    return model


def test_the_held_out_check_needs_a_batch_to_learn_from() -> None:
    _, _, ctx = _toy_context()
    config = OnlineLearningConfig(iterations=2, batch=16, holdout=4)
    with pytest.raises(LlmquantError, match="4 of the layer's 4 calibration batches of 16 set aside leaves none to "
                                            "learn from \\(allowed: 0 to 3\\)"):
        OnlineLearningStep(config).transform(ctx)


def test_linears_reading_one_input_share_a_site(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    llmquant.quantize(model, recipe(None, scheme="none"), calib=calib_ids, progress=False)
    layer = model.model.layers[0]
    sites = shared_input_sites(layer, lambda: layer(model.model.embed_tokens(calib_ids[:1]),
                                                    position_embeddings=model.model.rotary_emb(
                                                        torch.zeros(1, 32), torch.arange(32)[None])))
    assert sites == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                     ["mlp.down_proj"]]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_learning_lowers_the_quantized_output_error_and_keeps_the_float_function(family: str, calib_ids: torch.Tensor,
                                                                                 eval_ids: torch.Tensor) -> None:
    """The loss is the layer's quantized output error (the engine's figure, squared, on the same inputs); the learned
    rotations are kept only where they lower it; the engine's equivalence check passes; with nothing quantized the
    model keeps its float logits. (Layer 0 is given an outlier that learning spreads, so some layer keeps its learned
    rotations on any CPU: on the random model alone, which layers kept theirs moved with the CPU's float rounding.)"""
    model = _with_outlier_after_the_hadamard(make_model(family))
    llmquant.quantize(model, recipe({"iterations": 48, "batch": 4, "lr": 3e-3}), calib=calib_ids, progress=False)
    rows = model.llmquant_manifest.layers
    for row in rows:
        entry = row["learned_online_rotations"]
        found = entry["loss_learned"] if entry["kept"] else entry["loss_start"]
        assert row["output_error"] ** 2 == pytest.approx(found, rel=1e-3)
        assert row["equivalence_error"] < 1e-5  # measured: 1.6e-7 .. 2.9e-7
        assert entry["loss_learned"] < entry["loss_start"] or not entry["kept"]  # (never worse than the Hadamards)

    float_model = make_model(family)
    reference = logits(float_model, eval_ids)
    llmquant.quantize(float_model, recipe({"iterations": 8}, scheme="none"), calib=calib_ids, progress=False)
    assert relative_error(reference, logits(float_model, eval_ids)) < 1e-5
    kept = [i for i, row in enumerate(rows) if row["learned_online_rotations"]["kept"]]
    assert 0 in kept
    layer = model.model.layers[kept[0]]
    rotation = input_rotation_of(layer.mlp.gate_proj)
    assert rotation is not None and rotation.kind == "learned" and rotation.dense is not None
    assert torch.equal(rotation.dense, storable(rotation.dense))  # what the checkpoint gives back
    eye = torch.eye(rotation.n, dtype=torch.float64)
    assert (rotation.dense.T @ rotation.dense - eye).abs().max() < 1e-6
    assert input_rotation_of(layer.mlp.up_proj) == rotation  # the site's Linears share it


def test_a_learned_checkpoint_gives_the_same_logits_and_vllm_transforms(tmp_path: Path, calib_ids: torch.Tensor,
                                                                         eval_ids: torch.Tensor) -> None:
    """Layer 0's norm output is made to hold a large common part along one column of the 64-channel Hadamard, which
    the online R6 turns into one outlier channel (the toy's case), so learning lowers that site's error by a margin
    float rounding cannot undo (kept or not on the random model alone moved with the CPU: AVX512 vs AVX2)."""
    model = _with_outlier_after_the_hadamard(make_model("llama"))
    llmquant.quantize(model, recipe({"iterations": 32, "lr": 1e-2, "weights": False}, kv_cache="int4_per_token_asym"),
                      calib=calib_ids, progress=False)
    kept = [row["learned_online_rotations"] for row in model.llmquant_manifest.layers]
    assert kept[0]["kept"] and kept[0]["loss_learned"] < 0.75 * kept[0]["loss_start"]
    llmquant.save(model, None, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    entries = config["llmquant_structure"]["input_rotations"]
    learned_groups = {e["group"] for e in entries.values() if e["kind"] == "learned"}
    assert len(learned_groups) == sum(len(entry["sites"]) for entry in kept if entry["kept"])  # one matrix a site
    groups = config["quantization_config"]["transform_config"]["config_groups"]
    assert learned_groups <= set(groups) and all(groups[g]["type"] == "random-matrix" for g in learned_groups)
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="fake")
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))


def test_max_size_leaves_larger_rotations_alone(calib_ids: torch.Tensor) -> None:
    model = learned("llama", calib_ids, {"iterations": 2, "max_size": 64})  # hidden 64; down_proj reads 128
    for layer, row in zip(model.model.layers, model.llmquant_manifest.layers, strict=True):
        assert row["learned_online_rotations"]["sites"] == [["self_attn.q_proj", "self_attn.k_proj",
                                                              "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]]
        assert input_rotation_of(layer.mlp.down_proj).kind == "hadamard"


def test_bad_learn_online_recipes_are_one_line_errors(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    with pytest.raises(LlmquantError, match=r"learns online rotations before Linears .* add one of them"):
        llmquant.quantize(model, {"scheme": W4A4, "pre_opts": [{"name": "quarot", "rotations": ["R1", "R2", "R3"],
                                                                "learn_online": {}}]}, calib=calib_ids)
    with pytest.raises(LlmquantError, match="iterations") as error:
        llmquant.quantize(model, recipe({"iterations": 0}), calib=calib_ids)
    assert "\n" not in str(error.value)


def test_the_learn_online_flag_reaches_the_recipe_and_needs_quarot(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from llmquant.cli import _recipe_from_args, build_parser, main

    args = build_parser().parse_args(["quantize", "--scheme", W4A4, "--pre-opt", "quarot", "--rotations", "R2,R4,R6",
                                      "--learn-online", "5", "--output", "unused"])
    assert _recipe_from_args(args).quarot().learn_online.iterations == 5
    assert main(["quantize", "--learn-online", "5", "--output", str(tmp_path / "o")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "--learn-online needs --pre-opt quarot" in stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_mixtures_of_experts_share_the_norms_site_and_keep_the_float_function(family: str,
                                                                              calib_ids: torch.Tensor) -> None:
    """Calibrated with every expert running, the router and every expert's gate/up read the norm's output: one site
    (one U); each expert's down_proj reads its own input: a site each. Where the learned rotations are kept, the
    engine's float-function check passes."""
    model = make_model(family)
    llmquant.quantize(model, {"scheme": W4A4, "pre_opts": [{"name": "quarot", "rotations": ["R2", "R4", "R6"],
                                                            "learn_online": {"iterations": 4, "lr": 3e-2,
                                                                             "weights": False}}]},
                      calib=calib_ids, progress=False)
    moe_layers = 0
    for row in model.llmquant_manifest.layers:
        entry = row["learned_online_rotations"]
        readers = [site for site in entry["sites"] if any(".experts." in n and "gate_proj" in n for n in site)]
        if readers:
            moe_layers += 1
            (site,) = readers
            experts = {n.rsplit(".", 1)[0] for s in entry["sites"] for n in s if ".experts." in n}
            assert {f"{e}.{p}" for e in experts for p in ("gate_proj", "up_proj")} <= set(site)
            assert sum(1 for s in entry["sites"] if len(s) == 1 and s[0].endswith("down_proj")) >= len(experts)
        if entry["kept"]:
            assert row["equivalence_error"] < 1e-5
    assert moe_layers >= 1


def test_a_holdout_of_every_batch_is_refused_when_the_recipe_is_read() -> None:
    quarot = {"name": "quarot", "rotations": ["R4"], "learn_online": {"batch": 4, "holdout": 3}}
    with pytest.raises(LlmquantError, match=r"holdout 3 sets aside every one of the 3 batches of 4 that calib\.samples "
                                            r"10 makes; allowed: 0 to 2, or more samples"):
        Recipe.build(scheme="w_int8_per_channel_a_int8_per_token_dynamic", pre_opts=[quarot], calib={"samples": 10})
    kept = Recipe.build(scheme="w_int8_per_channel_a_int8_per_token_dynamic", pre_opts=[quarot], calib={"samples": 13})
    assert kept.quarot().learn_online.holdout == 3

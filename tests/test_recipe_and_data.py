"""Recipes (JSON/YAML round trip, validation) and the data protocol of DESIGN.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llmquant
from conftest import load_script
from llmquant import Recipe, data
from llmquant.algorithms.learned_online import OnlineLearningConfig
from llmquant.algorithms.scale_training import ScaleTrainingConfig
from llmquant.algorithms.spinquant import SpinQuantConfig
from llmquant.errors import LlmquantError
from llmquant.quant.scheme import W8A8_SCHEMES, scheme_from_name
from llmquant.recipe import LearnOnline, LearnRotations, ScaleTraining, set_fields


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipe_round_trips_through_files(tmp_path: Path, suffix: str) -> None:
    recipe = Recipe.build(
        scheme="w_int8_per_channel_a_int8_per_tensor_static",
        kv_cache="int8_per_tensor",
        activation_observer="percentile",
        overrides=[{"targets": ["re:.*down_proj"], "scheme": "w_int8_per_channel_a_int8_per_token_dynamic"}],
        calib={"samples": 8, "seqlen": 128},
    )
    path = tmp_path / f"recipe{suffix}"
    recipe.to_file(path)
    assert Recipe.from_file(path) == recipe


def test_recipe_errors_name_the_field_and_what_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(LlmquantError, match=r"recipe field 'overrides.0.scheme' = 'int5'.*allowed: none"):
        Recipe.build(overrides=[{"targets": ["Linear"], "scheme": "int5"}])
    with pytest.raises(LlmquantError, match=r"recipe field 'overrides.0.targets' = \[\]"):
        Recipe.build(overrides=[{"targets": [], "scheme": "none"}])
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: [unclosed\n")
    with pytest.raises(LlmquantError, match="is not valid yaml"):
        Recipe.from_file(bad)
    with pytest.raises(LlmquantError, match="cannot read recipe"):
        Recipe.from_file(tmp_path / "missing.json")


def test_static_observer_choice_reaches_the_activation_spec_only() -> None:
    recipe = Recipe.build(scheme="w_int8_per_channel_a_int8_per_tensor_static", activation_observer="mse")
    assert recipe.scheme_named(recipe.scheme).input_activations.observer == "mse"
    dynamic = Recipe.build(scheme="w_int8_per_channel_a_int8_per_token_dynamic", activation_observer="mse")
    assert dynamic.scheme_named(dynamic.scheme).input_activations.observer == "minmax"


@pytest.mark.parametrize("scheme", ["w_int8_per_channel_a_int8_per_tensor_static",
                                    "w_fp8_per_tensor_a_fp8_per_tensor_static"])
def test_the_manifest_records_the_static_input_ranges_each_observer_chose(scheme: str) -> None:
    """min-max keeps the observed range (ratio 1); the least squared error clips it, and the first layer's input
    scales (the same inputs, the embeddings, for both) are that ratio times the min-max ones."""
    import copy

    from conftest import make_model

    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    float_model = make_model("llama")
    models, rows = {}, {}
    for observer in ("minmax", "mse"):
        models[observer] = llmquant.quantize(copy.deepcopy(float_model), {"scheme": scheme,
                                             "activation_observer": observer}, calib=calib, progress=False)
        rows[observer] = [row["input_range_ratio"] for row in models[observer].llmquant_manifest.layers]
    assert all(set(r) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} for r in rows["minmax"])
    assert all(ratio == pytest.approx(1.0) for r in rows["minmax"] for ratio in r.values())
    assert all(0.0 < ratio <= 1.0 for r in rows["mse"] for ratio in r.values())
    assert min(ratio for r in rows["mse"] for ratio in r.values()) < 1.0
    first = {o: m.model.layers[0].self_attn.q_proj.input_scale for o, m in models.items()}
    torch.testing.assert_close(first["mse"], rows["mse"][0]["self_attn.q_proj"] * first["minmax"])


def test_the_eight_seed_rows_resolve_to_the_intended_specs() -> None:
    for name in W8A8_SCHEMES:
        scheme = scheme_from_name(name)
        w, a, kv = scheme.weights, scheme.input_activations, scheme.kv_cache
        assert w.bits == a.bits == 8 and w.symmetric and a.symmetric
        assert w.granularity == ("tensor" if name.startswith("w_int8_per_tensor") else "channel")
        assert a.granularity == ("token" if "a_int8_per_token" in name else "tensor")
        assert a.dynamic == name.endswith("_dynamic")
        if "kv_cache" not in name:
            assert kv is None
        else:
            assert kv.granularity == ("token" if "kv_cache_int8_per_token" in name else "tensor")
            assert kv.dynamic == name.endswith("_dynamic")


def test_pydoc_corpus_is_split_in_halves_of_the_joined_topics() -> None:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    calib, evaluation = data.corpus("pydoc", "calib"), data.corpus("pydoc", "eval")
    assert calib + evaluation == text and len(calib) == len(text) // 2


def test_the_stdlib_corpus_is_split_in_halves_of_its_modules_sources() -> None:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((root / f"{name}.py").read_text(encoding="utf-8") for name in data.STDLIB_MODULES)
    calib, evaluation = data.corpus("stdlib", "calib"), data.corpus("stdlib", "eval")
    assert calib + evaluation == text and len(calib) == len(text) // 2 and len(text) > 1_000_000
    assert "class ArgumentParser" in calib and "def main" in evaluation


def test_calibration_windows_are_seeded_and_eval_windows_consecutive() -> None:
    tokens = torch.arange(10_000)
    a = data.calibration_samples(tokens, 4, 512, seed=3)
    assert torch.equal(a, data.calibration_samples(tokens, 4, 512, seed=3))
    assert not torch.equal(a, data.calibration_samples(tokens, 4, 512, seed=4))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 512)) for row in a)
    windows = data.eval_windows(tokens, 512, max_windows=3)
    assert torch.equal(windows.flatten(), torch.arange(3 * 512))
    assert data.eval_windows(tokens, 512).shape == (19, 512)


def test_a_mixture_draws_as_many_windows_from_each_part_in_turn() -> None:
    """Window k is part k % 2's window k // 2 of that part's own seeded draw, whatever the parts' lengths; the draw
    of n windows starts with the draw of fewer; one part is `calibration_samples` itself."""
    short, long = torch.arange(2_000), torch.arange(100_000, 400_000)
    mixed = data.mixed_calibration_samples([short, long], 7, 64, seed=3)
    assert torch.equal(mixed[0::2], data.calibration_samples(short, 4, 64, seed=3))
    assert torch.equal(mixed[1::2], data.calibration_samples(long, 3, 64, seed=3))
    assert torch.equal(data.mixed_calibration_samples([short, long], 4, 64, seed=3), mixed[:4])
    single = data.mixed_calibration_samples([short], 5, 64, seed=3)
    assert torch.equal(single, data.calibration_samples(short, 5, 64, seed=3))
    one = data.mixed_calibration_samples([short, long, long + 1], 1, 64, seed=3)  # (parts with no window: not drawn)
    assert torch.equal(one, data.calibration_samples(short, 1, 64, seed=3))
    with pytest.raises(LlmquantError, match="part 2 of the calibration mixture has 50 tokens, too short for windows "
                                            "of seqlen 64"):
        data.mixed_calibration_samples([short, torch.arange(50)], 4, 64)


def test_a_mixture_names_its_corpora_joined_by_plus(tmp_path: Path) -> None:
    assert data.corpus_parts("pydoc+stdlib", "eval") == [data.corpus("pydoc", "eval"), data.corpus("stdlib", "eval")]
    assert data.corpus("stdlib+pydoc") == data.corpus("stdlib") + "\n\n" + data.corpus("pydoc")
    assert data.corpus_parts("pydoc") == [data.corpus("pydoc")]
    named = tmp_path / "a+b.txt"  # a file whose name holds a + is that file
    named.write_text("plus")
    assert data.corpus_parts(str(named)) == ["plus"]
    for bad, expected in (("pydoc+", "empty or repeated part"), ("pydoc+pydoc", "empty or repeated part"),
                          ("pydoc+wiki", "unknown corpus 'wiki'.*or corpora joined by '\\+'")):
        with pytest.raises(LlmquantError, match=expected):
            data.corpus_parts(bad)


def test_calibration_on_a_mixture_draws_from_both_corpora(tiny_dir: Path) -> None:
    """The recipe's ``calib.dataset`` pydoc+stdlib: the windows alternate between the two corpora's own draws, and
    the texts given as the parts' (the command line reads them first) draw the same."""
    from transformers import AutoTokenizer

    from llmquant.api import calibration_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    recipe = Recipe.build(scheme="w_int4_per_group_sym", calib={"dataset": "pydoc+stdlib", "samples": 5, "seqlen": 32})
    ids = calibration_ids(recipe, tokenizer)
    pydoc, stdlib = (calibration_ids(recipe.model_copy(update={"calib": recipe.calib.model_copy(
        update={"dataset": name, "samples": count})}), tokenizer) for name, count in (("pydoc", 3), ("stdlib", 2)))
    assert torch.equal(ids[0::2], pydoc) and torch.equal(ids[1::2], stdlib)
    assert torch.equal(calibration_ids(recipe, tokenizer, data.corpus_parts("pydoc+stdlib")), ids)
    with pytest.raises(LlmquantError, match=r"calib is an empty list of texts; allowed: token ids, a text, a "
                                            r"non-empty list") as error:
        calibration_ids(recipe, tokenizer, [])
    assert "\n" not in str(error.value)


def test_local_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    assert data.corpus(str(tmp_path / "a.txt"), "eval") == "hello world"
    assert data.corpus(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    with pytest.raises(LlmquantError, match="must be a JSON object with a 'text' field"):
        data.corpus(str(tmp_path / "c.jsonl"))


@pytest.mark.parametrize(("in_features", "group_size", "expected"),
                         [(576, 128, 64), (1536, 96, 64), (100, 64, 50), (97, 64, 1), (192, 128, 64)])
def test_fitting_group_size(in_features: int, group_size: int, expected: int) -> None:
    from llmquant.recipe import fitting_group_size

    assert fitting_group_size(in_features, group_size) == expected


def test_a_group_size_that_does_not_divide_a_layer_falls_back_loudly_and_in_the_manifest(
    calib_ids: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import make_model
    from llmquant.nn.quant_linear import QuantLinear

    model = make_model("llama")  # hidden 64, intermediate 128: groups of 48 divide neither
    with caplog.at_level("WARNING"):
        llmquant.quantize(model, {"scheme": "w_int4_per_group_sym", "group_size": 48, "algorithm": "gptq"},
                          calib=calib_ids, progress=False)
    assert "group size 48 does not divide the 64 inputs" in caplog.text
    plan = {row["module"]: row for row in model.llmquant_manifest.plan}
    assert plan["model.layers.0.mlp.down_proj"]["group_size_fallback"] == 32  # a power of two in [24, 48)
    assert plan["model.layers.0.self_attn.q_proj"]["group_size_fallback"] == 32
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.weight_spec.group_size == 32


def test_the_recipes_in_configs_load_and_are_what_the_script_writes() -> None:
    module = load_script("make_seed_recipes")
    folder = Path(__file__).parent.parent / "configs" / "recipes"
    expected = module.all_recipes()
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(expected)
    assert len([n for n in expected if n.startswith("seed000__")]) == 24  # 8 rows x 3 columns of seed 000
    for name, fields in expected.items():
        path = folder / f"{name}.yaml"
        assert path.read_text() == module.render(fields)
        assert Recipe.from_file(path).model_dump(exclude_defaults=True) == Recipe.build(**fields).model_dump(
            exclude_defaults=True)


def test_a_recipe_writes_gptq_options_only_when_it_uses_gptq(tmp_path: Path) -> None:
    rtn = Recipe.build(scheme="w_uint4_per_group_asym", group_size=64)
    assert "gptq" not in rtn.model_dump(mode="json")
    gptq = Recipe.build(scheme="w_uint4_per_group_asym", group_size=64, algorithm="gptq",
                        gptq={"true_sequential": False})
    assert gptq.model_dump(mode="json")["gptq"]["true_sequential"] is False
    gptq.to_file(tmp_path / "recipe.yaml")
    assert Recipe.from_file(tmp_path / "recipe.yaml") == gptq


def test_set_fields_changes_nested_fields_and_named_pre_opts_only() -> None:
    base = Recipe.build(pre_opts=[{"name": "quarot"}, {"name": "smoothquant", "alpha": 0.5}]).model_dump()
    settings = ["gptq.asymmetric=0.25", "algorithm=gptq", "pre_opts.smoothquant.alpha=0.8",
                "pre_opts.quarot.rotations=[R2, R4]", "scale_training.samples=12", "calib.samples=8"]
    recipe = Recipe.build(**set_fields(base, settings))
    assert recipe.gptq.asymmetric == 0.25 and recipe.algorithm == "gptq" and recipe.calib.samples == 8
    assert [p.model_dump(exclude_defaults=True) for p in recipe.pre_opts] == [
        {"name": "quarot", "rotations": ["R2", "R4"]}, {"name": "smoothquant", "alpha": 0.8}]
    assert recipe.scale_training is not None and recipe.scale_training.samples == 12
    assert recipe.calib.seqlen == 512 and recipe.scheme == Recipe().scheme  # the rest as it was
    assert base["pre_opts"][1]["alpha"] == 0.5 and "gptq" not in base  # the given fields untouched
    assert Recipe.build(**set_fields(base, ["calib.samples=4", "calib.samples=6"])).calib.samples == 6  # last wins


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("gptq", "--set takes FIELD=VALUE (a dotted field, e.g. gptq.asymmetric=0.35), got 'gptq'"),
        ("calib..samples=1", "--set takes FIELD=VALUE"),
        ("pre_opts.awq.alpha=1", "--set pre_opts.awq: pre_opts has no entry named 'awq'; it has: smoothquant"),
        ("pre_opts.alpha=1", "--set pre_opts.alpha: pre_opts is a list; name one of its entries"),
        ("scheme.bits=4", "--set scheme.bits: scheme is 'w_int8_per_channel_a_int8_per_token_dynamic', not a mapping"),
        ("calib.seed.x=1", "--set calib.seed.x: calib.seed is 0, not a mapping"),
        ("calib.samples=[1", "--set calib.samples: '[1' is not a YAML value (expected ',' or ']'"),
        ("gptqq.alpha=1", "recipe field 'gptqq' = {'alpha': 1}: Extra inputs are not permitted"),
        ("pre_opts.smoothquant.alpha=2", "recipe field 'pre_opts.0.smoothquant.alpha' = 2: alpha must be in [0, 1]"),
    ],
)
def test_set_fields_refuses_in_one_line(setting: str, expected: str) -> None:
    base = Recipe.build(pre_opts=[{"name": "smoothquant"}]).model_dump()
    with pytest.raises(LlmquantError) as err:
        Recipe.build(**set_fields(base, [setting]))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_the_learning_entries_default_to_their_algorithms_defaults() -> None:
    """A recipe's empty `scale_training`, `learn` and `learn_online` entries configure exactly what each
    algorithm's own config does by default: the recipe takes its defaults from there, never a copy."""
    assert ScaleTraining().config() == ScaleTrainingConfig()
    assert LearnRotations().config() == SpinQuantConfig()
    assert LearnOnline().config() == OnlineLearningConfig()


@pytest.mark.parametrize(("recipe", "samples"), [
    ({"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic"}, 0),
    ({"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "kv_cache": "int8_per_token"}, 0),
    ({"scheme": "w_uint4_per_group_asym", "group_size": 32}, 0),
    ({"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "calib": {"samples": 5}}, 5),
    ({"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static"}, 32),
    ({"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "kv_cache": "fp8_per_tensor"}, 32),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "algorithm": "gptq"}, 32),
    ({"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "pre_opts": [{"name": "quarot"}]}, 32),
    ({"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "clip_search": {}}, 32),
])
def test_calibration_samples_default_to_what_the_recipe_needs(recipe: dict, samples: int) -> None:
    """``calib.samples`` not given: 32 where the recipe needs samples (what it learns, a rotation's check, a clip
    search), none where it does not; a given count is kept; the recipe's dump keeps it not given."""
    built = Recipe.build(**recipe)
    assert built.calibration_samples() == samples and built.drawn_samples() == samples
    assert Recipe.build(**built.model_dump()).calibration_samples() == samples
    assert (built.calib.samples is None) == ("calib" not in recipe)


@pytest.mark.parametrize(("recipe", "propagation"), [
    ({"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static"}, "float"),
    ({"scheme": "w_int8_per_channel_a_int8_per_tensor_static", "pre_opts": [{"name": "smoothquant", "alpha": 0.85}]},
     "float"),
    ({"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "kv_cache": "fp8_per_tensor"}, "float"),
    ({"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static", "calib": {"propagate": "quantized"}}, "quantized"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "algorithm": "gptq"}, "quantized"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "algorithm": "awq"}, "quantized"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "algorithm": "gptq", "calib": {"propagate": "float"}},
     "float"),
    ({"scheme": "w_int4_per_group_sym", "group_size": 32, "block_training": {}}, "quantized"),
    ({"scheme": "w_int8_per_channel_a_int8_per_token_dynamic",
      "pre_opts": [{"name": "quarot", "learn_online": {"iterations": 2}}]}, "quantized"),
])
def test_propagation_defaults_to_quantized_only_where_a_step_fits_the_layer(recipe: dict, propagation: str) -> None:
    """``calib.propagate`` not given: the quantized layer's outputs feed the next layer where a step fits the layer to
    the inputs it will see (GPTQ, AWQ, block training, learned online rotations), the float layer's otherwise."""
    built = Recipe.build(**recipe)
    assert built.propagation() == propagation
    assert (built.calib.propagate is None) == ("propagate" not in recipe.get("calib", {}))

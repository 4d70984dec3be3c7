"""Write configs/recipes/*.yaml: one recipe for every row of the seed documents' tables, and the best
recipes found on the default model (best_*.yaml, see BENCHMARKS.md).

    .venv/bin/python scripts/make_seed_recipes.py [--out configs/recipes]

- seed 000 (W8A8 strategies): the eight schemes x {Smooth alpha 0.85, Smooth alpha 0.5,
  Smooth_fc_fc alpha 0.5 + Rotation};
- seed 001 (Neural Compressor SmoothQuant): alpha 0.5 and auto on the default W8A8 per-tensor static;
- seed 002 (AWQ / GPTQ notes): W4 group 128 by AWQ and by GPTQ (576 inputs fall back to groups of 64);
- seed 003 (QuaRot): w_int8_per_tensor weight-only with and without R1+R2, W8A8 per-tensor static with
  and without QuaRot.

Each file is a plain recipe: `llmquant quantize --config configs/recipes/NAME.yaml --output DIR`.
tests/test_recipe_and_data.py checks that the committed files are what this script writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from llmquant.quant.scheme import W8A8_SCHEMES
from llmquant.sweep import BUILTIN_METHODS, DEFAULT_METHODS

SEED_000_METHODS = {name: BUILTIN_METHODS[name] for name in DEFAULT_METHODS}  # the seed's three columns
STATIC = "w_int8_per_channel_a_int8_per_tensor_static"
W4A4_ASYMMETRIC_INPUTS = "w_int4_per_channel_sym_a_uint4_per_token_asym_dynamic"
W4A4_WEIGHT_GROUPS_TOKEN_INPUTS = "w_int4_per_group_sym_a_uint4_per_token_asym_dynamic"
W4A4_GROUPED_INPUTS = "w_int4_per_channel_sym_a_uint4_per_group_asym_dynamic"
W4A4_WEIGHT_AND_INPUT_GROUPS = "w_int4_per_group_sym_a_uint4_per_group_asym_dynamic"
# every weight's scales trained end to end on the 128 calibration windows and 128 more (`scale_training`)
SCALE_TRAINING = {"epochs": 1, "lr": 0.001, "holdout": 8, "loss": "kl", "samples": 256}


def seed_recipes() -> dict[str, dict[str, Any]]:
    """File name (without .yaml) -> recipe fields."""
    recipes: dict[str, dict[str, Any]] = {}
    for scheme in W8A8_SCHEMES:
        for method, pre_opts in SEED_000_METHODS.items():
            recipes[f"seed000__{scheme}__{method}"] = {"scheme": scheme, "pre_opts": pre_opts}
    for alpha in (0.5, "auto"):
        recipes[f"seed001__smoothquant_{alpha}"] = {"scheme": STATIC, "pre_opts": [{"name": "smoothquant",
                                                                                       "alpha": alpha}]}
    for algorithm in ("awq", "gptq"):
        recipes[f"seed002__w4_g128_{algorithm}"] = {"scheme": "w_int4_per_group_sym", "group_size": 128,
                                                     "algorithm": algorithm}
    recipes["seed003__w_int8_per_tensor"] = {"scheme": "w_int8_per_tensor"}
    recipes["seed003__w_int8_per_tensor__quarot_r1_r2"] = {
        "scheme": "w_int8_per_tensor", "pre_opts": [{"name": "quarot", "online_had": False}]}
    recipes["seed003__w_int8_a_int8_per_tensor_static"] = {"scheme": "w_int8_per_tensor_a_int8_per_tensor_static"}
    recipes["seed003__w_int8_a_int8_per_tensor_static__quarot"] = {
        "scheme": "w_int8_per_tensor_a_int8_per_tensor_static", "pre_opts": [{"name": "quarot"}]}
    return recipes


def best_recipes() -> dict[str, dict[str, Any]]:
    """The best recipes found on the default model (BENCHMARKS.md), one per kind of deployment. Since 2026-11-30
    all but the per-token W8A8 one (`make run`, where it gains 0.04% for three times the time) take GPTAQ
    (``gptq: {asymmetric: A}``, GPTQ aimed at the float model's output, true-sequential Hessians), which
    measured better in each (BENCHMARKS.md, "GPTAQ"); the low-bit ones calibrate on 128 samples, where GPTAQ
    gains more (BENCHMARKS.md, "More calibration samples, MSE ranges and fixed clip ratios")."""
    token = "w_int8_per_channel_a_int8_per_token_dynamic"
    best_w4a4kv4 = {"scheme": W4A4_ASYMMETRIC_INPUTS, "kv_cache": "int4_per_token_asym",
                    "algorithm": "gptq", "gptq": {"asymmetric": 0.25, "quantized_inputs": True},
                    "weight_observer": "mse",
                    "pre_opts": [{"name": "quarot", "rotations": ["R2", "R3", "R4", "R5", "R6"]},
                                 {"name": "smoothquant", "alpha": "auto"}],
                    "activation_clip_grid": [0.9, 0.85, 0.8, 0.75, 0.7], "kv_cache_center_keys": True,
                    "calib": {"samples": 128}}
    groups32 = {**best_w4a4kv4, "scheme": W4A4_GROUPED_INPUTS, "group_size": 32,
                "activation_clip_grid": [1.0, 0.95, 0.9, 0.85, 0.8], "kv_cache_keep_first": 1}
    wgroups16_kv16 = {**groups32, "scheme": W4A4_WEIGHT_AND_INPUT_GROUPS, "group_size": 16,
                      "kv_cache": "int4_per_token_group16_asym", "gptq": {**groups32["gptq"], "asymmetric": 0.35}}
    return {
        # R1+R2 offline, R4 online (vLLM reads it from transform_config), plain GPTQ with Hessians from the float
        # layer: x1.0018 in 97 s. GPTAQ gives x1.0014 in about three times the time: `make run` keeps this one
        "best_w8a8_per_token": {"scheme": token, "algorithm": "gptq", "gptq": {"true_sequential": False},
                                "pre_opts": [{"name": "quarot", "rotations": ["R1", "R2", "R4"]}]},
        # R2 offline, R4 and R6 online (all three read by vLLM), every group smoothed (alpha searched) before the
        # online rotations, the same GPTQ: x1.0015 (stdlib x1.0010) against the recipe above's x1.0023 (x1.0023) on
        # the same machine (Xeon, 12-01); slower (the alpha search, two more online rotations a layer)
        "best_w8a8_per_token_smoothrot": {"scheme": token, "algorithm": "gptq", "gptq": {"true_sequential": False},
                                          "pre_opts": [{"name": "quarot", "rotations": ["R2", "R4", "R6"]},
                                                       {"name": "smoothquant", "alpha": "auto"}]},
        # GPTAQ, true-sequential Hessians: x1.0195, below plain GPTQ's x1.0249 (Hessians from the float layer)
        "best_w8a8_per_tensor_static": {"scheme": STATIC, "algorithm": "gptq", "gptq": {"asymmetric": 0.25},
                                        "pre_opts": [{"name": "smoothquant", "alpha": "auto"}]},
        # FP8 per tensor, static inputs: R2 offline, R4 and R6 online, each group smoothed before its rotation, GPTAQ
        # on the E4M3-rounded inputs' Hessians, 128 samples, and each static input scale at the least squared error of
        # its calibration sample (`activation_observer: mse`): x1.0067 (stdlib x1.0118) on an AVX2 EPYC, against
        # x1.0101 (x1.0165) with min-max input scales and x1.0110 (x1.0189) without the rotations and smoothing
        "best_fp8_per_tensor_static": {"scheme": "w_fp8_per_tensor_a_fp8_per_tensor_static", "algorithm": "gptq",
                                       "gptq": {"true_sequential": False, "asymmetric": 0.25,
                                                "quantized_inputs": True},
                                       "pre_opts": [{"name": "quarot", "rotations": ["R2", "R4", "R6"]},
                                                    {"name": "smoothquant", "alpha": "auto"}],
                                       "activation_observer": "mse", "calib": {"samples": 128}},
        # FP8 per channel / per token: GPTQ on the E4M3 grid, then every weight's scales trained end to end against the
        # float model's next-token distribution (`scale_training`) on the 32 calibration windows and 480 more, Adam's
        # step 2e-3: x1.0017 (stdlib x1.0079) on a Xeon with AMX (12-07), against x1.0039 (x1.0102) on 256 windows and
        # x1.0123 (x1.0132) untrained there, where E4M3 inputs alone (float weights) cost x1.0093: BENCHMARKS.md "FP8
        # per token, trained end to end"
        "best_fp8_per_token_trained": {"scheme": "w_fp8_per_channel_a_fp8_per_token_dynamic", "algorithm": "gptq",
                                       "scale_training": {**SCALE_TRAINING, "lr": 0.002, "samples": 512}},
        # GPTAQ (GPTQ aimed at the float model's output) with true-sequential Hessians, alpha 0.5, on 128 samples:
        # x1.0288, against x1.0324 on 32 samples (x1.0356 at alpha 0.25), plain GPTQ's x1.0628 (true-sequential) and
        # x1.0538 (Hessians from the float layer, the recipe before 11-30)
        "best_w4_g64": {"scheme": "w_uint4_per_group_asym", "group_size": 64, "algorithm": "gptq",
                        "gptq": {"asymmetric": 0.5}, "weight_observer": "mse",
                        "pre_opts": [{"name": "quarot", "rotations": ["R1", "R2"], "online_had": False}],
                        "calib": {"samples": 128}},
        # QuaRot R1-R4 + GPTAQ alpha 0.5 on 128 samples, then each layer's scales and codes trained against the float
        # model's output of the layer (block training, `target: model`): x1.0902 (stdlib x1.2464) on a Xeon with AMX
        # (12-07), against x1.1174 (x1.2927) there without block training (x1.1287 / x1.2937 on an EPYC, 11-30),
        # x1.164 on 32 samples and plain GPTQ's x1.390 (R3/R4 online: llmquant's runtime; vLLM cannot run R3)
        "best_w3_g64": {"scheme": "w_uint3_per_group_asym", "group_size": 64, "algorithm": "gptq",
                        "gptq": {"asymmetric": 0.5}, "pre_opts": [{"name": "quarot"}], "calib": {"samples": 128},
                        "block_training": {"epochs": 1, "lr": 0.01, "codes_lr": 0.02, "holdout": 8,
                                           "target": "model"}},
        # MSE weight ranges, GPTAQ alpha 0.5 on the Hessians of the int8 activations clipped at 0.95 from the start,
        # 128 samples: x1.0242 (stdlib x1.0571), against x1.0507 with alpha 0.25, min-max ranges and the clip search
        "best_w4a8_g64": {"scheme": "w_int4_per_group_sym_a_int8_per_token_dynamic", "group_size": 64,
                          "algorithm": "gptq", "gptq": {"asymmetric": 0.5, "quantized_inputs": True},
                          "weight_observer": "mse", "pre_opts": [{"name": "quarot"}], "activation_clip": 0.95,
                          "calib": {"samples": 128}},
        # R6 in place of R1 (online Hadamards before the readers of every norm), R5 (before o_proj) too, and every group
        # smoothed (alpha searched) before its online rotation (SmoothRot's order); GPTAQ on the Hessians of the
        # quantized activations (clipped as below from the start); MSE weight ranges; the keys centred (their calibrated
        # mean subtracted before the 4-bit KV cache quantizes them); asymmetric 4-bit inputs (a zero point per token, as
        # SpinQuant's evaluation quantizes them), each token's clip ratio chosen at run time from 0.9 .. 0.7 by least
        # squared error; 128 samples: x1.2075 (stdlib x1.2983) on an AVX2 EPYC, x1.2099 (x1.3138) there without R5 and
        # x1.2232 (x1.3274) with every input clipped at 0.8 instead; on an AVX512 EPYC the 0.8 recipe gave x1.2089
        # (x1.3244), against x1.2311 (x1.3597) with symmetric inputs and x1.2192 (x1.3296) with symmetric inputs and
        # down_proj's clipped at 0.7 (with asymmetric inputs that clip gives x1.2450); x1.2754 (x1.3935) without centred
        # keys, x1.3270 (x1.4672) with min-max weight ranges too and x1.4931 (x1.7283) for QuaRot R1-R4
        "best_w4a4kv4": best_w4a4kv4,
        # the same, then every weight's scales trained end to end (as `best_w4a4kv4_token_wgroups32_trained` below)
        # with Adam's step 2e-3: x1.1138 (stdlib x1.2197) on a Xeon with AMX (12-06, a sixth session), x1.1250
        # (x1.2324) with 1e-3 there, against x1.2068 (x1.2941) untrained on an AVX512-VNNI EPYC (12-05) and x1.1804
        # (x1.2761) trained with the gradient stopped at the attention (before commit af2eef6): BENCHMARKS.md "Scale
        # training with the gradient through the attention"
        "best_w4a4kv4_trained": {**best_w4a4kv4, "scale_training": {**SCALE_TRAINING, "lr": 0.002}},
        # the same with the weight in groups of 32 (int4 symmetric, a scale per output and group: 0.5 bits a weight),
        # the inputs still per token and the KV cache per token and head: x1.1874 (stdlib x1.2625) against x1.2068
        # (x1.2941) with the weight per channel on the same AVX512-VNNI EPYC (12-05)
        "best_w4a4kv4_token_wgroups32": {**best_w4a4kv4, "scheme": W4A4_WEIGHT_GROUPS_TOKEN_INPUTS, "group_size": 32},
        # the same, then every weight's scales trained end to end against the float model's next-token distribution
        # (`scale_training`, EfficientQAT's E2E-QP with a KL loss) on the 128 calibration windows and 128 more drawn
        # after them: x1.0796 (stdlib x1.1898) on a Xeon with AMX, x1.1247 (x1.2193) there with the gradient stopped
        # at the attention: BENCHMARKS.md "The weights' scales trained end to end" (12-05, a seventh session), "Scale
        # training on more samples than calibrate" (12-06) and "Scale training with the gradient through the attention"
        "best_w4a4kv4_token_wgroups32_trained": {
            **best_w4a4kv4, "scheme": W4A4_WEIGHT_GROUPS_TOKEN_INPUTS, "group_size": 32,
            "scale_training": SCALE_TRAINING},
        # the same with the KV cache per token in groups of 16 channels of a head (1.25 bits a cached value of scales
        # and zero points, 0.31 per head): x1.1141 (stdlib x1.2131) on a Xeon with AMX, against x1.1247 (x1.2193)
        # with the cache per head there, both with the gradient stopped at the attention (before commit af2eef6; not
        # measured since), and x1.1817 (x1.2458) untrained on an AVX512-VNNI EPYC (12-05): BENCHMARKS.md "Scale
        # training for the weight per channel"
        "best_w4a4kv4_token_wgroups32_kv16_trained": {
            **best_w4a4kv4, "scheme": W4A4_WEIGHT_GROUPS_TOKEN_INPUTS, "group_size": 32,
            "kv_cache": "int4_per_token_group16_asym", "scale_training": SCALE_TRAINING},
        # the same with each token's inputs in groups of 32 (a scale and zero point per group) and the clip grid
        # 1.0 .. 0.8: x1.1393 (stdlib x1.1909) on an AVX2 EPYC, x1.1381 (x1.2100) before the group products took a
        # kernel's order (float rounding apart, the same function); in groups of 64 without R5 x1.1524 (x1.2193),
        # against x1.2075 (x1.2983) per token
        "best_w4a4kv4_groups32": groups32,
        # the same with the weight in the inputs' groups of 32 too (a scale per output and group): x1.1104 (stdlib
        # x1.1685) against x1.1280 (x1.2039) on an AVX2 EPYC; both in groups of 64 x1.1337 (x1.2090)
        "best_w4a4kv4_wgroups32": {**groups32, "scheme": W4A4_WEIGHT_AND_INPUT_GROUPS},
        # the same in groups of 16 (weight and inputs), the KV cache per token in groups of 16 channels of a head,
        # GPTAQ's alpha 0.35: x1.0727 (stdlib x1.1165) on an AVX512-VNNI EPYC, against x1.0829 (x1.1236) at 0.25,
        # x1.0728 (x1.1210) at 0.3 and x1.0705 (x1.1177) at 0.4 there (12-05); groups of 32 with that KV cache at
        # 0.25 x1.1047 (x1.1551)
        "best_w4a4kv4_wgroups16_kv16": wgroups16_kv16,
        # the same, then every weight's scales trained end to end: x1.0199 (stdlib x1.0884) on a Xeon with AMX, x1.0436
        # (x1.0986) there with the gradient stopped at the attention (before commit af2eef6), against x1.0727
        # (x1.1165) untrained on an AVX512-VNNI EPYC (12-05): BENCHMARKS.md "Scale training on a saved checkpoint"
        "best_w4a4kv4_wgroups16_kv16_trained": {**wgroups16_kv16, "scale_training": SCALE_TRAINING},
    }


def fast_recipes() -> dict[str, dict[str, Any]]:
    """Recipes chosen for the int8 runtime's speed (BENCHMARKS.md, "Runtimes")."""
    return {
        # W8A8 per token with the head quantized too, weight-only int8 in groups of 32 (W8A16; the head is a decode
        # step's largest product): decode 1.85x / 1.56x float32 on 1 / 2 threads against 1.58x / 1.41x with a float
        # head. The default model's head is int8 in groups of 32 already (its GGUF's Q8_0): no perplexity lost
        "fast_w8a8_per_token_int8_head": {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "ignore": [],
                                          "overrides": [{"targets": ["lm_head"], "scheme": "w_int8_per_group_sym",
                                                         "group_size": 32}]},
    }


def all_recipes() -> dict[str, dict[str, Any]]:
    return seed_recipes() | best_recipes() | fast_recipes()


def render(fields: dict[str, Any]) -> str:
    return yaml.safe_dump(fields, sort_keys=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="configs/recipes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipes = all_recipes()
    for name, fields in recipes.items():
        (out / f"{name}.yaml").write_text(render(fields))
    print(f"wrote {len(recipes)} recipes to {out}")


if __name__ == "__main__":
    main()

"""Transformers families beyond the tests' matrix (`llmquant.testing.tiny_models`), tried as a new user would: a tiny
random config of each, quantized by five recipes, the logits' relative error to float printed, or the one-line
refusal. Failures that are not an `LlmquantError` (a traceback) are bugs; a refusal names what does not fit.

    .venv/bin/python scripts/family_sweep.py [FAMILY ...]

Recipes: W8A8 per token (round to nearest); SmoothQuant 0.5 and QuaRot R1-R4 with ``--scheme none`` (the float
function must be kept: errors near 1e-7); W4 g16 GPTQ; W8A8 with an INT8 KV cache per token. ``[not quantizable N]``:
weights left float with their reason in the manifest (`llmquant.model.model_map.not_quantizable`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

import llmquant
from llmquant.errors import LlmquantError
from llmquant.testing.tiny_models import ATTENTION, MOE, VOCAB, fields

ROOT = Path(__file__).resolve().parents[1]

IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _config(name: str, **extra: object) -> Callable[[], transformers.PretrainedConfig]:
    return lambda: getattr(transformers, name)(**fields(**extra))


CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "smollm3": _config("SmolLM3Config", **ATTENTION, **IDS),
    "glm4": _config("Glm4Config", **ATTENTION, head_dim=16, **IDS),
    "ministral": _config("MinistralConfig", **ATTENTION, sliding_window=16, head_dim=16,
                         layer_types=["sliding_attention", "full_attention"]),
    "exaone4": _config("Exaone4Config", **ATTENTION, sliding_window=16),
    "seed_oss": _config("SeedOssConfig", **ATTENTION, head_dim=16),
    "apertus": _config("ApertusConfig", **ATTENTION),
    "olmo3": _config("Olmo3Config", **ATTENTION, **IDS),
    "phi": _config("PhiConfig", intermediate_size=128, num_attention_heads=4, partial_rotary_factor=0.5),
    "starcoder2": _config("Starcoder2Config", **ATTENTION),
    "stablelm": _config("StableLmConfig", **ATTENTION),
    "nemotron": _config("NemotronConfig", **ATTENTION, head_dim=16),
    "gptj": lambda: transformers.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                            n_positions=128),
    "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                         n_positions=128),
    "bloom": lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
    "mpt": lambda: transformers.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "deepseek_v2": _config("DeepseekV2Config", **MOE, n_routed_experts=4, moe_intermediate_size=32,
                           n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "glm4_moe": _config("Glm4MoeConfig", **MOE, n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16),
    "dots1": _config("Dots1Config", **MOE, n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16),
    "ernie4_5_moe": _config("Ernie4_5_MoeConfig", **MOE, moe_num_experts=4, moe_intermediate_size=32, moe_k=2,
                            moe_layer_start_index=0, head_dim=16),
    "granitemoe": _config("GraniteMoeConfig", **MOE, num_local_experts=4),
    "granitemoeshared": _config("GraniteMoeSharedConfig", **MOE, num_local_experts=4, shared_intermediate_size=64),
    "phimoe": _config("PhimoeConfig", **MOE, num_local_experts=4),
    "flex_olmo": _config("FlexOlmoConfig", **MOE, num_experts=4, **IDS),
    "minimax": _config("MiniMaxConfig", **MOE, num_local_experts=4, head_dim=16,
                       layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_moe": _config("Qwen3_5MoeTextConfig", **MOE, num_experts=4, moe_intermediate_size=32,
                           shared_expert_intermediate_size=64, head_dim=16,
                           layer_types=["linear_attention", "full_attention"]),
    "falcon_h1": _config("FalconH1Config", **ATTENTION, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                         mamba_d_state=8, mamba_n_groups=1),
    "jamba": _config("JambaConfig", **MOE, num_experts=4, attn_layer_period=2, attn_layer_offset=1,
                     expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, use_mamba_kernels=False),
    "mamba2": lambda: transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=8,
                                                head_dim=16, state_size=8, n_groups=1),
}
RECIPES = {
    "W8A8": {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic"},
    "SmoothQuant (float)": {"scheme": "none", "pre_opts": [{"name": "smoothquant", "alpha": 0.5}]},
    "QuaRot (float)": {"scheme": "none", "pre_opts": [{"name": "quarot"}]},
    "W4 GPTQ": {"scheme": "w_int4_per_group_sym", "group_size": 16, "algorithm": "gptq"},
    "INT8 KV": {"scheme": "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic"},
}


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


def outcome(family: str, recipe: dict, ids: torch.Tensor, reference: torch.Tensor) -> str:
    try:
        model = llmquant.quantize(_model(family), recipe, calib=ids, progress=False)
    except LlmquantError as err:
        return f"refused: {err}"
    with torch.no_grad():
        logits = model(ids[:2], use_cache=False).logits
    error = float((logits - reference).norm() / reference.norm())
    floating = model.llmquant_manifest.results.get("not_quantizable") or {}
    return f"{error:.1e}" + (f" [not quantizable {len(floating)}]" if floating else "")


def main(families: list[str]) -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    print("| family | " + " | ".join(RECIPES) + " |")
    print("|---" * (len(RECIPES) + 1) + "|")
    for family in families or list(CONFIGS):
        with torch.no_grad():
            reference = _model(family)(ids[:2], use_cache=False).logits
        cells = [outcome(family, recipe, ids, reference) for recipe in RECIPES.values()]
        print(f"| {family} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

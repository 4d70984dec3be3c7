"""Tiny random models built from transformers configs (seconds to build, no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

VOCAB = 128


def _common(**extra: object) -> dict:
    return {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 128, **extra}


CONFIGS = {
    "llama": lambda: LlamaConfig(
        **_common(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    "qwen2": lambda: Qwen2Config(
        **_common(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    ),
    "mistral": lambda: MistralConfig(
        **_common(intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, sliding_window=None)
    ),
    "opt": lambda: OPTConfig(
        **_common(ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64, do_layer_norm_before=True)
    ),
}


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32).eval()
    with torch.no_grad():  # a few outlier input channels, as real LLM activations have
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm.weight" in name:
                param.mul_(1.0 + 4.0 * (torch.rand_like(param) > 0.95))
    return model


@pytest.fixture(params=["llama", "qwen2", "opt"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def eval_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def relative_error(reference: torch.Tensor, actual: torch.Tensor) -> float:
    return float((actual - reference).norm() / reference.norm())

"""Tiny random models built from transformers configs (seconds to build, no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["LLMQUANT_DEVICE"] = "cpu"  # "auto" is the CPU in the suite, GPU or not: tests/test_devices.py names devices

import torch

if not torch.cuda.is_available():  # Triton kernels, where Triton is installed, run in its interpreter (read once)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from llmquant.data import pydoc_text
from tiny_checkpoint import write_tiny_checkpoint

VOCAB = 128
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # what device-sensitive tests run on


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
_ATTENTION = {"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
_MOE = {**_ATTENTION, "num_experts_per_tok": 2}
FAMILIES = {  # the family x method matrix (tests/test_families.py): a tiny random config of each
    **CONFIGS,
    "qwen3": lambda: transformers.Qwen3Config(**_common(**_ATTENTION, head_dim=16)),  # q/k norms
    "gemma": lambda: transformers.GemmaConfig(**_common(**_ATTENTION, head_dim=16)),  # (1 + w) norms
    "gemma2": lambda: transformers.Gemma2Config(**_common(**_ATTENTION, head_dim=16, sliding_window=16)),
    "gemma3": lambda: transformers.Gemma3TextConfig(**_common(**_ATTENTION, head_dim=16, sliding_window=16)),
    "phi3": lambda: transformers.Phi3Config(**_common(**_ATTENTION, pad_token_id=0)),  # fused qkv, gate_up
    "olmo2": lambda: transformers.Olmo2Config(**_common(**_ATTENTION)),  # norms after the sub-layers
    "granite": lambda: transformers.GraniteConfig(**_common(**_ATTENTION, embedding_multiplier=2.0,
                                                            residual_multiplier=0.5, attention_multiplier=0.3,
                                                            logits_scaling=2.0)),
    "gptneox": lambda: transformers.GPTNeoXConfig(**_common(intermediate_size=128, num_attention_heads=4)),
    # mixture of experts (4 experts, 2 chosen a token; fused 3-D expert weights in transformers 5)
    "mixtral": lambda: transformers.MixtralConfig(**_common(**{**_MOE, "intermediate_size": 32}, num_local_experts=4)),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_common(**_MOE, num_experts=4, moe_intermediate_size=32,
                                                               shared_expert_intermediate_size=96)),  # shared expert
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_common(**_MOE, num_experts=4, moe_intermediate_size=32,
                                                               head_dim=16)),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(**_common(  # a dense first layer, MLA, a shared expert
        **_MOE, n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
        n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16)),
    "olmoe": lambda: transformers.OlmoeConfig(**_common(**_MOE, num_experts=4, pad_token_id=0, eos_token_id=1)),
    "gpt_oss": lambda: transformers.GptOssConfig(**_common(  # transposed experts, gate/up alternating, biases, a
        **_MOE, num_local_experts=4, head_dim=16, sliding_window=16,  # clamped SwiGLU; attention sinks
        layer_types=["sliding_attention", "full_attention"], rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 150000.0})),
}
FAMILIES["cohere2"] = lambda: transformers.Cohere2Config(**_common(**_ATTENTION, sliding_window=16))  # eps named
FAMILIES["lfm2"] = lambda: transformers.Lfm2Config(**_common(  # variance_epsilon; LFM2: convolution layers first
    **_ATTENTION, layer_types=["conv", "full_attention"]))
FAMILIES["qwen3_next"] = lambda: transformers.Qwen3NextConfig(**_common(  # linear attention (gated norm), then
    **_MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, head_dim=16,  # gated
    layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,  # full
    linear_key_head_dim=16, linear_value_head_dim=16))  # attention; experts with a shared one and its gate
FAMILIES["hunyuan_v1_moe"] = lambda: transformers.HunYuanMoEV1Config(**_common(  # the router: a Linear in a module
    **_MOE, num_experts=4, moe_topk=2, head_dim=16))
FAMILIES["falcon"] = lambda: transformers.FalconConfig(  # attention in its own code (reads the name "sdpa"),
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
    new_decoder_architecture=False, parallel_attn=True)  # parallel attention and MLP, Linears subclassed
FAMILIES["jamba"] = lambda: transformers.JambaConfig(**_common(  # Mamba and attention layers of two classes; the
    **_MOE, num_experts=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,  # mixer reads
    expert_layer_offset=1, mamba_d_state=8, use_mamba_kernels=False))  # dt_proj.weight itself: it stays float
FAMILIES["bloom"] = lambda: transformers.BloomConfig(  # a LayerNorm between the embeddings and the first layer,
    vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)  # ALiBi attention in its own code
FAMILIES["falcon_h1"] = lambda: transformers.FalconH1Config(**_common(  # Mamba mixer beside the attention; the
    **_ATTENTION, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,  # norm's output times a
    mamba_n_groups=1, attention_in_multiplier=0.5))  # multiplier before q/k/v
FAMILIES["llama4"] = lambda: transformers.Llama4TextConfig(**_common(  # its experts take no routing arguments
    **_ATTENTION, intermediate_size_mlp=128, num_local_experts=4, head_dim=16, num_experts_per_tok=1,  # and its
    moe_layers=[0, 1], no_rope_layers=[1, 1], attention_chunk_size=64))  # router returns a tuple: both stay float
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss", "qwen3_next", "hunyuan_v1_moe"]


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32).eval()
    with torch.no_grad():  # a few outlier input channels, as real LLM activations have
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm.weight" in name:
                if not param.any():  # a gain stored as an offset from one (Gemma: 1 + w, w = 0 at init)
                    param.uniform_(-0.5, 0.5)
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
    """The model's logits for ``ids`` (moved to the model's device), on the CPU."""
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device), use_cache=False).logits.cpu()


def relative_error(reference: torch.Tensor, actual: torch.Tensor) -> float:
    return float((actual - reference).norm() / reference.norm())


@pytest.fixture(autouse=True)
def one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads and stall when the 2 cores are busy: unit tests run
    on one thread; the real-model tests (marked slow) keep torch's default."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint with a real (tiny) tokenizer, for command-line tests."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local .txt corpus (the start of pydoc): calibration and evaluation both read the whole file."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(pydoc_text()[:40000])
    return path

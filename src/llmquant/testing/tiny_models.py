"""Tiny random models of many transformers families, built from their configs in seconds with no download.

The test suite's family x method matrix and the scripts that sweep families (scripts/family_matrix.py,
kv_attention_families.py) build their models here: hidden size 64, two layers, a vocabulary of `VOCAB`, and a few
outlier norm gains so that smoothing and rotations have something to do.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

VOCAB = 128


def fields(**extra: object) -> dict:
    return {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 128, **extra}


CONFIGS = {
    "llama": lambda: LlamaConfig(
        **fields(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ),
    "qwen2": lambda: Qwen2Config(
        **fields(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    ),
    "mistral": lambda: MistralConfig(
        **fields(intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, sliding_window=None)
    ),
    "opt": lambda: OPTConfig(
        **fields(ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64, do_layer_norm_before=True)
    ),
}
ATTENTION = {"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
MOE = {**ATTENTION, "num_experts_per_tok": 2}
FAMILIES = {  # the family x method matrix (tests/test_families.py): a tiny random config of each
    **CONFIGS,
    "qwen3": lambda: transformers.Qwen3Config(**fields(**ATTENTION, head_dim=16)),  # q/k norms
    "gemma": lambda: transformers.GemmaConfig(**fields(**ATTENTION, head_dim=16)),  # (1 + w) norms
    "gemma2": lambda: transformers.Gemma2Config(**fields(**ATTENTION, head_dim=16, sliding_window=16)),
    "gemma3": lambda: transformers.Gemma3TextConfig(**fields(**ATTENTION, head_dim=16, sliding_window=16)),
    "phi3": lambda: transformers.Phi3Config(**fields(**ATTENTION, pad_token_id=0)),  # fused qkv, gate_up
    "olmo2": lambda: transformers.Olmo2Config(**fields(**ATTENTION)),  # norms after the sub-layers
    "granite": lambda: transformers.GraniteConfig(**fields(**ATTENTION, embedding_multiplier=2.0,
                                                            residual_multiplier=0.5, attention_multiplier=0.3,
                                                            logits_scaling=2.0)),
    "gptneox": lambda: transformers.GPTNeoXConfig(**fields(intermediate_size=128, num_attention_heads=4)),
    # mixture of experts (4 experts, 2 chosen a token; fused 3-D expert weights in transformers 5)
    "mixtral": lambda: transformers.MixtralConfig(**fields(**{**MOE, "intermediate_size": 32}, num_local_experts=4)),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**fields(**MOE, num_experts=4, moe_intermediate_size=32,
                                                               shared_expert_intermediate_size=96)),  # shared expert
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**fields(**MOE, num_experts=4, moe_intermediate_size=32,
                                                               head_dim=16)),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(**fields(  # a dense first layer, MLA, a shared expert
        **MOE, n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
        n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16)),
    "olmoe": lambda: transformers.OlmoeConfig(**fields(**MOE, num_experts=4, pad_token_id=0, eos_token_id=1)),
    "gpt_oss": lambda: transformers.GptOssConfig(**fields(  # transposed experts, gate/up alternating, biases, a
        **MOE, num_local_experts=4, head_dim=16, sliding_window=16,  # clamped SwiGLU; attention sinks
        layer_types=["sliding_attention", "full_attention"], rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 150000.0})),
}
FAMILIES["cohere2"] = lambda: transformers.Cohere2Config(**fields(**ATTENTION, sliding_window=16))  # eps named
FAMILIES["lfm2"] = lambda: transformers.Lfm2Config(**fields(  # variance_epsilon; LFM2: convolution layers first
    **ATTENTION, layer_types=["conv", "full_attention"]))
FAMILIES["qwen3_next"] = lambda: transformers.Qwen3NextConfig(**fields(  # linear attention (gated norm), then
    **MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, head_dim=16,  # gated
    layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,  # full
    linear_key_head_dim=16, linear_value_head_dim=16))  # attention; experts with a shared one and its gate
FAMILIES["hunyuan_v1_moe"] = lambda: transformers.HunYuanMoEV1Config(**fields(  # the router: a Linear in a module
    **MOE, num_experts=4, moe_topk=2, head_dim=16))
FAMILIES["falcon"] = lambda: transformers.FalconConfig(  # attention in its own code (reads the name "sdpa"),
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
    new_decoder_architecture=False, parallel_attn=True)  # parallel attention and MLP, Linears subclassed
FAMILIES["jamba"] = lambda: transformers.JambaConfig(**fields(  # Mamba and attention layers of two classes; the
    **MOE, num_experts=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,  # mixer reads
    expert_layer_offset=1, mamba_d_state=8, use_mamba_kernels=False))  # dt_proj.weight itself: it stays float
FAMILIES["bloom"] = lambda: transformers.BloomConfig(  # a LayerNorm between the embeddings and the first layer,
    vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)  # ALiBi attention in its own code
FAMILIES["falcon_h1"] = lambda: transformers.FalconH1Config(**fields(  # Mamba mixer beside the attention; the
    **ATTENTION, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,  # norm's output times a
    mamba_n_groups=1, attention_in_multiplier=0.5))  # multiplier before q/k/v
FAMILIES["llama4"] = lambda: transformers.Llama4TextConfig(**fields(  # its experts take no routing arguments
    **ATTENTION, intermediate_size_mlp=128, num_local_experts=4, head_dim=16, num_experts_per_tok=1,  # and its
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



def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` (moved to the model's device), on the CPU."""
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device), use_cache=False).logits.cpu()


def relative_error(reference: torch.Tensor, actual: torch.Tensor) -> float:
    return float((actual - reference).norm() / reference.norm())

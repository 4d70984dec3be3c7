"""Write configs/<family>.json: the layer map and smoothing groups of each supported family.

    .venv/bin/python scripts/make_family_maps.py [--out configs]

Each map is found on a tiny random model of the family (the same search `llmquant detect` runs) and
written with ``head_repeat: 0``, so one file fits every size of the family: the grouped-query repeat is
derived from the shapes of the model it is applied to (`--layer-map configs/llama.json`). For a model
of another family, `llmquant detect --model M > configs/NAME.json` writes the same shape.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from llmquant.model.model_map import detect_model_map
from llmquant.pipeline import capture_layer_inputs, find_smooth_groups

SMALL = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
FAMILIES = {
    "llama": LlamaConfig(**SMALL, intermediate_size=128, num_key_value_heads=2),
    "mistral": MistralConfig(**SMALL, intermediate_size=128, num_key_value_heads=2),
    "qwen2": Qwen2Config(**SMALL, intermediate_size=128, num_key_value_heads=2),
    "opt": OPTConfig(**SMALL, ffn_dim=128, word_embed_proj_dim=64),
}


def family_map(config: object) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model_map = detect_model_map(model)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    groups = find_smooth_groups(model, model_map, capture_layer_inputs(model, model_map, ids))
    return {
        "model_map": model_map.to_dict(),
        "smooth_groups": [{**g.to_dict(), "head_repeat": 0, "head_dim": 0} for g in groups],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="configs")
    args = parser.parse_args()
    for family, config in FAMILIES.items():
        path = Path(args.out) / f"{family}.json"
        path.write_text(json.dumps(family_map(config), indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

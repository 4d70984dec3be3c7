"""`ModelMap`: where a causal LM keeps its embeddings, decoder layers, attention, linears and head.

A model family is data, not code: the map is found from the module tree (the decoder layers are the
longest `ModuleList` of identical blocks that hold Linears; the attention is the block's child whose
class is an attention; the head is the model's output embedding; the mixture-of-experts blocks are
`llmquant.model.moe.find_moe_blocks`), and it can be written as JSON and given back to override what was
found, for an architecture the search gets wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from llmquant.errors import LlmquantError
from llmquant.model.moe import MoEBlock, find_moe_blocks
from llmquant.model.targets import has_own_forward, is_linear, is_quantizable_linear
from llmquant.nn.experts import Experts


@dataclass(frozen=True)
class ModelMap:
    model_type: str
    decoder_layers: str
    attention: str
    linears: tuple[str, ...]
    embeddings: tuple[str, ...]
    final_norm: str | None
    lm_head: str | None
    moe: tuple[MoEBlock, ...] = ()  # the MoE blocks of the layers that have them (names relative to a layer)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.decoder_layers)  # type: ignore[return-value]

    def layer_name(self, index: int) -> str:
        return f"{self.decoder_layers}.{index}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelMap:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise LlmquantError(f"unknown layer-map keys {sorted(unknown)}; allowed: {sorted(known)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if "moe" in data:
            data["moe"] = tuple(b if isinstance(b, MoEBlock) else MoEBlock.from_dict(b) for b in data["moe"])
        return cls(**data)

    def attention_of(self, layer: nn.Module) -> nn.Module | None:
        """``layer``'s attention module, or None in a layer without one (a hybrid model's linear-attention or
        convolution layers: Qwen3-Next, LFM2), which has no KV cache to quantize."""
        try:
            return layer.get_submodule(self.attention)
        except AttributeError:
            return None

    def moe_blocks(self, layer: nn.Module) -> list[MoEBlock]:
        """The map's MoE blocks that ``layer`` has (none in a dense layer of a model with MoE layers)."""
        names = {name for name, _ in layer.named_modules()}
        return [block for block in self.moe if block.experts in names]

    @classmethod
    def from_file(cls, path: str | Path) -> ModelMap:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise LlmquantError(f"cannot read layer map {path}: {err}") from None


def _decoder_layers(model: nn.Module) -> str:
    """The longest outermost ModuleList of blocks each holding Linears, of one class or, in a hybrid model, of
    several (Jamba's attention and Mamba layers); a layer's list of experts is inside the decoder layers' list, and
    may be longer."""
    best, best_len, lists = None, 0, []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(outer + ".") for outer in lists):
            continue
        lists.append(name)
        if len(module) > best_len and all(any(is_linear(m) for m in child.modules()) for child in module):
            best, best_len = name, len(module)
    if best is None:
        if any(type(m).__name__ == "Conv1D" for m in model.modules()):
            raise LlmquantError(f"{type(model).__name__}: its layers hold transformers' Conv1D modules (GPT-2's "
                                "transposed Linears), not nn.Linear, which is what llmquant quantizes")
        raise LlmquantError(
            f"{type(model).__name__}: no list of decoder layers holding Linear modules was found; "
            "give a layer map (JSON with decoder_layers, attention, linears, ...)"
        )
    return best


def _attention(layers: nn.ModuleList, where: str) -> str:
    """The attention module's name in the first layer that has one (a hybrid model's first layers may hold a
    linear attention or a convolution instead)."""
    for layer in layers:
        for name, module in layer.named_modules():
            if name and type(module).__name__.endswith(("Attention", "SdpaAttention", "Attention2")):
                return name
    raise LlmquantError(f"{where}: no attention module was found in any decoder layer; give a layer map")


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def detect_model_map(model: nn.Module) -> ModelMap:
    """Find the map from the module tree of a transformers causal LM."""
    layers_name = _decoder_layers(model)
    layers = model.get_submodule(layers_name)
    linears = dict.fromkeys(n for layer in layers for n, m in layer.named_modules() if is_quantizable_linear(m))
    moe = next((blocks for layer in layers if (blocks := find_moe_blocks(layer))), [])
    outside = [(n, m) for n, m in model.named_modules() if not n.startswith(layers_name + ".") and n != layers_name]
    norms = [n for n, m in outside if "norm" in type(m).__name__.lower()]
    get_head = getattr(model, "get_output_embeddings", None)
    return ModelMap(
        model_type=getattr(getattr(model, "config", None), "model_type", type(model).__name__),
        decoder_layers=layers_name,
        attention=_attention(layers, layers_name),
        linears=tuple(linears),  # of every layer (a model's first layers may be dense, the others MoE)
        embeddings=tuple(n for n, m in outside if isinstance(m, nn.Embedding)),
        final_norm=norms[-1] if norms else None,
        lm_head=_name_of(model, get_head() if get_head else None),
        moe=tuple(moe),
    )


def not_quantizable(model: nn.Module, decoder_layers: str) -> dict[str, str]:
    """The decoder layers' weights no recipe can quantize, which stay float, and why (names with the layer index as
    ``*``): experts whose 3-D weights stay fused (a layout `llmquant.model.moe` does not read, or a call that is not
    the router's choice of experts, as Llama 4's) and Linears with a forward of their own. (Linears their layer
    never calls are found by a run: `llmquant.pipeline.engine`.)"""
    found = {}
    pattern = re.compile(rf"^{re.escape(decoder_layers)}\.\d+\.")
    for name, module in model.get_submodule(decoder_layers).named_modules():
        full = pattern.sub(f"{decoder_layers}.*.", f"{decoder_layers}.{name}")
        kind = type(module).__name__
        if has_own_forward(module):
            found[full] = f"{kind}: a Linear with a forward of its own"
        elif not isinstance(module, Experts | nn.modules.conv._ConvNd) and any(  # (convolutions: Mamba's, LFM2's)
                p.dim() == 3 and p.is_floating_point() for p in module.parameters(recurse=False)):
            found[full] = f"{kind}: 3-D expert weights in a layout llmquant does not read"
    return found


def layer_structure(layer: nn.Module) -> tuple[str, ...]:
    """What a decoder layer is made of (each module's name and class): layers of one model differ when the first
    ones are dense and the others MoE (DeepSeek-V3), and patterns found on one hold for those that match it."""
    return tuple(f"{name}:{type(module).__name__}" for name, module in layer.named_modules())


def untie_head(model: nn.Module, model_map: ModelMap) -> None:
    """Give the head its own copy of an embedding table it shares, so either can change alone."""
    if model_map.lm_head is None:
        return
    head = model.get_submodule(model_map.lm_head)
    for emb_name in model_map.embeddings:
        emb = model.get_submodule(emb_name)
        if emb.weight is head.weight:
            head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False

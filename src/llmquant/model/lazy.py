"""Models larger than memory: a skeleton whose decoder layers are read from disk one at a time.

`load_lazy(directory)` builds the model on the ``meta`` device (no weight memory), then reads every tensor
outside the decoder layers (embeddings, final norm, head) from the checkpoint's safetensors files. The
decoder layers stay on ``meta`` until `LazyLayers.materialize(i)` reads layer i's tensors; `release(i)`
sends them back to ``meta``. The tensors outside the layers can go back to ``meta`` too
(`release_outside`, once the calibration inputs are captured) and be read again when needed
(`materialize_outside`); the checkpoint writer reads them tensor by tensor (`LazyLayers.read_outside`).
Reads go through `safetensors.safe_open`, which maps the file and copies only the tensors asked for, so
resident memory holds one float layer at a time.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from llmquant.errors import LlmquantError
from llmquant.model.checkpoint_names import CheckpointNames, checkpoint_names
from llmquant.model.loading import load_tokenizer
from llmquant.model.model_map import ModelMap, detect_model_map
from llmquant.model.moe import FUSED_NAMES, FusedLayout, expert_matrices, fused_layouts, unfuse_experts
from llmquant.model.validation import (
    SAFETENSORS,
    SAFETENSORS_INDEX,
    check_model_dir,
    reading,
    weight_files,
)

INDEX = SAFETENSORS_INDEX
_EXPECTED = "a complete safetensors file as save_pretrained writes it (truncated or corrupt?)"


class CheckpointReader:
    """Tensors of a Hugging Face safetensors checkpoint (one file or a sharded index), by name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX
        if index.exists():
            weight_files(directory)  # one line for an unreadable index or a missing shard
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif (directory / SAFETENSORS).exists():
            with reading(directory / SAFETENSORS, "weights file", _EXPECTED), \
                    safe_open(directory / SAFETENSORS, framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), directory / SAFETENSORS)
        else:
            raise LlmquantError(f"{directory} holds no model.safetensors (or index): a lazily loaded model "
                                "needs a safetensors checkpoint")

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise LlmquantError(f"checkpoint {self.directory} has no tensor {name}")
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, wanted in by_file.items():
            with reading(file, "weights file", _EXPECTED), safe_open(file, framework="pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in wanted})
        return tensors


def _load_into(module: nn.Module, prefix: str, reader: CheckpointReader, dtype: torch.dtype,
               names: CheckpointNames, fused: dict[str, FusedLayout]) -> None:
    """Read every parameter and persistent buffer of ``module`` stored under ``prefix`` (spelled on disk as
    ``names`` says: one tensor per expert matrix, or, for the experts of ``fused`` (full name -> layout), the fused
    tensors the family's checkpoints hold, cut into each expert's matrices), floats in ``dtype``. A tensor found
    nowhere is said in one line."""
    local = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    on_disk = {names.to_disk(f"{prefix}{n}"): n for n in local}
    stored = [key for key in on_disk if key in reader.files]
    for key, value in reader.read(stored).items():
        value = value.to(dtype) if value.is_floating_point() else value
        set_module_tensor_to_device(module, on_disk[key], "cpu", value=value)
    for name, layout in fused.items():
        if name.startswith(prefix):
            _load_fused(module, name[len(prefix):], f"{names.to_disk(name)}.", layout, reader, dtype)
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise LlmquantError(f"checkpoint {reader.directory} has no tensor for {prefix}{missing[0]} (nor "
                            f"{len(missing) - 1} more of this layer) under the names its family's checkpoints use")


def _load_fused(layer: nn.Module, experts: str, on_disk: str, layout: FusedLayout, reader: CheckpointReader,
                dtype: torch.dtype) -> None:
    """The per-expert Linears of ``layer.<experts>`` from the fused tensors ``<on_disk><gate_up_proj ...>`` of the
    checkpoint, where it holds them (gpt-oss's checkpoints do), each expert's matrices copied out."""
    keys = {name: on_disk + name for name in FUSED_NAMES if on_disk + name in reader.files}
    if "gate_up_proj" not in keys:
        return
    if layout.biases and not {"gate_up_proj_bias", "down_proj_bias"} <= set(keys):
        layout = replace(layout, biases=False)  # (the biases stay unread: `_load_into` names them)
    fused = {name: value.to(dtype) for name, value in zip(keys, reader.read(list(keys.values())).values(),
                                                          strict=True)}
    for index in range(layout.experts):
        for linear, (weight, bias) in expert_matrices(fused, layout, index).items():
            path = f"{experts}.{index}.{linear}"
            set_module_tensor_to_device(layer, f"{path}.weight", "cpu", value=weight.contiguous())
            if bias is not None:
                set_module_tensor_to_device(layer, f"{path}.bias", "cpu", value=bias.contiguous())


@dataclass
class LazyLayers:
    """The decoder layers of a skeleton model, read from ``reader`` when needed, and the tensors outside
    them, which can be released and read again; floating tensors in ``dtype``, the model's."""

    model: nn.Module
    model_map: ModelMap
    reader: CheckpointReader
    dtype: torch.dtype = torch.float32
    fused: dict[str, FusedLayout] = field(default_factory=dict)  # experts stored fused on disk (`_load_fused`)

    @functools.cached_property
    def names(self) -> CheckpointNames:
        return checkpoint_names(self.model)

    def materialize(self, index: int) -> nn.Module:
        layer = self.model_map.layers(self.model)[index]
        if any(p.is_meta for p in layer.parameters()):
            _load_into(layer, f"{self.model_map.layer_name(index)}.", self.reader, self.dtype, self.names, self.fused)
        return layer

    def release(self, index: int) -> None:
        self.model_map.layers(self.model)[index].to("meta")
        return_freed_memory()

    def _outside(self) -> list[str]:
        prefix = self.model_map.decoder_layers + "."
        return [n for n, _ in self.model.named_parameters(remove_duplicate=False) if not n.startswith(prefix)]

    def materialize_outside(self) -> None:
        """Read the embeddings, final norm and head, and tie the head again where the config says."""
        outside = self._outside()
        stored = [n for n in outside if self.names.to_disk(n) in self.reader.files]
        for name, value in self.read_outside(stored).items():
            set_module_tensor_to_device(self.model, name, "cpu", value=value)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        missing = [n for n in outside if self.model.get_parameter(n).is_meta]
        if missing:
            raise LlmquantError(f"checkpoint {self.reader.directory} lacks {missing[:3]}")

    def release_outside(self) -> None:
        """Send the tensors outside the decoder layers back to ``meta`` (they are still on disk)."""
        for name in self._outside():
            set_module_tensor_to_device(self.model, name, "meta")
        return_freed_memory()

    def read_outside(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors outside the layers (the model's names) as the model holds them once materialized (in
        its dtype)."""
        on_disk = {self.names.to_disk(name): name for name in names}
        return {on_disk[key]: value.to(self.dtype) if value.is_floating_point() else value
                for key, value in self.reader.read(list(on_disk)).items()}


@functools.cache
def _libc() -> object | None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def map_large_allocations(threshold: int = 2**20) -> bool:
    """Serve every allocation of at least ``threshold`` bytes from its own memory map (glibc ``mallopt``
    M_MMAP_THRESHOLD), so a freed tensor goes back to the system at once; whether it could be set.

    glibc raises its threshold after each large free, up to 32 MiB, and then serves tensors below it from
    the heap, where they fragment: streaming a 1.5B model (5.9 GB) then grew resident memory by 40-90 MiB per
    layer, to a 2,881 MiB peak (2,637 MiB with ``malloc_trim`` after each layer). With the threshold fixed at
    1 MiB and the embeddings and head left on disk, the same run stays at 444 MiB between layers and
    peaks at 1,019 MiB (BENCHMARKS.md, "A model larger than the memory cap")."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def load_lazy(directory: str | Path, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, object, LazyLayers]:
    """The model of a local checkpoint with its decoder layers left on disk, its tokenizer, and the layers;
    in ``dtype`` (None: the checkpoint's own, float32 where its config names none)."""
    directory = Path(directory)
    check_model_dir(directory)
    map_large_allocations()
    with reading(directory / "config.json", "model config", "a Hugging Face config.json"):
        config = AutoConfig.from_pretrained(directory)
    dtype = dtype or config_dtype(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fused = fused_layouts(model)
    unfuse_experts(model)  # one meta Linear per expert matrix, read from the checkpoint's per-expert tensors (or
    model.eval()  # cut from its fused ones)
    lazy = LazyLayers(model, detect_model_map(model), CheckpointReader(directory), dtype, fused)
    lazy.materialize_outside()
    return model, load_tokenizer(directory), lazy


def config_dtype(config: object) -> torch.dtype:
    """The dtype a checkpoint's config names (``dtype``, or ``torch_dtype`` before transformers 5), float32 where
    it names none or a non-floating one."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named.removeprefix("torch."), None)
    return named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32


__all__ = [
    "CheckpointReader",
    "LazyLayers",
    "config_dtype",
    "load_lazy",
    "map_large_allocations",
    "return_freed_memory",
]

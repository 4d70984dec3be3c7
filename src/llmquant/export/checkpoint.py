"""Checkpoints in the compressed-tensors layout: write and read back.

A directory holds ``config.json`` (with ``quantization_config``: ``quant_method: compressed-tensors``,
``format``, ``config_groups``, ``ignore``, ``kv_cache_scheme``), ``model.safetensors`` (integer
``weight`` codes, ``weight_scale``, ``weight_zero_point``, ``input_scale``, attention ``k_scale`` and
``v_scale``), the tokenizer, and ``llmquant.json`` (the manifest of the run). A rotated model also
records in ``config.json``'s ``llmquant_structure`` what its architecture class does not say (online
rotations, RMSNorms that replaced LayerNorms); `load_quantized` rebuilds them.

Weights of 8 bits are stored as ``format: int-quantized`` (one int8 ``weight`` code per weight); weights
of fewer bits as ``format: pack-quantized`` (``weight_packed`` int32 words, layout in
`llmquant.quant.packing`, ``weight_shape`` int64 ``[out, in]``, and for asymmetric group or channel
weights a ``weight_zero_point`` packed the same way along the output dimension, int32
``[ceil(out * b / 32), groups]``). Each config group names its own ``format`` (which compressed-tensors
follows when it decompresses a module); the top-level ``format`` is that format, or ``mixed-precision``
when the groups differ. Asymmetric codes and zero points are stored signed as compressed-tensors
expects (q - 2^(b-1), zero - 2^(b-1)); the dequantized values are unchanged. The reader also takes the
other form of a weight (an int-quantized W4 checkpoint written before packing, a packed 8-bit one).
Writing goes to a temporary sibling directory renamed into place at the end, so an interrupted save
never leaves a half checkpoint at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmquant.errors import LlmquantError
from llmquant.model.lazy import INDEX, CheckpointReader, return_freed_memory
from llmquant.model.model_map import ModelMap, detect_model_map
from llmquant.model.targets import matches_any
from llmquant.nn.kv_cache import KVCacheQuantizer, enable_kv_quantization
from llmquant.nn.online_rotation import OnlineRotation, RMSNorm, attach_input_rotation, input_rotation_of
from llmquant.nn.quant_linear import QuantLinear, is_packed, storage_offset
from llmquant.quant.packing import pack_int32, unpack_int32
from llmquant.quant.rotation import Rotation
from llmquant.quant.scheme import Scheme
from llmquant.quant.spec import QuantSpec

MANIFEST = "llmquant.json"
STRUCTURE = "llmquant_structure"  # config.json key: what rotations added to the architecture
WEIGHTS = "model.safetensors"
REST_SHARD_BYTES = 256 * 2**20  # a streamed model's tensors outside the decoder layers, per shard
_KV_PREFIX = "kv_cache_quantizer."


# --- QuantSpec <-> compressed-tensors QuantizationArgs ---------------------------------------------
def to_args(spec: QuantSpec | None) -> QuantizationArgs | None:
    if spec is None:
        return None
    return QuantizationArgs(
        num_bits=spec.bits,
        type="int",
        symmetric=spec.symmetric,
        strategy=spec.granularity,
        group_size=spec.group_size,
        dynamic=spec.dynamic,
    )


def from_args(args: QuantizationArgs | None) -> QuantSpec | None:
    if args is None:
        return None
    if args.type != "int":
        raise LlmquantError(f"checkpoint uses {args.type} quantization; llmquant reads int checkpoints only")
    return QuantSpec(
        bits=args.num_bits,
        symmetric=args.symmetric,
        granularity=args.strategy.value if hasattr(args.strategy, "value") else str(args.strategy),
        group_size=args.group_size if args.strategy == "group" else None,
        dynamic=bool(args.dynamic),
    )


def _linear_schemes(model: nn.Module) -> tuple[dict[str, Scheme], list[str]]:
    schemes, ignored = {}, []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.weight_spec is not None:
            schemes[name] = Scheme(weights=module.weight_spec, input_activations=module.input_spec)
        elif isinstance(module, (nn.Linear, QuantLinear)):
            ignored.append(name)
    return schemes, ignored


def weight_format(spec: QuantSpec | None) -> str:
    """The compressed-tensors format a weight is stored in: packed int32 words below 8 bits."""
    return (CompressionFormat.pack_quantized if is_packed(spec) else CompressionFormat.int_quantized).value


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """The compressed-tensors ``quantization_config`` describing ``model``'s quantized modules."""
    schemes, ignored = _linear_schemes(model)
    kv_specs = {m.spec for m in model.modules() if isinstance(m, KVCacheQuantizer)}
    if not schemes and not kv_specs:
        return None
    distinct = list(dict.fromkeys(schemes.values()))
    groups = {}
    for i, scheme in enumerate(distinct):
        names = [n for n, s in schemes.items() if s == scheme]
        targets = ["Linear"] if len(distinct) == 1 else names
        groups[f"group_{i}"] = QuantizationScheme(
            targets=targets,
            weights=to_args(scheme.weights),
            input_activations=to_args(scheme.input_activations),
            format=weight_format(scheme.weights),
        )
    if len(kv_specs) > 1:
        raise LlmquantError("a checkpoint holds one KV-cache scheme; this model mixes several")
    formats = {group.format for group in groups.values()} or {CompressionFormat.int_quantized.value}
    config = QuantizationConfig(
        config_groups=groups,
        ignore=ignored,
        format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
        quantization_status="compressed",
        kv_cache_scheme=to_args(next(iter(kv_specs))) if kv_specs else None,
    )
    return config.model_dump(mode="json")


# --- state dict <-> stored tensors -------------------------------------------------------------
def _packs_zero_point(spec: QuantSpec) -> bool:
    """compressed-tensors packs the zero points of packed asymmetric group and channel weights."""
    return is_packed(spec) and not spec.symmetric and spec.granularity in ("group", "channel")


def _to_stored(module: QuantLinear, leaf: str, value: torch.Tensor) -> torch.Tensor:
    """One tensor of a quantized Linear as the checkpoint stores it (signed codes, packed zero points)."""
    spec = module.weight_spec
    if spec is None or spec.symmetric or leaf not in ("weight", "weight_zero_point"):
        return value  # weight_packed already holds signed codes
    signed = (value.to(torch.int32) - storage_offset(spec)).to(torch.int8)
    return pack_int32(signed, spec.bits, dim=0) if leaf == "weight_zero_point" and _packs_zero_point(spec) else signed


def _stored_tensors(model: nn.Module, prefix: str = "", skip: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for ``model`` (keys prefixed by ``prefix``), leaving out those
    under ``skip`` (the decoder layers of a streamed model, written shard by shard)."""
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        if (skip is not None and key.startswith(skip)) or value.is_meta:
            continue
        if value.data_ptr() in seen and value.numel() > 1:
            continue  # a tied weight is stored once (transformers re-ties it from the config)
        seen.add(value.data_ptr())
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if isinstance(module, QuantLinear):
            value = _to_stored(module, leaf, value)
        tensors[prefix + key.replace(_KV_PREFIX, "")] = value.contiguous()
    return tensors


def _from_stored(module: QuantLinear, leaf: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """A quantized Linear's tensors (by leaf name) from one stored tensor, whichever weight form the
    checkpoint used: int8 ``weight`` codes or packed ``weight_packed`` words."""
    spec = module.weight_spec
    if spec is None or leaf not in ("weight", "weight_packed", "weight_shape", "weight_zero_point"):
        return {leaf: value}
    if leaf == "weight_shape":
        return {leaf: value} if module.packed else {}
    if leaf == "weight_zero_point":
        if value.dtype == torch.int32:  # packed along the output dimension
            value = unpack_int32(value, spec.bits, module.out_features, dim=0)
        unsigned = value.to(torch.int32) + storage_offset(spec)
        return {leaf: unsigned.to(module.weight_zero_point.dtype)}
    if module.packed:
        if leaf == "weight_packed":
            return {leaf: value}
        return {"weight_packed": pack_int32(value, spec.bits), "weight_shape": torch.tensor(value.shape)}
    signed = unpack_int32(value, spec.bits, module.in_features) if leaf == "weight_packed" else value
    return {"weight": (signed.to(torch.int32) + storage_offset(spec)).to(torch.int8)}


def _state_dict_from_stored(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in tensors.items():
        owner, _, leaf = key.rpartition(".")
        if leaf in ("k_scale", "v_scale"):
            key = f"{owner}.{_KV_PREFIX}{leaf}"
        module = model.get_submodule(owner) if owner else model
        if not isinstance(module, QuantLinear):
            state[key] = value
            continue
        for local, converted in _from_stored(module, leaf, value).items():
            state[f"{owner}.{local}"] = converted
    return state


# --- write --------------------------------------------------------------------------------------
def save(model: nn.Module, tokenizer: Any, directory: str | os.PathLike, manifest: dict | None = None) -> Path:
    """Write ``model`` (quantized or float), its tokenizer and manifest to ``directory``, atomically."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_weights(model, tmp)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        qconfig = quantization_config(model)
        if qconfig is not None:
            config["quantization_config"] = qconfig
        structure = model_structure(model)
        if structure:
            config[STRUCTURE] = structure
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if manifest is not None:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_weights(model: nn.Module, directory: Path) -> None:
    """``model.safetensors``; or, for a model whose decoder layers were streamed (their finished state in
    ``model.llmquant_run_dir``), one shard per layer, read back one at a time, then the rest in shards of
    at most `REST_SHARD_BYTES` (or one tensor), and the Hugging Face index: memory holds one layer, or one
    shard, and its serialized copy (safetensors serializes a shard in memory before writing it)."""
    run_dir = getattr(model, "llmquant_run_dir", None)
    if run_dir is None:
        save_file(_stored_tensors(model), str(directory / WEIGHTS), metadata={"format": "pt"})
        return
    model_map = detect_model_map(model)
    layers = model_map.layers(model)
    rest = _stored_tensors(model, skip=model_map.decoder_layers + ".")
    source = getattr(model, "llmquant_source", None)  # embeddings and head left on disk while streaming
    rest.update(_still_on_disk(model, model_map, source))
    rest_shards = _shards(rest, REST_SHARD_BYTES)
    count = len(layers) + len(rest_shards)
    names = iter(f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count))
    weight_map: dict[str, str] = {}
    total = 0

    def write(tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = next(names)
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    for index, layer in enumerate(layers):
        layer.load_state_dict(run_dir.layer_state(index), assign=True)
        write(_stored_tensors(layer, prefix=f"{model_map.layer_name(index)}."))
        layer.to("meta")
        return_freed_memory()
    for shard in rest_shards:
        on_disk = [key for key, value in shard.items() if value.is_meta]
        write({**shard, **source.read_outside(on_disk)} if on_disk else shard)
        return_freed_memory()
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index_json, indent=2))


def _still_on_disk(model: nn.Module, model_map: ModelMap, source: Any) -> dict[str, torch.Tensor]:
    """The ``meta`` placeholders of the tensors outside the decoder layers that ``source`` (`LazyLayers`)
    still holds on disk; a tied head is not stored (transformers ties it again from the config)."""
    if source is None:
        return {}
    skip = model_map.decoder_layers + "."
    return {key: value for key, value in model.state_dict().items()
            if value.is_meta and not key.startswith(skip) and key in source.reader.files}


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """``tensors`` in order, cut into dicts of at most ``limit`` bytes (a larger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = []
    size = limit
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


# --- read ---------------------------------------------------------------------------------------
def is_quantized_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint only llmquant's reader rebuilds exactly: quantized, or
    with rotations (online Hadamards, RMSNorms in place of LayerNorms) recorded in its config."""
    config = directory / "config.json"
    if not config.exists():
        return False
    found = json.loads(config.read_text())
    qconfig = found.get("quantization_config") or {}
    return qconfig.get("quant_method") == "compressed-tensors" or STRUCTURE in found


# --- structure that rotations add (QuaRot) ------------------------------------------------------
def model_structure(model: nn.Module) -> dict[str, Any]:
    """What the model's architecture class does not say: online rotations in front of Linears (R4)
    and on queries and keys (R3), and RMSNorms that replaced LayerNorms (R1 on a LayerNorm model)."""
    structure: dict[str, Any] = {}
    inputs = {n: asdict(r) for n, m in model.named_modules() if (r := input_rotation_of(m)) is not None}
    qk = {n: asdict(m.qk_rotation.rotation) for n, m in model.named_modules()
          if isinstance(getattr(m, "qk_rotation", None), OnlineRotation)}
    norms = {n: m.eps for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    for key, value in (("input_rotations", inputs), ("qk_rotations", qk), ("rms_norms", norms)):
        if value:
            structure[key] = value
    return structure


def _apply_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    for name, eps in structure.get("rms_norms", {}).items():
        norm = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, RMSNorm(norm.weight.shape[0], eps))
    for name, rotation in structure.get("input_rotations", {}).items():
        attach_input_rotation(model.get_submodule(name), Rotation(**rotation))
    for name, rotation in structure.get("qk_rotations", {}).items():
        model.get_submodule(name).qk_rotation = OnlineRotation(Rotation(**rotation))
    if structure.get("qk_rotations"):
        enable_kv_quantization(model)


def _add_missing_biases(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """A Linear whose bias the checkpoint holds but the architecture lacks (a LayerNorm's bias folded
    into the head by R1) gets one."""
    for key, value in tensors.items():
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf == "bias" and isinstance(module, (nn.Linear, QuantLinear)) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(value, dtype=torch.float32), requires_grad=False)


def _apply_quantization_config(model: nn.Module, qconfig: QuantizationConfig) -> None:
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or matches_any(name, module, qconfig.ignore or []):
            continue
        for group in qconfig.config_groups.values():
            if matches_any(name, module, group.targets):
                quantized = QuantLinear(
                    module.in_features,
                    module.out_features,
                    module.bias is not None,
                    from_args(group.weights),
                    from_args(group.input_activations),
                )
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, quantized)
                break
    kv_spec = from_args(qconfig.kv_cache_scheme)
    if kv_spec is not None:
        model_map = detect_model_map(model)
        for layer in model_map.layers(model):
            layer.get_submodule(model_map.attention).kv_cache_quantizer = KVCacheQuantizer(kv_spec)
        enable_kv_quantization(model)


def load_quantized(directory: str | os.PathLike) -> tuple[nn.Module, Any]:
    """Rebuild the model a `save` wrote: same modules, same tensors, same logits."""
    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    raw = getattr(config, "quantization_config", None)
    structure = getattr(config, STRUCTURE, None) or {}
    for key in ("quantization_config", STRUCTURE):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if raw is not None:
        _apply_quantization_config(model, QuantizationConfig.model_validate(raw))
    _apply_structure(model, structure)
    reader = CheckpointReader(directory)
    tensors = reader.read(reader.names())
    _add_missing_biases(model, tensors)
    missing, unexpected = model.load_state_dict(_state_dict_from_stored(model, tensors), strict=False)
    model.tie_weights()
    real_missing = [k for k in missing if not _is_tied(model, k)]
    if real_missing or unexpected:
        raise LlmquantError(f"checkpoint {directory} does not match its config: missing {real_missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").exists() else None
    return model.eval(), tokenizer


def _is_tied(model: nn.Module, key: str) -> bool:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return bool(getattr(model.config, "tie_word_embeddings", False)) and head is not None and key.endswith(
        "lm_head.weight"
    )

"""Checkpoints in the compressed-tensors layout: write and read back.

A directory holds ``config.json`` (with ``quantization_config``: ``quant_method: compressed-tensors``,
``format``, ``config_groups``, ``ignore``, ``kv_cache_scheme``), ``model.safetensors`` (integer
``weight`` codes, ``weight_scale``, ``weight_zero_point``, ``input_scale``, attention ``k_scale`` and
``v_scale``), the tokenizer, and ``llmquant.json`` (the manifest of the run). A rotated model also
records in ``config.json``'s ``llmquant_structure`` what its architecture class does not say (online
rotations, RMSNorms that replaced LayerNorms); `load_quantized` rebuilds them. Online input rotations (R4, R5)
are also written as ``quantization_config.transform_config`` with their matrices, as vLLM reads them
(`llmquant.export.transforms`).

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
never leaves a half checkpoint at the destination, and `save` never deletes what llmquant did not write
(`check_output`, `_replace_dir`).
"""

from __future__ import annotations

import ctypes
import errno
import filecmp
import functools
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from llmquant.device import dtype_name
from llmquant.errors import LlmquantError
from llmquant.export.transforms import (
    TRANSFORM_CONFIG,
    rotation_entry,
    rotation_from_entry,
    transform_config,
    transform_tensors,
    without_transform_tensors,
)
from llmquant.model.checkpoint_names import CheckpointNames, checkpoint_names
from llmquant.model.lazy import INDEX, CheckpointReader, config_dtype, return_freed_memory
from llmquant.model.loading import load_tokenizer
from llmquant.model.model_map import ModelMap, detect_model_map
from llmquant.model.moe import find_moe_blocks, unfuse_experts
from llmquant.model.targets import matches_any
from llmquant.model.validation import check_model_dir, read_config, reading
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
_KV_LEAVES = ("k_scale", "v_scale", "k_mean", "kept_positions")  # a KV-cache quantizer's, stored on the attention
FILES_KEY = "checkpoint_files"  # llmquant.json: the files the checkpoint consists of (what a replace deletes)
# what a checkpoint written before FILES_KEY existed can hold (config, weights, tokenizer, manifest)
_KNOWN_FILES = frozenset({
    "config.json", "generation_config.json", MANIFEST, WEIGHTS, INDEX, "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template.jinja", "chat_template.json",
})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
log = logging.getLogger(__name__)


# --- QuantSpec <-> compressed-tensors QuantizationArgs ---------------------------------------------
def to_args(spec: QuantSpec | None) -> QuantizationArgs | None:
    if spec is None:
        return None
    return QuantizationArgs(
        num_bits=spec.bits,
        type=spec.type,
        symmetric=spec.symmetric,
        strategy=spec.granularity,
        group_size=spec.group_size,
        block_structure=list(spec.block_shape) if spec.block_shape is not None else None,
        dynamic=spec.dynamic,
        observer_kwargs=_clip_kwargs(spec),
    )


def _clip_kwargs(spec: QuantSpec) -> dict[str, float | list[float]]:
    """A dynamic quantizer's clip as llmquant's own ``observer_kwargs`` (which no other loader reads)."""
    if spec.clip_grid is not None:
        return {"clip_grid": list(spec.clip_grid)}
    return {"clip_ratio": spec.clip_ratio} if spec.clip_ratio != 1.0 else {}


def from_args(args: QuantizationArgs | None) -> QuantSpec | None:
    if args is None:
        return None
    if args.type not in ("int", "float") or (args.type == "float" and args.num_bits != 8):
        raise LlmquantError(f"checkpoint uses {args.num_bits}-bit {args.type} quantization; llmquant reads int "
                            "and 8-bit float (E4M3) checkpoints")
    kwargs = args.observer_kwargs or {}
    return QuantSpec(
        bits=args.num_bits,
        type=args.type,
        symmetric=args.symmetric,
        granularity=args.strategy.value if hasattr(args.strategy, "value") else str(args.strategy),
        group_size=args.group_size if args.strategy == "group" else None,
        block_shape=tuple(args.block_structure) if args.strategy == "block" else None,
        dynamic=bool(args.dynamic),
        clip_ratio=float(kwargs.get("clip_ratio", 1.0)),
        clip_grid=tuple(float(r) for r in kwargs["clip_grid"]) if "clip_grid" in kwargs else None,
    )


def _linear_schemes(model: nn.Module) -> tuple[dict[str, Scheme], list[str]]:
    """The scheme of each quantized Linear, and the float ones: Linears, and MoE routers (a Linear in vLLM's
    models, with weights that must be read as they are)."""
    schemes, ignored = {}, []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.weight_spec is not None:
            schemes[name] = Scheme(weights=module.weight_spec, input_activations=module.input_spec)
        elif isinstance(module, (nn.Linear, QuantLinear)):
            ignored.append(name)
    routers = [block.router for block in find_moe_blocks(model)]
    return schemes, ignored + [name for name in routers if name not in ignored]


def weight_format(spec: QuantSpec | None) -> str:
    """The compressed-tensors format a weight is stored in: packed int32 words below 8 bits, float8 codes for
    float specs, else int8 codes."""
    if spec is not None and spec.type == "float":
        return CompressionFormat.float_quantized.value
    return (CompressionFormat.pack_quantized if is_packed(spec) else CompressionFormat.int_quantized).value


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """The compressed-tensors ``quantization_config`` describing ``model``'s quantized modules."""
    names = checkpoint_names(model)
    schemes, ignored = _linear_schemes(model)
    schemes = {names.to_disk(name): scheme for name, scheme in schemes.items()}
    ignored = [names.to_disk(name) for name in ignored]
    kv_specs = {m.spec for m in model.modules() if isinstance(m, KVCacheQuantizer)}
    if not schemes and not kv_specs:
        return None
    distinct = list(dict.fromkeys(schemes.values()))
    groups = {}
    for i, scheme in enumerate(distinct):
        members = [n for n, s in schemes.items() if s == scheme]
        targets = ["Linear"] if len(distinct) == 1 else members
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
    ).model_dump(mode="json")
    transforms = transform_config(model, names)
    if transforms is not None:  # online input rotations, as vLLM reads them (`llmquant.export.transforms`)
        config[TRANSFORM_CONFIG] = transforms
    return config


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


def _stored_tensors(model: nn.Module, names: CheckpointNames, prefix: str = "", skip: str | None = None,
                    dtype: torch.dtype | None = None, transforms: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for ``model`` (keys prefixed by ``prefix``, spelled as the family's
    checkpoints spell them: ``names``), leaving out those under ``skip`` (the decoder layers of a streamed model,
    written shard by shard); online input rotations as vLLM's transform matrices in ``dtype`` (the model's), those
    of groups not in ``transforms`` (the groups already written, `transform_tensors`)."""
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
        tensors[names.to_disk(prefix + key.replace(_KV_PREFIX, ""))] = value.detach().to("cpu").contiguous()
    if skip is None:
        tensors.update(transform_tensors(model, names, dtype or model_dtype(model), prefix, transforms))
    return tensors


def _from_stored(module: QuantLinear, leaf: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """A quantized Linear's tensors (by leaf name) from one stored tensor, whichever weight form the
    checkpoint used: int8 ``weight`` codes or packed ``weight_packed`` words."""
    spec = module.weight_spec
    if spec is None or spec.type == "float" or leaf not in ("weight", "weight_packed", "weight_shape",
                                                            "weight_zero_point"):
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
        if leaf in _KV_LEAVES:
            key = f"{owner}.{_KV_PREFIX}{leaf}"
        module = model.get_submodule(owner) if owner else model
        if not isinstance(module, QuantLinear):
            state[key] = value
            continue
        for local, converted in _from_stored(module, leaf, value).items():
            state[f"{owner}.{local}"] = converted
    return state


# --- write --------------------------------------------------------------------------------------
def check_output(directory: str | os.PathLike, overwrite: bool = False) -> bool:
    """Whether a checkpoint may be written to ``directory``: False for a new one (nothing there, or an empty
    directory), True to replace the llmquant checkpoint there (its `MANIFEST` is there) when ``overwrite``;
    anything else (a file, a directory llmquant did not write, a checkpoint without ``overwrite``) is refused
    with one `LlmquantError`. Cheap: the command line asks it before any work, `save` again before writing."""
    target = Path(directory)
    if not target.exists():
        return False
    if not target.is_dir():
        raise LlmquantError(f"--output {target} is a file, not a directory; expected a new or empty directory "
                            "(llmquant never deletes what it did not write)")
    if not any(target.iterdir()):
        return False
    if not (target / MANIFEST).is_file():
        raise LlmquantError(f"--output {target} is a directory that holds files but no llmquant checkpoint (no "
                            f"{MANIFEST}); llmquant never deletes what it did not write: choose a new or empty "
                            "directory")
    if not overwrite:
        raise LlmquantError(f"--output {target} holds an llmquant checkpoint; pass --overwrite to replace it "
                            "(overwrite=True in Python), or choose another directory")
    return True


def save(model: nn.Module, tokenizer: Any, directory: str | os.PathLike, manifest: dict | None = None,
         overwrite: bool = False) -> Path:
    """Write ``model`` (quantized or float), its tokenizer and manifest to ``directory``, atomically.

    ``directory`` must be new or empty, or hold an llmquant checkpoint to replace with ``overwrite``
    (`check_output`); a replace keeps the files there that are not part of the old checkpoint (`_replace_dir`).
    ``llmquant.json`` is always written: ``manifest`` (when given) and the list of the checkpoint's files."""
    target = Path(directory)
    target = target.resolve() if target.is_symlink() else target  # replace what the link points to, keep the link
    replacing = check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        _write_checkpoint(model, tokenizer, tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only what this save wrote
        raise
    if replacing:
        log.warning("replacing the llmquant checkpoint in %s (files llmquant did not write stay)", target)
    _replace_dir(tmp, target, replacing)
    return target


def _write_checkpoint(model: nn.Module, tokenizer: Any, directory: Path, manifest: dict | None) -> None:
    """Weights, config.json, the tokenizer, then llmquant.json listing every file (itself included)."""
    _write_weights(model, directory)
    config = model.config.to_dict()
    config["dtype"] = config["torch_dtype"] = dtype_name(model_dtype(model))  # what it was quantized in
    config["architectures"] = config.get("architectures") or [type(model).__name__]  # (a model built from a config
    # has none, and serving engines pick the model class from it)
    config.pop("quantization_config", None)
    qconfig = quantization_config(model)
    if qconfig is not None:
        config["quantization_config"] = qconfig
    structure = model_structure(model)
    if structure:
        config[STRUCTURE] = structure
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    files = sorted({p.name for p in directory.iterdir()} | {MANIFEST})
    (directory / MANIFEST).write_text(json.dumps({**(manifest or {}), FILES_KEY: files}, indent=2, default=str))


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's float weights: that of its input embeddings (float32 if it has none)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


def _write_weights(model: nn.Module, directory: Path) -> None:
    """``model.safetensors``; or, for a model whose decoder layers were streamed (their finished state in
    ``model.llmquant_run_dir``), one shard per layer, read back one at a time, then the rest in shards of
    at most `REST_SHARD_BYTES` (or one tensor), and the Hugging Face index: memory holds one layer, or one
    shard, and its serialized copy (safetensors serializes a shard in memory before writing it)."""
    run_dir = getattr(model, "llmquant_run_dir", None)
    names = checkpoint_names(model)
    if run_dir is None:
        save_file(_stored_tensors(model, names), str(directory / WEIGHTS), metadata={"format": "pt"})
        return
    model_map = detect_model_map(model)
    layers = model_map.layers(model)
    rest = _stored_tensors(model, names, skip=model_map.decoder_layers + ".")
    source = getattr(model, "llmquant_source", None)  # embeddings and head left on disk while streaming
    rest.update(_still_on_disk(model, model_map, source))
    rest_shards = _shards(rest, REST_SHARD_BYTES)
    count = len(layers) + len(rest_shards)
    files = iter(f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count))
    weight_map: dict[str, str] = {}
    total = 0
    transforms: set[str] = set()  # the transform groups written so far (one matrix each)

    def write(tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = next(files)
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    for index, layer in enumerate(layers):
        layer.load_state_dict(run_dir.layer_state(index), assign=True)
        write(_stored_tensors(layer, names, prefix=f"{model_map.layer_name(index)}.", dtype=model_dtype(model),
                              transforms=transforms))
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


# --- replacing a checkpoint ------------------------------------------------------------------------
def _replace_dir(new: Path, target: Path, replacing: bool) -> None:
    """Put the complete checkpoint in ``new`` (a sibling of ``target``) at ``target``, in this order:

    1. Not ``replacing`` (``target`` was new or empty): one rename, which fails, leaving ``target`` as it is,
       if something appeared there meanwhile. Else ``target`` must still hold an llmquant checkpoint.
    2. Every entry of ``target`` that is not a file of the old checkpoint (the user's) is hard-linked, or
       copied where links fail, into ``new``; ``target`` is untouched.
    3. One rename(2) exchanges the two directories (Linux ``renameat2(RENAME_EXCHANGE)``): ``target`` holds
       the new checkpoint and the user's entries, ``new`` the old checkpoint.
    4. From ``new`` go the old checkpoint's files and the user's entries that ``target`` holds too (the same
       file, or the same bytes), then ``new`` itself if nothing else is left.

    Killed before 3, ``target`` is the old checkpoint as it was; after 3, the new one with the user's entries
    (a leftover ``.NAME.tmp-*`` sibling holds only copies, never the only one of a user's file). Where the
    exchange is not supported, 3 is two renames (old aside, new in) and a failure of the second renames the old
    back; a kill between those two leaves the old and the new checkpoint complete in the two siblings."""
    if target.is_dir():
        shutil.copymode(target, new)  # the directory keeps the mode the user gave it
    if not replacing:
        _rename_into_place(new, target)
        return
    try:
        if not (target / MANIFEST).is_file():
            raise LlmquantError(f"{target} no longer holds an llmquant checkpoint (no {MANIFEST}); nothing was "
                                "replaced")
        old_files = checkpoint_files(target)
        extras = [entry for entry in target.iterdir() if entry.name not in old_files]
        _refuse_clashes(extras, new, target)
        for entry in extras:
            _duplicate(entry, new / entry.name)
        old = _swap(new, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)  # the new checkpoint and duplicates: target is untouched
        raise
    _remove_replaced(old, target, old_files)


def _sibling(target: Path, kind: str) -> Path:
    """A new empty directory ``.NAME.<kind>-<random>`` beside ``target`` (its mode from the umask, where
    `tempfile.mkdtemp` gives 0700)."""
    while True:
        path = target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _rename_into_place(new: Path, target: Path) -> None:
    try:
        os.replace(new, target)
    except OSError as err:  # something appeared at target while llmquant worked
        shutil.rmtree(new, ignore_errors=True)
        raise LlmquantError(f"cannot put the checkpoint at {target}: {err.strerror}; it must be new or empty "
                            "when the run ends") from None


def checkpoint_files(directory: Path) -> set[str]:
    """The names of the files an llmquant checkpoint in ``directory`` consists of: the list its manifest
    records, or (a checkpoint written before the list existed) the names llmquant writes that are there."""
    try:
        recorded = json.loads((directory / MANIFEST).read_text()).get(FILES_KEY)
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, list) and all(isinstance(name, str) for name in recorded):
        names = set(recorded) | {MANIFEST}
    else:
        names = {p.name for p in directory.iterdir() if p.name in _KNOWN_FILES or _SHARD.fullmatch(p.name)}
    return {name for name in names if name == Path(name).name and name not in ("", ".", "..")}


def _refuse_clashes(extras: list[Path], new: Path, target: Path) -> None:
    """A user's entry that has the name of a file of the new checkpoint would be lost: refuse the replace."""
    clashes = sorted(entry.name for entry in extras if (new / entry.name).exists())
    if clashes:
        raise LlmquantError(f"{target} holds {', '.join(clashes)}, which the old checkpoint did not write (not in "
                            f"its {MANIFEST}) and the new one would replace; move it away and run again")


def _duplicate(source: Path, destination: Path) -> None:
    """``source`` also at ``destination``: hard links (a directory's files one by one), copies where a link
    cannot be made; symbolic links as links."""
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        destination.mkdir()
        for entry in source.iterdir():
            _duplicate(entry, destination / entry.name)
        shutil.copystat(source, destination)
    else:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)


def _swap(new: Path, target: Path) -> Path:
    """Exchange ``new`` and ``target``; the path that now holds the old checkpoint."""
    if _exchange(new, target):
        return new
    aside = _sibling(target, "old")
    try:
        os.replace(target, aside)  # over the empty directory just made
    except BaseException:
        aside.rmdir()
        raise
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    return aside


AT_FDCWD, RENAME_EXCHANGE = -100, 2


@functools.cache
def _renameat2() -> Any:
    """glibc's ``renameat2`` (Linux), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic rename(2); False where the system or file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _remove_replaced(old: Path, target: Path, old_files: set[str]) -> None:
    """Delete the old checkpoint's files from ``old`` and the entries ``target`` holds as well, then ``old``
    if it is empty; anything else stays (said in a warning)."""
    for entry in old.iterdir():
        if entry.name in old_files and entry.is_file() and not entry.is_symlink():
            entry.unlink()
        else:
            _remove_duplicate(entry, target / entry.name)
    left = sorted(p.name for p in old.iterdir())
    if left:
        log.warning("kept %s in %s: not part of the replaced checkpoint and not found unchanged in %s", left, old,
                    target)
    else:
        old.rmdir()


def _remove_duplicate(entry: Path, kept: Path) -> None:
    """Remove ``entry`` only where ``kept`` holds the same: the same file (a hard link), the same bytes, the
    same link, or a directory whose every entry is such a duplicate."""
    if entry.is_symlink():
        if kept.is_symlink() and os.readlink(kept) == os.readlink(entry):
            entry.unlink()
    elif entry.is_dir():
        if kept.is_dir() and not kept.is_symlink():
            for child in entry.iterdir():
                _remove_duplicate(child, kept / child.name)
            if not any(entry.iterdir()):
                entry.rmdir()
    elif kept.is_file() and not kept.is_symlink() and (os.path.samefile(entry, kept) or filecmp.cmp(entry, kept,
                                                                                                   shallow=False)):
        entry.unlink()


# --- read ---------------------------------------------------------------------------------------
def is_quantized_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint only llmquant's reader rebuilds exactly: quantized, or
    with rotations (online Hadamards, RMSNorms in place of LayerNorms) recorded in its config."""
    if not (directory / "config.json").exists():
        return False
    found = read_config(directory)  # broken JSON: one line naming the file
    qconfig = found.get("quantization_config") or {}
    if not isinstance(qconfig, dict):
        raise LlmquantError(f"{directory / 'config.json'}: quantization_config is not an object; expected the "
                            "compressed-tensors quantization_config llmquant writes")
    return qconfig.get("quant_method") == "compressed-tensors" or STRUCTURE in found


# --- structure that rotations add (QuaRot) ------------------------------------------------------
def model_structure(model: nn.Module) -> dict[str, Any]:
    """What the model's architecture class does not say: online rotations in front of Linears (R4)
    and on queries and keys (R3), and RMSNorms that replaced LayerNorms (R1 on a LayerNorm model)."""
    structure: dict[str, Any] = {}
    inputs = {n: rotation_entry(r) for n, m in model.named_modules() if (r := input_rotation_of(m)) is not None}
    qk = {n: asdict(m.qk_rotation.rotation) for n, m in model.named_modules()
          if isinstance(getattr(m, "qk_rotation", None), OnlineRotation)}
    norms = {n: m.eps for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    names = checkpoint_names(model)
    for key, value in (("input_rotations", inputs), ("qk_rotations", qk), ("rms_norms", norms)):
        if value:
            structure[key] = {names.to_disk(name): entry for name, entry in value.items()}
    return structure


def _apply_structure(model: nn.Module, structure: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    for name, eps in structure.get("rms_norms", {}).items():
        norm = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        rms = RMSNorm(norm.weight.shape[0], eps).to(norm.weight.dtype)
        setattr(model.get_submodule(parent) if parent else model, child, rms)
    rebuilt: dict[str, Rotation] = {}  # a learned group's rotation, built once for the Linears that share it
    for name, entry in structure.get("input_rotations", {}).items():
        key = entry.get("group", name)
        rebuilt[key] = rebuilt.get(key) or rotation_from_entry(entry, tensors)
        attach_input_rotation(model.get_submodule(name), rebuilt[key])
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
            module.bias = nn.Parameter(torch.zeros_like(value), requires_grad=False)  # in the stored dtype


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
                    dtype=module.weight.dtype,
                )
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, quantized)
                break
    kv_spec = from_args(qconfig.kv_cache_scheme)
    if kv_spec is not None:
        model_map = detect_model_map(model)
        for layer in model_map.layers(model):
            if (attention := model_map.attention_of(layer)) is not None:
                attention.kv_cache_quantizer = KVCacheQuantizer(kv_spec)
        enable_kv_quantization(model)


def load_quantized(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """Rebuild the model a `save` wrote: same modules, same tensors, same logits; its float tensors in ``dtype``
    (None: the dtype it was quantized in, ``dtype`` of its config.json), in CPU memory."""
    directory = Path(directory)
    check_model_dir(directory)
    with reading(directory / "config.json", "checkpoint config", "the config.json llmquant writes"):
        config = AutoConfig.from_pretrained(directory)
    raw = getattr(config, "quantization_config", None)
    structure = getattr(config, STRUCTURE, None) or {}
    for key in ("quantization_config", STRUCTURE):
        if hasattr(config, key):
            delattr(config, key)
    with no_init_weights():  # every tensor comes from the checkpoint (a missing one is refused below): no random
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or config_dtype(config))  # init first
    unfuse_experts(model, placeholder_weights=True)  # a checkpoint stores one tensor set per expert (`.model.moe`)
    names = checkpoint_names(model)
    if raw is not None:
        with reading(directory / "config.json", "checkpoint config", "the compressed-tensors quantization_config "
                     "llmquant writes"):
            raw = {key: value for key, value in raw.items() if key != TRANSFORM_CONFIG}
            qconfig = _names_in_memory(QuantizationConfig.model_validate(raw), names)
        _apply_quantization_config(model, qconfig)
    reader = CheckpointReader(directory)
    tensors = {names.from_disk(key): value for key, value in reader.read(reader.names()).items()}
    _apply_structure(model, {key: {names.from_disk(n): v for n, v in entries.items()}
                             for key, entries in structure.items()}, tensors)
    tensors = without_transform_tensors(model, tensors)  # vLLM's copies of the rotations llmquant_structure rebuilt
    _add_missing_biases(model, tensors)
    missing, unexpected = model.load_state_dict(_state_dict_from_stored(model, tensors), strict=False)
    model.tie_weights()
    real_missing = [k for k in missing if not _is_tied(model, k)]
    if real_missing or unexpected:
        raise LlmquantError(f"checkpoint {directory} does not match its config: missing {real_missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    return model.eval(), load_tokenizer(directory)


def _names_in_memory(qconfig: QuantizationConfig, names: CheckpointNames) -> QuantizationConfig:
    """The config's module names (ignore, per-name targets) as the model in memory spells them."""
    qconfig.ignore = [names.from_disk(name) for name in qconfig.ignore or []]
    for group in qconfig.config_groups.values():
        group.targets = [names.from_disk(target) for target in group.targets]
    return qconfig


def _is_tied(model: nn.Module, key: str) -> bool:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return bool(getattr(model.config, "tie_word_embeddings", False)) and head is not None and key.endswith(
        "lm_head.weight"
    )

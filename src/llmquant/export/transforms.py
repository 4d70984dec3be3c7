"""Online input rotations (QuaRot's R4 before down_proj, R5 before o_proj, R6 before the readers of a norm) written
as compressed-tensors' ``transform_config``, the form vLLM reads (``.../compressed_tensors/transform/linear.py`` in
vLLM 0.32).

vLLM gives a Linear that a ``transform_config`` group targets with ``location: input`` a child module named
``<group>_input`` holding a dense ``[n, n]`` ``weight`` that it reads from the checkpoint
(``<linear>.<group>_input.weight``), divides by sqrt(n) once after loading, and multiplies its input with before
the Linear: x -> x (W / sqrt(n)) for ``inverse: false``. So the checkpoint stores W = sqrt(n) Q for llmquant's
x -> x Q (a Hadamard's entries are then +-1, exact in any float dtype). Group type ``hadamard`` would make vLLM run
its own Sylvester transform (a CUDA op) instead of the stored matrix, which differs from llmquant's Hadamard for
sizes that are not powers of two; ``random-hadamard`` (compressed-tensors' name for a Hadamard with signs, which
vLLM multiplies densely) is written for Hadamard rotations, ``random-matrix`` for the others.

One group per distinct rotation, named by what it is (``hadamard_1536``, ``hadamard_1536_seed3``, ...), so every
Linear that shares it shares vLLM's one copy, which the checkpoint stores once (`transform_tensors`). R3 (queries
and keys after RoPE) has no such form: vLLM accepts only ``input`` and ``output`` transforms of Linears
(`llmquant.export.targets`). llmquant's own loader rebuilds the rotations from ``llmquant_structure`` and leaves
these tensors aside (`without_transform_tensors`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict
from typing import Any

import torch
from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
from torch import nn

from llmquant.errors import LlmquantError
from llmquant.model.checkpoint_names import CheckpointNames
from llmquant.nn.online_rotation import input_rotation_of
from llmquant.quant.rotation import LEARNED_STORAGE_DTYPE, Rotation, learned_rotation

TRANSFORM_CONFIG = "transform_config"  # the key in config.json's quantization_config


def transform_group(rotation: Rotation) -> str:
    """The ``transform_config`` group (and tensor prefix) of ``rotation``: its kind and size, its seed where it
    has one, a digest of its matrix when learned."""
    name = f"{rotation.kind}_{rotation.n}"
    if rotation.randomize or rotation.kind == "random":
        name += f"_seed{rotation.seed}"
    if rotation.dense is not None:
        name += "_" + hashlib.sha1(rotation.dense.numpy().tobytes()).hexdigest()[:8]
    return name


def _rotated_linears(model: nn.Module) -> dict[str, Rotation]:
    return {name: rotation for name, module in model.named_modules()
            if (rotation := input_rotation_of(module)) is not None}


def transform_tensors(model: nn.Module, names: CheckpointNames, dtype: torch.dtype, prefix: str = "",
                      written: set[str] | None = None) -> dict[str, torch.Tensor]:
    """``<linear>.<group>_input.weight`` = sqrt(n) Q in ``dtype`` for the first Linear of ``model`` (keys prefixed by
    ``prefix``, spelled as on disk) in each group not in ``written`` (which it updates: a model written layer by
    layer passes the same set to every call). vLLM keeps one matrix per group, shared by its Linears, and fills it
    from whichever of their keys the checkpoint holds (vLLM 0.32: the same perplexity with one copy as with one per
    layer), so one copy is written: 9 MiB for the default model's 30 down_proj instead of 283 MiB."""
    written = set() if written is None else written
    tensors = {}
    for name, rotation in _rotated_linears(model).items():
        group = transform_group(rotation)
        if group not in written:
            written.add(group)
            key = f"{prefix}{name}.{group}_input.weight"
            stored = LEARNED_STORAGE_DTYPE if rotation.kind == "learned" else dtype  # (`storable`)
            tensors[names.to_disk(key)] = (rotation.matrix() * math.sqrt(rotation.n)).to(stored)
    return tensors


def transform_config(model: nn.Module, names: CheckpointNames) -> dict[str, Any] | None:
    """The ``transform_config`` naming each online input rotation's Linears (None without any)."""
    targets: dict[str, tuple[Rotation, list[str]]] = {}
    for name, rotation in _rotated_linears(model).items():
        targets.setdefault(transform_group(rotation), (rotation, []))[1].append(names.to_disk(name))
    if not targets:
        return None
    groups = {
        group: TransformScheme(
            type="random-hadamard" if rotation.kind == "hadamard" else "random-matrix",
            apply=[TransformArgs(targets=linears, location="input", inverse=False)],
            randomize=rotation.randomize,
        )
        for group, (rotation, linears) in targets.items()
    }
    return TransformConfig(config_groups=groups).model_dump(mode="json")


def rotation_entry(rotation: Rotation) -> dict[str, Any]:
    """How ``llmquant_structure`` records an online rotation: its fields; a learned one's matrix by the name of its
    transform group (the checkpoint's tensor ``<linear>.<group>_input.weight``, `transform_tensors`)."""
    if rotation.dense is None:
        return asdict(rotation)
    return {"n": rotation.n, "kind": rotation.kind, "label": rotation.label, "group": transform_group(rotation)}


def rotation_from_entry(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Rotation:
    """The rotation a `rotation_entry` records; a learned one's matrix from ``tensors`` (the checkpoint's)."""
    if "group" not in entry:
        return Rotation(**entry)
    suffix = f".{entry['group']}_input.weight"
    found = next((value for key, value in tensors.items() if key.endswith(suffix)), None)
    if found is None:
        raise LlmquantError(f"the checkpoint records a learned rotation '{entry['group']}' but holds no tensor "
                            f"'*{suffix}'; it is incomplete")
    return learned_rotation(found.double() / math.sqrt(entry["n"]), entry["label"])


def without_transform_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (names in memory) without the transform matrices of the model's rotated Linears."""
    keys = {f"{name}.{transform_group(rotation)}_input.weight" for name, rotation in _rotated_linears(model).items()}
    return {key: value for key, value in tensors.items() if key not in keys}

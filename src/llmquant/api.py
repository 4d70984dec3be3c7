"""The Python surface of CONTRACT.md: `quantize`, `load`, `save`; and `train_checkpoint_scales`."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmquant import data
from llmquant.algorithms.scale_training import train_scales
from llmquant.device import DevicePolicy, resolve_device, resolve_dtype
from llmquant.errors import LlmquantError
from llmquant.export.checkpoint import MANIFEST, is_quantized_checkpoint, load_quantized
from llmquant.export.checkpoint import save as save_checkpoint
from llmquant.model.loading import load_float
from llmquant.model.model_map import ModelMap
from llmquant.nn.attention_choice import check_attention, set_attention
from llmquant.nn.quant_linear import set_runtime
from llmquant.parallel import Ranks
from llmquant.pipeline import Manifest, calibration_part, scale_training_entry, scale_training_inputs
from llmquant.pipeline import quantize as run_pipeline
from llmquant.pipeline.activations import ActivationStorage
from llmquant.pipeline.memory import activation_storage
from llmquant.pipeline.run_dir import RunDir
from llmquant.pipeline.source import LayerSource
from llmquant.recipe import Recipe


def as_recipe(recipe: Recipe | str | dict | os.PathLike | None) -> Recipe:
    """A `Recipe` from a recipe, a scheme name, a dict of fields, or a .json/.yaml path."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.build(**recipe)
    text = str(recipe)
    if text.endswith((".json", ".yaml", ".yml")):
        return Recipe.from_file(text)
    return Recipe.build(scheme=text)


def calibration_ids(recipe: Recipe, tokenizer: Any = None,
                    calib: torch.Tensor | str | list[str] | None = None) -> torch.Tensor:
    """Token ids ``[samples, seqlen]`` for calibration: given ids, a text, the texts of a mixture's parts (drawn in
    turn, `llmquant.data.mixed_calibration_samples`), or the recipe's dataset (none when its
    ``calib.samples`` is 0, or not given for a recipe that needs none: `Recipe.calibration_samples`; given ids
    calibrate whatever their count where ``calib.samples`` is not given); with ``scale_training.samples``, the
    windows that only train the scales after the calibration ones (`Recipe.drawn_samples`)."""
    drawn, calibrating = recipe.drawn_samples(), recipe.calibration_samples()
    if isinstance(calib, torch.Tensor):
        empty = calib.ndim == 2 and calib.shape[0] == 0  # (rows for a recipe that needs none: they measure errors)
        if calib.ndim != 2 or calib.shape[1] == 0 or (empty and drawn > 0) or (not empty and recipe.calib.samples == 0):
            shape = tuple(calib.shape)
            raise LlmquantError(f"calib token ids must be a non-empty [samples, seqlen] tensor ([0, seqlen] with "
                                f"calib.samples 0), got {shape}")
        if drawn != calibrating and calib.shape[0] != drawn:
            raise LlmquantError(f"scale_training.samples {drawn} trains on {drawn} rows of calib, the first "
                                f"calib.samples {calibrating} of them calibrating, but {calib.shape[0]} "
                                f"were given; allowed: {drawn} rows, or no scale_training.samples")
        return calib.long()
    if drawn == 0:  # no calibration pass (`llmquant.pipeline.engine`)
        return torch.zeros(0, recipe.calib.seqlen, dtype=torch.long)
    if tokenizer is None:
        raise LlmquantError("a tokenizer is needed to calibrate from text; pass tokenizer= or token ids as calib=")
    if isinstance(calib, list) and not calib:
        raise LlmquantError("calib is an empty list of texts; allowed: token ids, a text, a non-empty list of texts "
                            "(a mixture's parts), or None for the recipe's calib.dataset")
    if calib is None:
        texts = data.corpus_parts(recipe.calib.dataset, "calib")
    else:
        texts = [calib] if isinstance(calib, str) else calib
    parts = [data.tokenize(tokenizer, text) for text in texts]
    return data.mixed_calibration_samples(parts, drawn, recipe.calib.seqlen, recipe.calib.seed)


def quantize(
    model: nn.Module,
    recipe: Recipe | str | dict | os.PathLike | None = None,
    tokenizer: Any = None,
    calib: torch.Tensor | str | list[str] | None = None,
    model_map: ModelMap | None = None,
    progress: bool = True,
    run_dir: RunDir | None = None,
    source: LayerSource | None = None,
    activations: ActivationStorage | str = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    offload: str = "layers",
    max_gpu_memory: int | None = None,
    max_memory: int | None = None,
) -> nn.Module:
    """Quantize ``model`` in place; the run's manifest is kept as ``model.llmquant_manifest``.

    Where it runs (`llmquant.device`): ``device`` auto (None: the GPU when there is one), cpu, cuda or cuda:N;
    ``dtype`` auto (None: the model's own), float32, bfloat16 or float16; ``offload`` layers (each decoder layer
    comes onto the device in turn, the model rests where it is) or none (the whole model on the device);
    ``max_gpu_memory`` bytes the calibration activations may take on the device, ``max_memory`` the CPU memory the
    run aims to stay under (both also cap a layer's working tensors: `llmquant.device`). ``run_dir`` keeps every
    finished layer (and resumes from it), ``source`` streams the decoder layers from disk; ``activations`` is auto,
    memory, disk (`llmquant.pipeline.memory`, ``max_memory`` the cap auto weighs them against) or a storage of its
    own.
    The command line sets them from ``--device``, ``--dtype``, ``--offload``, ``--max-gpu-memory``, ``--resume``,
    ``--max-memory`` and ``--activations``."""
    recipe = as_recipe(recipe)
    policy = DevicePolicy.resolve(device, dtype, offload, max_gpu_memory, max_memory)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seqlen = calib.shape[-1] if isinstance(calib, torch.Tensor) else recipe.calib.seqlen
    if limit is not None and seqlen > limit and recipe.drawn_samples() > 0:  # (0: no samples to run)
        raise LlmquantError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}")
    ids = calibration_ids(recipe, tokenizer, calib)
    if isinstance(activations, str):
        directory = run_dir.activations if run_dir is not None else None
        activations = activation_storage(activations, policy, model, calibration_part(recipe, ids)[0], max_memory,
                                         directory)
    manifest = run_pipeline(model, recipe, ids, model_map=model_map, progress=progress, run_dir=run_dir,
                            source=source, activations=activations, policy=policy)
    model.llmquant_manifest = manifest  # type: ignore[attr-defined]
    return model


def load(path_or_id: str | os.PathLike | None = None, runtime: str = "int8", device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, attention: str = "auto") -> tuple[nn.Module, Any]:
    """A checkpoint written by `save`, a float checkpoint, a .gguf file, or None for the default model.

    ``device``: where the model goes: auto (None: the GPU when there is one, else the CPU), cpu, cuda or cuda:N;
    ``dtype``: auto (None: the dtype it was saved or quantized in; float32 for the default model), float32,
    bfloat16 or float16. ``runtime="int8"`` (the default) runs the W8A8 Linears of a quantized checkpoint as int8
    GEMMs where the kernel takes them there, its W4 (W3, W2) weight-only Linears with the CPU's int4 kernel in
    bfloat16 (as W4A16 kernels compute: within bfloat16's rounding of the simulation), and makes a ``DynamicCache``
    store its quantized KV cache as int8 codes (`set_runtime`); ``"fake"`` simulates all of them, as `quantize` leaves
    the model in memory (the W8A8 Linears and the KV cache give the same logits on both: BENCHMARKS.md, tests).
    ``attention``: "auto" (the default: "blocks" where the model's attention is sdpa, else "model"), "model" (its own
    implementation), "blocks" (a causal prefill on the CPU in blocks of query rows that read only the keys they see:
    the same function, faster below 768 positions) or "bfloat16" (a float32 model's attention in bfloat16, a choice
    that changes the function): `llmquant.nn.attention_choice`.
    """
    target, wanted = resolve_device(device), resolve_dtype(dtype)
    check_attention(attention)
    if path_or_id is not None and Path(path_or_id).is_dir() and is_quantized_checkpoint(Path(path_or_id)):
        model, tokenizer = load_quantized(path_or_id, wanted)
        model.to(target)
        set_runtime(model, runtime)
    else:
        model, tokenizer = load_float(path_or_id, wanted)
        model = model.to(target)
    set_attention(model, attention)
    return model, tokenizer


def save(model: nn.Module, tokenizer: Any, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` as a compressed-tensors checkpoint with its tokenizer and manifest.

    ``directory`` must be new or empty; an llmquant checkpoint there is replaced only with ``overwrite``, and
    files llmquant did not write are never deleted (`llmquant.export.checkpoint.check_output`)."""
    manifest = getattr(model, "llmquant_manifest", None)
    return save_checkpoint(model, tokenizer, directory, manifest.to_dict() if manifest is not None else None,
                           overwrite=overwrite)


def train_checkpoint_scales(checkpoint: str | os.PathLike, model: str | os.PathLike | None = None,
                            scale_training: dict | None = None, device: str | torch.device | None = None,
                            progress: bool = True, ranks: Ranks | None = None) -> tuple[nn.Module, Any]:
    """A checkpoint `save` wrote from a recipe without ``scale_training``, its weights' scales then trained end to end
    as that step of the recipe would have trained them (`llmquant.algorithms.scale_training`): the same scales, bit
    for bit, as quantizing with the step (tested), without the per-layer steps run again.

    ``model``: the float model the checkpoint was quantized from (None: the one its manifest records,
    ``quantized_from``, else the default model), whose tokenizer draws the recipe's windows and whose next-token
    distribution the ``kl`` loss aims at; the manifest records it as ``quantized_from``; ``scale_training``: the step's
    fields (None: its defaults; a bad one is one line, as in a recipe). Returns the trained model (the simulated
    runtime, on ``device``) and its tokenizer; ``model.llmquant_manifest`` is the checkpoint's manifest with the step
    in its recipe, its record in ``results["scale_training"]`` and its seconds. In several processes (``ranks``,
    default: the process group this one belongs to) each takes its share of the float model's targets and of every
    step's samples, as the recipe's step does (`llmquant.parallel`); all end with the same model."""
    ranks = ranks or Ranks.current()
    directory = Path(checkpoint)
    found = _checkpoint_manifest(directory)
    recipe = as_recipe({**found["recipe"], "scale_training": scale_training or {}})
    manifest = Manifest(**{**{key: found[key] for key in _MANIFEST_FIELDS if key in found},
                           "recipe": recipe.model_dump(mode="json")})
    model = model if model is not None else manifest.results.get("quantized_from")
    manifest.results["quantized_from"] = model_source(model)
    start = time.perf_counter()
    quantized_in = (manifest.results.get("placement") or {}).get("dtype")  # (the float model's targets in it too)
    float_model, tokenizer = load_float(model, resolve_dtype(quantized_in))  # (as `quantize` is given it)
    float_model.to(resolve_device(device))
    if tokenizer is None:
        raise LlmquantError(f"{model} has no tokenizer files; scale training draws its windows from the recipe's "
                            "calibration text with the float model's tokenizer")
    ids = calibration_ids(recipe, tokenizer)
    windows, teacher = scale_training_inputs(float_model, recipe, ids, ranks, manifest, progress)
    del float_model
    trained, tokenizer = load(directory, runtime="fake", device=device, attention="model")  # (as `quantize` runs)
    t0 = time.perf_counter()
    result = train_scales(trained, windows, recipe.scale_training.config(), teacher, ranks, progress)
    manifest.results["scale_training"] = scale_training_entry(result, recipe)
    manifest.seconds["scale_training"] = time.perf_counter() - t0
    manifest.seconds["scale_training_total"] = time.perf_counter() - start
    trained.llmquant_manifest = manifest  # type: ignore[attr-defined]
    return trained, tokenizer


_MANIFEST_FIELDS = tuple(field.name for field in dataclasses.fields(Manifest))


def model_source(model: str | os.PathLike | None) -> str | None:
    """A model as a manifest records it (``quantized_from``): a local path made absolute, a hub id as given, None for
    the default model."""
    return str(Path(model).resolve()) if model is not None and Path(model).exists() else model


def _checkpoint_manifest(directory: Path) -> dict:
    """The manifest of an llmquant checkpoint whose scales were not trained yet: one line where it is not one."""
    path = directory / MANIFEST
    if not (directory.is_dir() and is_quantized_checkpoint(directory) and path.is_file()):
        raise LlmquantError(f"{directory} is not a checkpoint llmquant wrote (no quantized config.json and "
                            f"{MANIFEST}); allowed: the --output of llmquant quantize")
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LlmquantError(f"cannot read {path}: {err}") from None
    if not isinstance(found, dict) or not isinstance(found.get("recipe"), dict):
        raise LlmquantError(f"{path} holds no recipe; allowed: the manifest llmquant quantize writes")
    if (found.get("results") or {}).get("scale_training") or found["recipe"].get("scale_training"):
        raise LlmquantError(f"{directory}'s scales were trained already (its recipe has scale_training); allowed: a "
                            "checkpoint quantized without it")
    return found

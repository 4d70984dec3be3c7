"""The Python surface of CONTRACT.md: `quantize`, `load`, `save`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmquant import data
from llmquant.errors import LlmquantError
from llmquant.export.checkpoint import is_quantized_checkpoint, load_quantized
from llmquant.export.checkpoint import save as save_checkpoint
from llmquant.model.loading import load_float
from llmquant.model.model_map import ModelMap
from llmquant.nn.quant_linear import set_runtime
from llmquant.pipeline import quantize as run_pipeline
from llmquant.pipeline.activations import ActivationStorage
from llmquant.pipeline.engine import LayerSource
from llmquant.pipeline.run_dir import RunDir
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


def calibration_ids(recipe: Recipe, tokenizer: Any = None, calib: torch.Tensor | str | None = None) -> torch.Tensor:
    """Token ids ``[samples, seqlen]`` for calibration: given ids, a text, or the recipe's dataset."""
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or calib.numel() == 0:
            shape = tuple(calib.shape)
            raise LlmquantError(f"calib token ids must be a non-empty [samples, seqlen] tensor, got {shape}")
        return calib.long()
    if tokenizer is None:
        raise LlmquantError("a tokenizer is needed to calibrate from text; pass tokenizer= or token ids as calib=")
    text = calib if isinstance(calib, str) else data.corpus(recipe.calib.dataset, "calib")
    tokens = data.tokenize(tokenizer, text)
    return data.calibration_samples(tokens, recipe.calib.samples, recipe.calib.seqlen, recipe.calib.seed)


def quantize(
    model: nn.Module,
    recipe: Recipe | str | dict | os.PathLike | None = None,
    tokenizer: Any = None,
    calib: torch.Tensor | str | None = None,
    model_map: ModelMap | None = None,
    progress: bool = True,
    run_dir: RunDir | None = None,
    source: LayerSource | None = None,
    activations: ActivationStorage | None = None,
) -> nn.Module:
    """Quantize ``model`` in place; the run's manifest is kept as ``model.llmquant_manifest``.

    ``run_dir`` keeps every finished layer (and resumes from it), ``source`` streams the decoder layers
    from disk, ``activations`` may keep the calibration activations on disk (`llmquant.pipeline.quantize`);
    the command line sets them for ``--resume``, ``--max-memory`` and ``--activations``."""
    recipe = as_recipe(recipe)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seqlen = calib.shape[-1] if isinstance(calib, torch.Tensor) else recipe.calib.seqlen
    if limit is not None and seqlen > limit:
        raise LlmquantError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}")
    ids = calibration_ids(recipe, tokenizer, calib)
    manifest = run_pipeline(model, recipe, ids, model_map=model_map, progress=progress, run_dir=run_dir,
                            source=source, activations=activations)
    model.llmquant_manifest = manifest  # type: ignore[attr-defined]
    return model


def load(path_or_id: str | os.PathLike | None = None, runtime: str = "int8") -> tuple[nn.Module, Any]:
    """A checkpoint written by `save`, a float checkpoint, a .gguf file, or None for the default model.

    ``runtime="int8"`` (the default) runs the W8A8 Linears of a quantized checkpoint as int8 GEMMs and makes a
    ``DynamicCache`` store its quantized KV cache as int8 codes (`set_runtime`); ``"fake"`` simulates both, as
    `quantize` leaves the model in memory (the two agree to float rounding: BENCHMARKS.md, tests).
    """
    if path_or_id is not None and Path(path_or_id).is_dir() and is_quantized_checkpoint(Path(path_or_id)):
        model, tokenizer = load_quantized(path_or_id)
        set_runtime(model, runtime)
        return model, tokenizer
    return load_float(path_or_id)


def save(model: nn.Module, tokenizer: Any, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` as a compressed-tensors checkpoint with its tokenizer and manifest.

    ``directory`` must be new or empty; an llmquant checkpoint there is replaced only with ``overwrite``, and
    files llmquant did not write are never deleted (`llmquant.export.checkpoint.check_output`)."""
    manifest = getattr(model, "llmquant_manifest", None)
    return save_checkpoint(model, tokenizer, directory, manifest.to_dict() if manifest is not None else None,
                           overwrite=overwrite)

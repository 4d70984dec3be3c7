"""The memory policy of a run, shared by the command line and the Python API.

- `parse_size`: ``--max-memory`` and ``--max-gpu-memory`` sizes ("2GB", "1500MB", "1.5" GiB).
- `model_for_quantization`: the model, its tokenizer, and where its decoder layers live: in memory, or, under a
  memory cap, on disk, read one layer at a time (`LazyLayers`), with the files a run's fingerprint covers.
- `activation_storage`: where the calibration activations wait between passes (``auto``, ``memory``, ``disk``).
  ``memory`` is the device while their three copies fit under the device policy's budget (a GPU), else pinned
  CPU memory, or a plain list on the CPU; ``disk`` is files in the run directory, one batch read at a time;
  ``auto`` is ``memory``, except that activations that would sit in CPU memory go to disk when they would take
  more than `ACTIVATION_SHARE` of ``--max-memory``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmquant.device import DevicePolicy
from llmquant.errors import LlmquantError
from llmquant.model import lazy
from llmquant.model.loading import load_float, local_checkpoint_dir
from llmquant.pipeline.activations import ActivationStorage, activation_bytes
from llmquant.pipeline.source import LayerSource

log = logging.getLogger(__name__)
ACTIVATION_SHARE = 0.25  # above this share of --max-memory, calibration activations in CPU memory go to disk
ACTIVATION_CHOICES = ("auto", "memory", "disk")
_UNITS = {"": 2**30, "g": 2**30, "gb": 2**30, "gib": 2**30, "m": 2**20, "mb": 2**20, "mib": 2**20}


def parse_size(text: str | None, flag: str = "--max-memory") -> int | None:
    """Bytes from "2GB", "2G", "1500MB", "1.5" (GiB when no unit is given); None stays None."""
    if text is None:
        return None
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if found is None or found.group(2).lower() not in _UNITS or float(found.group(1)) <= 0:
        raise LlmquantError(f"{flag} must be a size such as 2GB, 1500MB or 1.5 (GiB), got '{text}'")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def model_for_quantization(source: str | None, cap: int | None,
                           dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, LayerSource | None, list[Path]]:
    """The model of ``source`` (a hub id, local directory, .gguf file or None for the default) in ``dtype`` (None:
    its own), its tokenizer, a streaming `LayerSource` when ``cap`` (bytes) asks for one (else None), and the
    files a run's fingerprint should cover."""
    if cap is None:
        model, tokenizer = load_float(source, dtype)
        return model, tokenizer, None, []

    directory = local_checkpoint_dir(source)
    model, tokenizer, layers = lazy.load_lazy(directory, dtype)
    if tokenizer is None:
        raise LlmquantError(f"{directory} has no tokenizer files; calibration needs one")
    layer_bytes = sum(p.numel() * p.element_size() for p in layers.model_map.layers(model)[0].parameters())
    if layer_bytes > cap:
        raise LlmquantError(f"--max-memory {cap / 2**20:.1f} MiB is below one decoder layer "
                            f"({layer_bytes / 2**20:.1f} MiB)")
    return model, tokenizer, LayerSource(layers), sorted(set(layers.reader.files.values()))


def activation_storage(choice: str, policy: DevicePolicy, model: nn.Module, calib: torch.Tensor,
                       cap: int | None = None, directory: str | Path | None = None) -> ActivationStorage:
    """Where the calibration activations of ``model`` on token ids ``calib`` wait (see the module docstring);
    ``directory`` holds them on disk (a temporary directory when None)."""
    if choice not in ACTIVATION_CHOICES:
        raise LlmquantError(f"unknown activations choice '{choice}'; allowed: {', '.join(ACTIVATION_CHOICES)}")
    if choice == "disk":
        return _on_disk(directory)
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0)
    dtype = policy.dtype or next(model.parameters()).dtype
    needed = activation_bytes(calib.shape[0], calib.shape[1], hidden, dtype)
    if policy.is_cuda:
        budget = policy.activation_budget() or 0
        if needed <= budget:
            return ActivationStorage(device=policy.device)
        log.info("the calibration activations (%.0f MiB) exceed the device budget (%.0f MiB): they wait in CPU "
                 "memory, one batch moved at a time", needed / 2**20, budget / 2**20)
    if choice == "auto" and cap is not None and needed > ACTIVATION_SHARE * cap:
        log.warning("the calibration activations would take %.0f MiB (3 x %d tokens x %d features, %s), more "
                    "than %d%% of --max-memory %.0f MiB: they wait on disk, one batch in memory at a time",
                    needed / 2**20, calib.numel(), hidden, dtype, 100 * ACTIVATION_SHARE, cap / 2**20)
        return _on_disk(directory)
    return ActivationStorage(device=torch.device("cpu"), pin=True) if policy.is_cuda else ActivationStorage()


def _on_disk(directory: str | Path | None) -> ActivationStorage:
    import tempfile

    return ActivationStorage(directory if directory is not None else tempfile.gettempdir())


__all__ = ["ACTIVATION_CHOICES", "ACTIVATION_SHARE", "activation_storage", "model_for_quantization", "parse_size"]

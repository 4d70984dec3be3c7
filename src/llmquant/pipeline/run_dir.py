"""A run's work directory: what each finished layer left, so an interrupted run resumes where it stopped.

Layout (every file written to a temporary name and renamed, the row last, so a layer counts as finished
only once all of its files are complete)::

    fingerprint.json        what the run depends on (model, recipe, calibration, llmquant version)
    layer-0007.safetensors  the transformed, quantized layer's state dict
    layer-0007.json         its manifest row (marks the layer finished)
    inputs-0007.bin(.json)  layer 7's outputs, the next layer's inputs (`DiskActivations`; the older ones
                            are deleted once layer 7's row is written, so the inputs of the first unfinished
                            layer are always there)
    activations/            the offloaded activations of the layer being worked on, if offloaded

A directory made by a run with another fingerprint is never resumed silently: `RunDir.open` refuses it
with one line. The work directory also backs the streamed checkpoint writer: a layer released from
memory is read back from its file (`layer_state`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmquant.errors import LlmquantError
from llmquant.parallel import SINGLE, Ranks
from llmquant.pipeline.activations import DiskActivations, remove_store
from llmquant.pipeline.rotation import RotationOverrides
from llmquant.quant.rotation import learned_rotation

FINGERPRINT = "fingerprint.json"


def _sampled_bytes(tensor: torch.Tensor, samples: int = 4096) -> bytes:
    """A few thousand evenly spaced values of a tensor (enough to tell two checkpoints apart, cheaply)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    return flat[::step][:samples].float().numpy().tobytes()


def fingerprint(model: nn.Module, recipe: dict[str, Any], calib: torch.Tensor, source_files: list[Path]) -> str:
    """SHA-256 of what a run's result depends on: the model (its config, samples of the tensors in memory,
    and the size and time of the files it streams from), the recipe, the calibration ids, the version."""
    import llmquant

    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update((config.to_json_string() if config is not None else type(model).__name__).encode())
    for name, tensor in model.state_dict().items():
        if not tensor.is_meta:
            digest.update(name.encode() + _sampled_bytes(tensor))
    for path in source_files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    digest.update(calib.numpy().tobytes())
    digest.update(llmquant.__version__.encode())
    return digest.hexdigest()


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class RunDir:
    """The work directory of one run (see the module docstring)."""

    def __init__(self, path: Path, print_: str, ranks: Ranks = SINGLE) -> None:
        self.path = path
        self.fingerprint = print_
        self.ranks = ranks

    @classmethod
    def open(cls, path: str | Path, print_: str, resume: bool, ranks: Ranks = SINGLE) -> RunDir:
        """The run's directory; with ``resume``, an existing one must carry the same fingerprint, without
        it an existing one is started afresh. In several processes rank 0 prepares it and the others join."""
        path = Path(path)
        if ranks.writes:
            cls._prepare(path, print_, resume)
        ranks.barrier()
        return cls(path, print_, ranks)

    @staticmethod
    def _prepare(path: Path, print_: str, resume: bool) -> None:
        marker = path / FINGERPRINT
        if path.exists() and resume and marker.exists():
            found = json.loads(marker.read_text()).get("fingerprint")
            if found != print_:
                raise LlmquantError(
                    f"{path} holds an interrupted run of another model, recipe or calibration set; "
                    "delete it, or run without --resume to start afresh"
                )
            return
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        _write_atomically(marker, lambda tmp: tmp.write_text(json.dumps({"fingerprint": print_})))

    def _layer(self, index: int, suffix: str) -> Path:
        return self.path / f"layer-{index:04d}.{suffix}"

    def finished_layers(self) -> int:
        """How many layers, from the first, are finished."""
        count = 0
        while self._layer(count, "json").exists():
            count += 1
        return count

    def _inputs(self, after_layer: int, reference: bool = False) -> Path:
        """The outputs of a layer on this rank's samples (one process: ``inputs-0007.bin``; several:
        ``inputs-0007-rank1.bin``); with ``reference``, the float layer's outputs on the float model's own inputs
        (``reference-0007.bin``, GPTAQ's stream)."""
        rank = f"-rank{self.ranks.rank}" if self.ranks.world > 1 else ""
        return self.path / f"{'reference' if reference else 'inputs'}-{after_layer:04d}{rank}.bin"

    @property
    def activations(self) -> Path:
        """Where a run that offloads its activations keeps those of the layer being worked on."""
        return self.path / "activations"

    def save_layer(self, index: int, layer: nn.Module, row: dict, outputs: Sequence[torch.Tensor],
                   reference: Sequence[torch.Tensor] | None = None) -> None:
        """Keep a finished layer: every rank its outputs (the next layer's inputs) and the ``reference`` stream's
        when the run carries one, then rank 0 the layer's state and, last, its row; then every rank drops its
        inputs of the layer before."""
        ranks = self.ranks
        for kept, is_reference in ((outputs, False), (reference, True)):
            if kept is None:
                continue
            if isinstance(kept, DiskActivations):  # already on disk: linked, not copied
                kept.link_to(self._inputs(index, is_reference))
            else:
                DiskActivations.write(self._inputs(index, is_reference), kept)
        ranks.barrier()
        if ranks.writes:
            state = {k: v.detach().contiguous() for k, v in layer.state_dict().items()}
            _write_atomically(self._layer(index, "safetensors"), lambda tmp: save_file(state, str(tmp)))
            _write_atomically(self._layer(index, "json"), lambda tmp: tmp.write_text(json.dumps(row, default=str)))
        ranks.barrier()
        if index > 0:
            remove_store(self._inputs(index - 1))
            if reference is not None:
                remove_store(self._inputs(index - 1, reference=True))

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self._layer(index, "safetensors")))

    def layer_row(self, index: int) -> dict:
        return json.loads(self._layer(index, "json").read_text())

    def next_inputs(self, reference: bool = False) -> DiskActivations:
        """The inputs of the first unfinished layer (read-only, on disk); with ``reference``, its float-model inputs."""
        return DiskActivations.open(self._inputs(self.finished_layers() - 1, reference))

    def save_rotations(self, overrides: RotationOverrides, entry: dict) -> None:
        """Keep learned rotations (rank 0), so that a resumed run folds the same ones without learning again."""
        if not self.ranks.writes:
            return
        tensors = {f"R2.{i}": r.dense for i, r in overrides.r2.items()}
        if overrides.r1 is not None:
            tensors["R1"] = overrides.r1.dense
        labels = {"R1": overrides.r1.label if overrides.r1 else None,
                  **{f"R2.{i}": r.label for i, r in overrides.r2.items()}}
        _write_atomically(self.path / "rotations.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        row = {"entry": entry, "labels": labels}
        _write_atomically(self.path / "rotations.json", lambda tmp: tmp.write_text(json.dumps(row, default=str)))

    def rotations(self) -> tuple[RotationOverrides, dict] | None:
        """The learned rotations an interrupted run of the same fingerprint kept, with their manifest entry."""
        if not (self.path / "rotations.json").exists():
            return None
        row = json.loads((self.path / "rotations.json").read_text())
        tensors = load_file(str(self.path / "rotations.safetensors"))
        found = {name: learned_rotation(matrix, row["labels"][name]) for name, matrix in tensors.items()}
        r2 = {int(name.split(".")[1]): r for name, r in found.items() if name.startswith("R2.")}
        return RotationOverrides(r1=found.get("R1"), r2=r2), {**row["entry"], "resumed": True}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["RunDir", "fingerprint"]

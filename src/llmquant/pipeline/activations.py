"""Where a layer's calibration activations live: on the compute device, in (pinned) CPU memory, or on disk.

A decoder layer's inputs, its float reference outputs and its quantized outputs are each one tensor per
calibration sample, ``samples x seqlen x hidden x bytes-per-value``: 0.5 GiB for 128 samples of 512 tokens of
a 2048-wide float32 model, three times over. Three places, one interface (a sequence of tensors like a list:
``store[i]``, ``store[a:b]``, ``len``, iteration, ``append``/``extend``):

- `ActivationList` on the device: a list whose tensors are moved there as they are appended (on a GPU, while
  they fit under the policy's budget: no transfer at all between passes);
- `ActivationList` on the CPU, pinned: the batch being computed is copied to the GPU and back, asynchronously;
- `DiskActivations`: appended to a file as they are produced and read back one batch at a time, so only the
  batch being computed is in memory (the operating system's page cache, which is not the process's memory,
  does the rest).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, MutableSequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import torch

from llmquant.errors import LlmquantError

INDEX_SUFFIX = ".json"


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class ActivationList(list):
    """A list of per-sample tensors kept on ``device`` (pinned when it is the CPU and ``pin``): each appended
    tensor is moved there (a no-op when it already is)."""

    def __init__(self, device: torch.device | str = "cpu", pin: bool = False) -> None:
        super().__init__()
        self.device, self.pin = torch.device(device), pin

    def append(self, tensor: torch.Tensor) -> None:
        moved = tensor.to(self.device)
        if self.pin and moved.device.type == "cpu":
            moved = moved.pin_memory()
        super().append(moved)

    def extend(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self.append(tensor)


class DiskActivations:
    """Per-sample tensors stored back to back in one file; the index (offset, shape, dtype) in memory."""

    def __init__(self, path: Path, entries: list[tuple[int, tuple[int, ...], str]] | None = None,
                 owned: bool = True) -> None:
        self.path = Path(path)
        self.entries = entries if entries is not None else []
        self.size = sum(self._nbytes(e) for e in self.entries)
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if entries is None else 0)
        self.fd = os.open(self.path, flags if owned else os.O_RDONLY, 0o644)
        self.owned = owned
        cleanup = _close_and_delete if owned else _close
        self._finalizer = weakref.finalize(self, cleanup, self.fd, str(self.path))

    @staticmethod
    def _nbytes(entry: tuple[int, tuple[int, ...], str]) -> int:
        _, shape, dtype = entry
        return torch.Size(shape).numel() * getattr(torch, dtype).itemsize

    # --- writing -----------------------------------------------------------------------------------------
    def append(self, tensor: torch.Tensor) -> None:
        if not self.owned:
            raise ValueError(f"{self.path} is opened read-only")
        data = _as_bytes(tensor)
        written = 0
        try:
            while written < len(data):
                written += os.pwrite(self.fd, data[written:], self.size + written)
        except OSError as err:
            raise LlmquantError(f"writing calibration activations to {self.path} failed ({err.strerror}): free "
                                "disk space there or keep them in memory (--activations memory)") from None
        self.entries.append((self.size, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
        self.size += len(data)

    def extend(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self.append(tensor)

    # --- reading -----------------------------------------------------------------------------------------
    def _read(self, index: int) -> torch.Tensor:
        offset, shape, dtype = self.entries[index]
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        target = _as_bytes(tensor)  # the new tensor's own memory: read straight into it
        done = 0
        while done < len(target):
            got = os.preadv(self.fd, [target[done:]], offset + done)
            if got == 0:
                raise EOFError(f"{self.path} ends before sample {index}")
            done += got
        return tensor

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [self._read(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        return self._read(index)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self._read(i)

    # --- keeping -----------------------------------------------------------------------------------------
    def link_to(self, path: Path) -> None:
        """Keep the data under ``path`` too (a hard link: no copy), with its index beside it; the index is
        written last (a file without its index is not a store)."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        os.link(self.path, tmp)
        os.replace(tmp, path)
        write_index(path, self.entries)

    @classmethod
    def open(cls, path: Path) -> DiskActivations:
        """A store kept by `link_to` or `write`, read-only (its file is not deleted with it)."""
        entries = json.loads(path.with_name(path.name + INDEX_SUFFIX).read_text())
        return cls(path, [(offset, tuple(shape), dtype) for offset, shape, dtype in entries], owned=False)

    @classmethod
    def write(cls, path: Path, tensors: Iterable[torch.Tensor]) -> None:
        """Store ``tensors`` under ``path`` (data, then index) so that `open` reads them back."""
        tmp = path.with_name(f".{path.name}.data")
        store = cls(tmp)
        store.extend(tensors)
        store.link_to(path)


def write_index(path: Path, entries: list[tuple[int, tuple[int, ...], str]]) -> None:
    index = path.with_name(path.name + INDEX_SUFFIX)
    tmp = index.with_name(f".{index.name}.tmp")
    tmp.write_text(json.dumps(entries))  # tuples become lists
    os.replace(tmp, index)


def remove_store(path: Path) -> None:
    path.with_name(path.name + INDEX_SUFFIX).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _close(fd: int, _path: str) -> None:
    os.close(fd)


def _close_and_delete(fd: int, path: str) -> None:
    os.close(fd)
    Path(path).unlink(missing_ok=True)


@dataclass
class ActivationStorage:
    """Makes the containers of a run's activations: lists in memory (``directory`` None, the default) kept on
    ``device`` (None: where each tensor is produced; pinned CPU memory with ``pin``), or `DiskActivations` files
    in a new directory of its own inside ``directory`` (each file is deleted with its store, the directory by
    `remove`; nothing else in ``directory`` is touched)."""

    directory: str | os.PathLike | None = None
    device: torch.device | None = None
    pin: bool = False
    path: Path | None = field(default=None, init=False)
    _numbers: Iterator[int] = field(default_factory=count, repr=False)

    def __post_init__(self) -> None:
        if self.directory is not None:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix="activations-", dir=self.directory))

    @property
    def offloads(self) -> bool:
        return self.path is not None

    @property
    def where(self) -> str:
        """"disk", "device" (a list on a GPU), "pinned" (a pinned CPU list) or "memory" (a plain list)."""
        if self.path is not None:
            return "disk"
        if self.device is not None and self.device.type != "cpu":
            return "device"
        return "pinned" if self.pin else "memory"

    def new(self) -> MutableSequence[torch.Tensor] | DiskActivations:
        if self.path is not None:
            return DiskActivations(self.path / f"pass-{next(self._numbers):05d}.bin")
        if self.device is None and not self.pin:
            return []
        return ActivationList(self.device or "cpu", pin=self.pin)

    def adopt(self, kept: DiskActivations) -> MutableSequence[torch.Tensor] | DiskActivations:
        """Activations kept on disk (a resumed run's next inputs) as this storage holds them."""
        if self.offloads:
            return kept
        held = self.new()
        held.extend(kept)
        return held

    def remove(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def activation_bytes(samples: int, seqlen: int, hidden: int, dtype: torch.dtype) -> int:
    """What the activations of a layer take when held: three copies (the inputs, the float reference and the
    quantized outputs) of ``samples x seqlen x hidden`` values of ``dtype``."""
    return 3 * samples * seqlen * hidden * dtype.itemsize


__all__ = ["ActivationList", "ActivationStorage", "DiskActivations", "activation_bytes", "remove_store"]

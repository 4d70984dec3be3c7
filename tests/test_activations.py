"""Calibration activations offloaded to disk: the store gives back what it was given, bit for bit, and is
gone once dropped; a run directory always holds the inputs of its first unfinished layer."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from llmquant.errors import LlmquantError
from llmquant.pipeline import activations
from llmquant.pipeline.activations import ActivationStorage, DiskActivations
from llmquant.pipeline.run_dir import RunDir


def samples() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 5, 7, generator=generator), torch.randn(1, 3, 7, generator=generator).bfloat16(),
            torch.randn(1, 0, 7), torch.arange(6, dtype=torch.int64).reshape(2, 3)]


def test_a_disk_store_gives_back_every_tensor_bit_for_bit(tmp_path: Path) -> None:
    store = DiskActivations(tmp_path / "a.bin")
    store.extend(samples())
    store.append(torch.randn(4, 6).t())  # not contiguous
    expected = [*samples(), store[4]]
    assert len(store) == 5
    for got, want in zip(store, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(store[-1], store[4]) and torch.equal(store[1], samples()[1])
    assert [t.shape for t in store[1:3]] == [(1, 3, 7), (1, 0, 7)]
    with pytest.raises(IndexError, match="sample 5 of 5"):
        store[5]


def test_a_store_is_deleted_with_its_object_unless_kept(tmp_path: Path) -> None:
    store = DiskActivations(tmp_path / "a.bin")
    store.extend(samples())
    store.link_to(tmp_path / "kept.bin")
    del store
    gc.collect()
    assert not (tmp_path / "a.bin").exists()
    kept = DiskActivations.open(tmp_path / "kept.bin")
    assert all(torch.equal(a, b) for a, b in zip(kept, samples(), strict=True))
    with pytest.raises(ValueError, match="read-only"):
        kept.append(torch.zeros(1))
    del kept
    gc.collect()
    assert (tmp_path / "kept.bin").exists()  # opened, not owned: left where it was


def test_the_storage_makes_lists_or_files_and_removes_only_its_own_directory(tmp_path: Path) -> None:
    assert ActivationStorage().new() == [] and not ActivationStorage().offloads
    (tmp_path / "acts").mkdir()
    (tmp_path / "acts" / "mine.txt").write_text("a user's file")
    storage = ActivationStorage(tmp_path / "acts")
    first, second = storage.new(), storage.new()
    assert isinstance(first, DiskActivations) and first.path != second.path
    assert first.path.parent == storage.path and storage.path.parent == tmp_path / "acts"
    kept = DiskActivations.open(_kept(tmp_path))
    assert storage.adopt(kept) is kept and isinstance(ActivationStorage().adopt(kept), list)
    storage.remove()
    assert not storage.path.exists() and (tmp_path / "acts" / "mine.txt").read_text() == "a user's file"


def _kept(tmp_path: Path) -> Path:
    DiskActivations.write(tmp_path / "kept.bin", samples())
    return tmp_path / "kept.bin"


def test_the_run_directory_keeps_the_inputs_of_the_first_unfinished_layer(tmp_path: Path) -> None:
    run = RunDir.open(tmp_path / "run", "print", resume=False)
    layer = torch.nn.Linear(2, 2)
    outputs = [[torch.full((1, 2, 3), float(i))] for i in range(3)]
    run.save_layer(0, layer, {"layer": 0}, outputs[0])
    run.save_layer(1, layer, {"layer": 1}, outputs[1])
    assert run.finished_layers() == 2 and float(run.next_inputs()[0][0, 0, 0]) == 1.0
    assert not (tmp_path / "run" / "inputs-0000.bin").exists()  # older inputs go once a layer is finished
    # killed after layer 2's outputs were kept but before its row: layer 2 is unfinished, its inputs remain
    DiskActivations.write(tmp_path / "run" / "inputs-0002.bin", outputs[2])
    assert run.finished_layers() == 2 and float(run.next_inputs()[0][0, 0, 0]) == 1.0


def test_a_full_disk_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: object) -> int:
        raise OSError(28, "No space left on device")

    store = DiskActivations(tmp_path / "a.bin")
    monkeypatch.setattr(activations.os, "pwrite", full)
    with pytest.raises(LlmquantError, match=r"No space left on device.*--activations memory") as raised:
        store.append(torch.zeros(3))
    assert "\n" not in str(raised.value) and len(store) == 0


def test_the_tail_of_a_stores_samples_reads_them_in_place(tmp_path: Path) -> None:
    """`LayerInputs.tail` (the samples a static KV cache's observers see after the first batch) indexes a store on
    disk, or a list, from its start: the same tensors, read when indexed."""
    from llmquant.pipeline.layer_io import LayerInputs

    store = DiskActivations(tmp_path / "a.bin")
    store.extend(samples())
    for hidden in (store, samples()):
        tail = LayerInputs(hidden, [{"i": i} for i in range(4)]).tail(1)
        assert len(tail.hidden) == 3 and tail.kwargs == [{"i": 1}, {"i": 2}, {"i": 3}]
        assert all(torch.equal(got, want) for got, want in zip(tail.hidden[0:3], samples()[1:], strict=True))
        assert torch.equal(tail.hidden[-1], samples()[3]) and torch.equal(tail.hidden[0], samples()[1])
        with pytest.raises(IndexError, match="sample 3 of 3"):
            tail.hidden[3]
    assert len(LayerInputs(samples(), [{}] * 4).tail(8).hidden) == 0

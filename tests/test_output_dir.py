"""--output never deletes what llmquant did not write: a directory that is not an llmquant checkpoint is refused
before any work, an llmquant checkpoint is replaced only with --overwrite and only its own files go, and a
kill at any point of the swap leaves the old or the new checkpoint complete at the destination."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import llmquant
from conftest import make_model
from llmquant.cli import main
from llmquant.export import checkpoint
from llmquant.export.checkpoint import FILES_KEY, MANIFEST, check_output

SMALL = ["--no-eval", "--quiet", "--calib-samples", "2", "--seqlen", "16"]
Snapshot = dict[str, bytes]


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def snapshot(directory: Path, names: set[str] | None = None) -> Snapshot:
    """The bytes of the checkpoint files in ``directory`` (those its manifest lists, or ``names``)."""
    names = names or set(json.loads((directory / MANIFEST).read_text())[FILES_KEY])
    return {name: (directory / name).read_bytes() for name in sorted(names) if (directory / name).is_file()}


def never_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(llmquant, "load", fail)


# --- the rule ---------------------------------------------------------------------------------------
def test_check_output_decides_every_case(tmp_path: Path) -> None:
    assert check_output(tmp_path / "new") is False
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty") is False
    (tmp_path / "file").write_text("x")
    with pytest.raises(llmquant.LlmquantError, match="is a file, not a directory"):
        check_output(tmp_path / "file", overwrite=True)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a.txt").write_text("x")
    with pytest.raises(llmquant.LlmquantError, match="holds files but no llmquant checkpoint"):
        check_output(tmp_path / "user", overwrite=True)
    (tmp_path / "user" / MANIFEST).write_text("{}")
    with pytest.raises(llmquant.LlmquantError, match="pass --overwrite to replace it"):
        check_output(tmp_path / "user")
    assert check_output(tmp_path / "user", overwrite=True) is True


# --- the command line -------------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_quantize_writes_a_new_or_empty_directory(state: str, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    umask = os.umask(0o022)
    os.umask(umask)
    if state == "empty":
        out.mkdir(mode=0o750)
    assert main(["quantize", "--model", str(tiny_dir), "--output", str(out), *SMALL]) == 0
    files = json.loads((out / MANIFEST).read_text())[FILES_KEY]
    assert sorted(p.name for p in out.iterdir()) == files and "model.safetensors" in files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or run directory left
    assert out.stat().st_mode & 0o777 == (0o750 & ~umask if state == "empty" else 0o777 & ~umask)


@pytest.mark.parametrize("state", ["user file", "user directory", "plain file", "checkpoint", "run directory"])
def test_quantize_refuses_before_any_work(state: str, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    expected = {"user file": "holds files but no llmquant checkpoint", "plain file": "is a file, not a directory",
                "user directory": "holds files but no llmquant checkpoint",
                "checkpoint": "holds an llmquant checkpoint; pass --overwrite",
                "run directory": "is not an llmquant run directory"}[state]
    if state == "plain file":
        out.write_text("mine")
    elif state == "run directory":
        (tmp_path / ".out.run").mkdir()
        (tmp_path / ".out.run" / "notes.txt").write_text("mine")
    elif state == "user directory":
        (out / "notes").mkdir(parents=True)
        (out / "notes" / "a.txt").write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        if state == "checkpoint":
            (out / MANIFEST).write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    never_loaded(monkeypatch)
    start = time.perf_counter()
    overwrite = ["--overwrite"] if state in ("user file", "user directory", "run directory") else []
    assert main(["quantize", "--model", str(tiny_dir), "--output", str(out), *SMALL, *overwrite]) == 2
    assert time.perf_counter() - start < 5
    line = one_line(capsys)
    named = tmp_path / ".out.run" if state == "run directory" else out
    assert f"{named} " in line and expected in line, line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_only_the_checkpoint(tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(tiny_dir), "--output", str(out), *SMALL]) == 0
    old = snapshot(out)
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="llmquant"):
        args = ["quantize", "--model", str(tiny_dir), "--output", str(out), *SMALL, "--scheme", "w_int8_per_tensor"]
        assert main([*args, "--overwrite"]) == 0
    assert f"replacing the llmquant checkpoint in {out}" in caplog.text
    new = snapshot(out)
    assert new["model.safetensors"] != old["model.safetensors"] and set(new) == set(old)
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval" / "results.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_sweep_refuses_a_directory_it_did_not_write(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.md").write_text("my own table")
    never_loaded(monkeypatch)
    assert main(["sweep", "--model", str(tiny_dir), "--output", str(out), "--quiet"]) == 2
    assert f"--output {out} holds files but no sweep (no sweep.json)" in one_line(capsys)
    assert (out / "sweep.md").read_text() == "my own table"
    (tmp_path / "file").write_text("mine")
    assert main(["sweep", "--model", str(tiny_dir), "--output", str(tmp_path / "file"), "--quiet"]) == 2
    assert "is a file, not a directory" in one_line(capsys)


# --- the swap ---------------------------------------------------------------------------------------
@pytest.fixture
def replaced(tmp_path: Path, calib_ids: torch.Tensor) -> tuple[Path, Any, Snapshot, Snapshot]:
    """An llmquant checkpoint at ``out`` holding a user's file and directory, the model that replaces it, the
    old checkpoint's files and the new one's (written once elsewhere: a save writes the same bytes)."""
    out = tmp_path / "out"
    llmquant.save(make_model("llama", seed=0), None, out)
    model = make_model("llama", seed=1)
    llmquant.quantize(model, "w_int8_per_channel", calib=calib_ids, progress=False)
    reference = llmquant.save(model, None, tmp_path / "reference")
    new = snapshot(reference)
    for path in reference.iterdir():
        path.unlink()
    reference.rmdir()
    (out / "notes.txt").write_text("mine")
    (out / "keep").mkdir()
    (out / "keep" / "data.bin").write_bytes(b"\x01\x02")
    return out, model, snapshot(out), new


def assert_whole(out: Path, *allowed: Snapshot) -> Snapshot:
    """``out`` holds exactly one of the ``allowed`` checkpoints, complete, and the user's files unchanged."""
    names = set().union(*allowed)
    found = snapshot(out, names)
    assert found in allowed, sorted(found)
    assert (out / "notes.txt").read_text() == "mine" and (out / "keep" / "data.bin").read_bytes() == b"\x01\x02"
    return found


def test_the_old_checkpoint_files_go_and_the_users_stay(replaced: tuple[Path, Any, Snapshot, Snapshot]) -> None:
    out, model, _, new = replaced
    (out / "tokenizer.json").write_text("{}")  # listed nowhere, but a name llmquant writes: the user's now
    (out / "link").symlink_to("notes.txt")
    out.chmod(0o750)
    with pytest.raises(llmquant.LlmquantError, match="pass --overwrite"):
        llmquant.save(model, None, out)
    llmquant.save(model, None, out, overwrite=True)
    assert_whole(out, new)
    assert (out / "tokenizer.json").read_text() == "{}" and os.readlink(out / "link") == "notes.txt"
    assert out.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_a_user_file_with_a_name_the_new_checkpoint_writes_is_kept(replaced: tuple[Path, Any, Snapshot, Snapshot],
                                                                   tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    out, model, old, _ = replaced
    (out / "tokenizer.json").write_text("mine too")
    with pytest.raises(llmquant.LlmquantError, match=r"holds tokenizer\.json, which the old checkpoint did not write"):
        llmquant.save(model, AutoTokenizer.from_pretrained(tiny_dir), out, overwrite=True)
    assert_whole(out, old)
    assert (out / "tokenizer.json").read_text() == "mine too"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_a_checkpoint_without_a_file_list_loses_only_the_names_llmquant_writes(
    replaced: tuple[Path, Any, Snapshot, Snapshot],
) -> None:
    out, model, _, new = replaced
    (out / MANIFEST).write_text(json.dumps({"recipe": {}}))  # as llmquant wrote it before the list existed
    llmquant.save(model, None, out, overwrite=True)
    assert_whole(out, new)


def counting(real: Callable[..., Any], fail_on: int, calls: list[str]) -> Callable[..., Any]:
    """``real``, raising OSError on its ``fail_on``-th call."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        if len(calls) == fail_on:
            raise OSError(f"killed at call {fail_on}")
        return real(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("fail_on", [1, 2])
def test_two_renames_where_the_exchange_is_missing(fail_on: int, replaced: tuple[Path, Any, Snapshot, Snapshot],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Without renameat2 the swap is two renames; the second failing puts the old checkpoint back."""
    out, model, old, new = replaced
    monkeypatch.setattr(checkpoint, "_exchange", lambda *_: False)
    calls: list[str] = []
    monkeypatch.setattr(os, "replace", counting(os.replace, fail_on, calls))
    with pytest.raises(OSError, match=f"killed at call {fail_on}"):
        llmquant.save(model, None, out, overwrite=True)
    assert_whole(out, old)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint, "_exchange", lambda *_: False)
    llmquant.save(model, None, out, overwrite=True)
    assert_whole(out, new)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_links_fall_back_to_copies(replaced: tuple[Path, Any, Snapshot, Snapshot],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out, model, _, new = replaced
    monkeypatch.setattr(os, "link", counting(os.link, 1, []))  # the first link fails: that file is copied
    llmquant.save(model, None, out, overwrite=True)
    assert_whole(out, new)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two renames"])
def test_a_kill_at_any_step_of_the_swap_leaves_a_whole_checkpoint(
    exchange: bool, replaced: tuple[Path, Any, Snapshot, Snapshot], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before every step that changes a directory (link, exchange, rename, unlink, rmdir) ``out`` holds the old
    or the new checkpoint, complete, and the user's files: a kill there leaves that. With two renames (no
    exchange) the one step between them is the documented exception: ``out`` is briefly absent."""
    out, model, old, new = replaced
    seen: list[Snapshot | None] = []

    def checked(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen.append(assert_whole(out, old, new) if out.exists() or exchange else None)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(checkpoint, "_exchange", checked(checkpoint._exchange if exchange else lambda *_: False))
    for name in ("link", "symlink", "replace", "rename", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, checked(getattr(os, name)))
    llmquant.save(model, None, out, overwrite=True)
    monkeypatch.undo()
    seen.append(assert_whole(out, new))
    assert old in seen and new in seen and len(seen) > 5  # steps were observed on both sides of the swap
    assert seen.count(None) == (0 if exchange else 1)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]

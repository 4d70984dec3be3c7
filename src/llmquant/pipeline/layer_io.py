"""Running decoder layers on calibration inputs: capture the first layer's inputs, run a layer on all of them.

`LayerInputs` holds, per calibration sample, the hidden state a decoder layer receives and the keyword
arguments the model passes it (position embeddings, masks); `run_layer` runs a layer on all of them,
several samples per forward when their keyword arguments are shared. The hidden states and outputs go to
any sequence of tensors a caller gives (``into``): a list, or `DiskActivations` to keep them off memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmquant.errors import LlmquantError
from llmquant.model.model_map import ModelMap


class _StopForwardError(Exception):
    pass


@dataclass
class LayerInputs:
    """The calibration inputs of one decoder layer: a hidden state per sample and the shared kwargs."""

    hidden: Sequence[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def head(self, count: int) -> LayerInputs:
        """The first ``count`` samples (read into memory)."""
        return LayerInputs(list(self.hidden[:count]), self.kwargs[:count])


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, model_map: ModelMap, samples: torch.Tensor,
                         into: MutableSequence[torch.Tensor] | None = None) -> LayerInputs:
    """Run the model up to its first decoder layer for each sample and keep that layer's inputs (the
    hidden states in ``into``, a list by default; equal keyword arguments of consecutive samples are kept
    once)."""
    first = model_map.layers(model)[0]
    captured = LayerInputs(hidden=[] if into is None else into, kwargs=[])

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        kept = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if captured.kwargs and _equal_kwargs(captured.kwargs[-1], kept):
            kept = captured.kwargs[-1]
        captured.kwargs.append(kept)
        raise _StopForwardError

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in samples:
            with contextlib.suppress(_StopForwardError):
                model(row.unsqueeze(0), use_cache=False)
    finally:
        handle.remove()
    return captured


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


BATCH = 8  # calibration samples per layer forward: about 2x faster than one at a time on a CPU


def _equal_kwargs(first: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two samples' kwargs are the same broadcastable set (tensors with a batch dimension of 1)."""
    if other.keys() != first.keys():
        return False
    for key, value in first.items():
        theirs = other[key]
        values = value if isinstance(value, tuple) else (value,)
        others = theirs if isinstance(theirs, tuple) else (theirs,)
        for a, b in zip(values, others, strict=False):
            if isinstance(a, torch.Tensor):
                if not (isinstance(b, torch.Tensor) and a.shape == b.shape and a.shape[:1] == (1,)
                        and torch.equal(a, b)):
                    return False
            elif a != b:
                return False
    return True


def _shared_kwargs(kwargs: list[dict[str, Any]]) -> bool:
    """Whether the samples' kwargs are one and the same broadcastable set (equal-length windows)."""
    return all(_equal_kwargs(kwargs[0], other) for other in kwargs[1:])


def _batches(inputs: LayerInputs, batch: int | None) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """The samples, ``batch`` (default `BATCH`) per forward when their kwargs allow it, else one by one."""
    batch = BATCH if batch is None else batch
    if batch > 1 and not _shared_kwargs(inputs.kwargs):
        batch = 1
    for start in range(0, len(inputs.hidden), batch):
        yield torch.cat(inputs.hidden[start : start + batch]), inputs.kwargs[start]


class _StopAtInputError(Exception):
    """Raised by `inputs_of`'s hook: the rest of the layer's forward is not needed."""


@torch.no_grad()
def inputs_of(layer: nn.Module, module: nn.Module, inputs: LayerInputs, consume: Callable[[torch.Tensor], None],
              batch: int | None = None) -> None:
    """Run the layer on every sample only as far as ``module``: each batch's input of ``module`` goes to
    ``consume`` and the forward stops there (what follows ``module`` is not computed)."""

    def stop(_module: nn.Module, args: tuple) -> None:
        consume(args[0])
        raise _StopAtInputError

    handle = module.register_forward_pre_hook(stop)
    try:
        for hidden, kwargs in _batches(inputs, batch):
            try:
                layer(hidden, **kwargs)
            except _StopAtInputError:
                continue
            raise LlmquantError(f"{type(module).__name__} was not called by its layer's forward")
    finally:
        handle.remove()


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, where: str, batch: int | None = None,
              into: MutableSequence[torch.Tensor] | None = None) -> MutableSequence[torch.Tensor]:
    """The layer's outputs for every sample (appended to ``into``, a new list by default), ``batch``
    (default `BATCH`) samples per forward when their kwargs allow it."""
    outputs = [] if into is None else into
    for hidden, kwargs in _batches(inputs, batch):
        out = _layer_output(layer(hidden, **kwargs))
        if not torch.isfinite(out).all():
            raise LlmquantError(f"{where} produced NaN or inf activations; the model or its inputs are broken")
        outputs.extend(out.split(1))
    return outputs


def relative_error(reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> float:
    """||actual - reference|| / ||reference|| over the samples both hold: a pass over the first samples only
    (a check, an error figure) is compared with the same samples of a pass over all of them, which are read
    one at a time (never sliced into memory when they wait on disk)."""
    num = den = 0.0
    for r, a in zip(reference, actual, strict=False):
        num += float((a - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def head_dim_of(model: nn.Module, model_map: ModelMap) -> int | None:
    attention = model_map.layers(model)[0].get_submodule(model_map.attention)
    return getattr(attention, "head_dim", None) or getattr(getattr(model, "config", None), "head_dim", None)



"""Running decoder layers on calibration inputs: capture the first layer's inputs, run a layer on all of them.

`LayerInputs` holds, per calibration sample, the hidden state a decoder layer receives and the keyword
arguments the model passes it (position embeddings, masks); `run_layer` runs a layer on all of them,
several samples per forward when their keyword arguments are shared. The hidden states and outputs go to
any sequence of tensors a caller gives (``into``): a list, or a store of `llmquant.pipeline.activations` that
keeps them on the device, in pinned CPU memory or on disk. Each batch is moved to the layer's device when it
runs (a no-op for activations already there); the keyword arguments live on the device of the first layer.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmquant.device import device_of, map_tensors, to_device
from llmquant.errors import LlmquantError
from llmquant.model.model_map import ModelMap
from llmquant.nn.experts import all_experts


class _StopForwardError(Exception):
    pass


class _Skipped(Sequence):
    """The samples of ``samples`` from ``start`` on, read (from memory or a store on disk) only when indexed."""

    def __init__(self, samples: Sequence[torch.Tensor], start: int) -> None:
        self.samples, self.start = samples, start

    def __len__(self) -> int:
        return max(0, len(self.samples) - self.start)

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self.samples[self.start + i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        return self.samples[self.start + index % len(self)]


@dataclass
class LayerInputs:
    """The calibration inputs of one decoder layer: a hidden state per sample and the shared kwargs."""

    hidden: Sequence[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def head(self, count: int) -> LayerInputs:
        """The first ``count`` samples (read into memory)."""
        return LayerInputs(list(self.hidden[:count]), self.kwargs[:count])

    def tail(self, start: int) -> LayerInputs:
        """The samples from ``start`` on (not read until used)."""
        return LayerInputs(_Skipped(self.hidden, start), self.kwargs[start:])


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, model_map: ModelMap, samples: torch.Tensor,
                         into: MutableSequence[torch.Tensor] | None = None) -> LayerInputs:
    """Run the model up to its first decoder layer for each sample and keep that layer's inputs (the
    hidden states in ``into``, a list by default; the keyword arguments moved to the first layer's device, equal
    ones of consecutive samples kept once). The ids go to the device of the input embeddings."""
    first = model_map.layers(model)[0]
    device = device_of(first)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    ids_device = device_of(embeddings) if embeddings is not None else device
    captured = LayerInputs(hidden=[] if into is None else into, kwargs=[])

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.to(device))
        kept = to_device({k: v for k, v in kwargs.items() if k != "hidden_states"}, device)
        if captured.kwargs and _equal_kwargs(captured.kwargs[-1], kept):
            kept = captured.kwargs[-1]
        captured.kwargs.append(kept)
        raise _StopForwardError

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in samples:
            with contextlib.suppress(_StopForwardError):
                model(row.unsqueeze(0).to(ids_device), use_cache=False)
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


def input_batches(inputs: LayerInputs, batch: int | None,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """The samples on ``device``, ``batch`` (default `BATCH`) per forward when their kwargs allow it, else one
    by one."""
    batch = BATCH if batch is None else batch
    if batch > 1 and not _shared_kwargs(inputs.kwargs):
        batch = 1
    for start in range(0, len(inputs.hidden), batch):
        chunk = [h.to(device, non_blocking=True) for h in inputs.hidden[start : start + batch]]
        yield torch.cat(chunk), to_device(inputs.kwargs[start], device)


class _StopAtInputError(Exception):
    """Raised by the hooks of `inputs_of` and `run_through`: the rest of the layer's forward is not needed."""


def _raise_stop(*_: Any) -> None:
    raise _StopAtInputError


@torch.no_grad()
def _run_to_stop(layer: nn.Module, module: nn.Module, inputs: LayerInputs, batch: int | None) -> None:
    """Run the layer on every sample until a hook of ``module`` raises `_StopAtInputError`."""
    for hidden, kwargs in input_batches(inputs, batch, device_of(layer)):
        try:
            layer(hidden, **kwargs)
        except _StopAtInputError:
            continue
        raise LlmquantError(f"{type(module).__name__} was not called by its layer's forward")


def inputs_of(layer: nn.Module, module: nn.Module, inputs: LayerInputs, consume: Callable[[torch.Tensor], None],
              batch: int | None = None) -> None:
    """Run the layer on every sample only as far as ``module``: each batch's input of ``module`` goes to
    ``consume`` and the forward stops there (what follows ``module`` is not computed)."""

    def stop(_module: nn.Module, args: tuple) -> None:
        consume(args[0])
        raise _StopAtInputError

    handle = module.register_forward_pre_hook(stop)
    try:
        _run_to_stop(layer, module, inputs, batch)
    finally:
        handle.remove()


def run_through(layer: nn.Module, module: nn.Module, inputs: LayerInputs, batch: int | None = None) -> None:
    """Run the layer on every sample only as far as the end of ``module``'s first call (what ``module`` records when
    called, such as a calibration observer, is recorded; what follows it is not computed)."""
    handle = module.register_forward_hook(_raise_stop)
    try:
        _run_to_stop(layer, module, inputs, batch)
    finally:
        handle.remove()


def inputs_of_each(layer: nn.Module, consumers: dict[nn.Module, Callable[[torch.Tensor], None]],
                   inputs: LayerInputs, batch: int | None = None) -> None:
    """Run the layer on every sample, giving each module's input to its consumer whenever the module is called
    (modules on parallel paths, such as the experts of an MoE block, fed by one pass; a routed expert no token
    chose is not called, and its consumer gets nothing)."""
    handles = [module.register_forward_pre_hook(lambda _m, args, consume=consume: consume(args[0]))
               for module, consume in consumers.items()]
    try:
        for hidden, kwargs in input_batches(inputs, batch, device_of(layer)):
            layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, where: str, batch: int | None = None,
              into: MutableSequence[torch.Tensor] | None = None) -> MutableSequence[torch.Tensor]:
    """The layer's outputs for every sample (appended to ``into``, a new list by default), ``batch``
    (default `BATCH`) samples per forward when their kwargs allow it."""
    outputs = [] if into is None else into
    for hidden, kwargs in input_batches(inputs, batch, device_of(layer)):
        out = _layer_output(layer(hidden, **kwargs))
        if not all(torch.isfinite(bound) for bound in torch.aminmax(out)):  # (a NaN makes both NaN: one read,
            # where isfinite(out).all() wrote a mask and read it)
            raise LlmquantError(f"{where} produced NaN or inf activations; the model or its inputs are broken")
        outputs.extend(out.split(1))
    return outputs


def uncalled_linears(layer: nn.Module, inputs: LayerInputs, where: str, names: list[str]) -> list[str]:
    """The Linears of ``names`` (relative to ``layer``) that a run of the layer on ``inputs`` (every expert taking
    every token) never calls: their parent reads their weight in its own code (Jamba's Mamba mixer computes
    ``dt_proj.weight @ x``), which a quantized module's codes cannot serve."""
    called: set[str] = set()
    handles = [layer.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: called.add(name))
               for name in names]
    try:
        with all_experts(layer):
            run_layer(layer, inputs, where)
    finally:
        for handle in handles:
            handle.remove()
    return [name for name in names if name not in called]


def never_called(layer: nn.Module, model_map: ModelMap, names: list[str]) -> dict[str, str]:
    """`not_quantizable` entries for the Linears ``names`` of ``layer`` that it never calls (`uncalled_linears`)."""
    return {f"{model_map.decoder_layers}.*.{name}": f"{type(layer.get_submodule(name)).__name__}: never called, "
            "its weight read by its parent's own code" for name in names}


def float32_probe(layer: nn.Module, inputs: LayerInputs) -> tuple[nn.Module, Callable[[], Any]]:
    """``layer`` and a run of it on the first calibration sample, for the structure probes of
    `llmquant.model.patterns` (smoothing groups, QuaRot's plan), which compare outputs to 1e-3 .. 1e-5: for a
    bfloat16 or float16 layer, a float32 copy of it on float32 inputs (their rounding would break the probes).
    The copy shares the layer's configs, so what the probes switch there (the attention function) holds."""
    device = device_of(layer)
    hidden, kwargs = inputs.hidden[0].to(device), to_device(inputs.kwargs[0], device)
    if all(p.dtype == torch.float32 for p in layer.parameters() if p.is_floating_point()):
        return layer, lambda: layer(hidden, **kwargs)
    shared = {id(m.config): m.config for m in layer.modules() if hasattr(m, "config")}
    probe = copy.deepcopy(layer, memo=shared).float()
    hidden32, kwargs32 = _as_float32(hidden), _as_float32(kwargs)
    return probe, lambda: probe(hidden32, **kwargs32)


def _as_float32(value: Any) -> Any:
    """``value`` with every floating tensor in it (nested in tuples, lists, dicts) in float32."""
    return map_tensors(value, lambda t: t.float() if t.is_floating_point() else t)


def equivalence_tolerance(dtype: torch.dtype) -> float:
    """The relative output change a function-preserving transform may show in a layer computing in ``dtype``:
    1e-4 in float32; in bfloat16 and float16 the transformed weights are rounded back to the dtype and both
    passes round their products, so 4 eps of the dtype (3.1e-2 and 3.9e-3; seen: 4e-3 .. 7e-3 on tiny bf16
    models, 1.6e-2 on the first layer of a random Llama-3-8B-shaped one in bf16). A transform that does not fit
    the model changes the outputs by far more (4.6e-1 for a smoothing fold into Gemma's (1 + w) norms)."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


def check_equivalence(error: float, dtype: torch.dtype, what: str, where: str, misfit: str) -> float:
    """``error``, the relative output change of a transform that claims to keep the function of ``where``, if it is
    within the `equivalence_tolerance` of ``dtype``; else one error naming ``what`` and the likely ``misfit``."""
    tolerance = equivalence_tolerance(dtype)
    if error > tolerance:
        raise LlmquantError(f"{what} changed the function of {where}: relative output change {error:.2e} > "
                            f"{tolerance:.1e}; {misfit}")
    return error


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in (of its first floating parameter; float32 if it has none)."""
    return next((p.dtype for p in layer.parameters() if p.is_floating_point()), torch.float32)


def head_dim_of(model: nn.Module, model_map: ModelMap) -> int | None:
    """The width of an attention head: the attention module's ``head_dim``, else the config's, else hidden_size //
    num_attention_heads (transformers' own default); None for a model with none of them."""
    attention = next((a for layer in model_map.layers(model) if (a := model_map.attention_of(layer)) is not None),
                     None)
    config = getattr(model, "config", None)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    return (getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
            or (hidden // heads if heads and hidden else None))



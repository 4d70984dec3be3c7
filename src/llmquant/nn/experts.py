"""Mixture-of-experts experts as one `nn.Linear` per matrix, so every method quantizes each expert as the Linear
it is.

transformers 5 stores a block's experts fused, as 3-D parameters: ``gate_up_proj`` [experts, 2 * inter, hidden]
(gate rows first) and ``down_proj`` [experts, hidden, inter] (or another layout the experts module declares:
`llmquant.model.moe`). `Experts` holds the same numbers as one `ExpertMLP`
(``gate_proj``, ``up_proj``, ``down_proj``) per expert and computes the same function from the router's choice:

    y_t = sum over the experts e chosen for token t of  w_{t,e} * down_e(act(gate_e x_t) * up_e x_t)

With ``calibrate_all`` set (`all_experts`), every expert also runs on every token, so that hooks on its Linears
(statistics, Hessians, observers) see all the calibration tokens, while the output still sums the chosen experts
only: the layer computes what it computes without it (llm-compressor's ``calibrate_all_experts``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llmquant.nn.quant_linear import QuantLinear


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``, or ``down_proj(gate(gate_proj(x), up_proj(x)))``
    with a ``gate`` of its own (gpt-oss's clamped SwiGLU, taken from its experts module: `llmquant.model.moe`)."""

    def __init__(self, hidden: int, inter: int, act: Callable[[torch.Tensor], torch.Tensor] | None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None, bias: bool = False,
                 gate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        if act is None and gate is None:
            raise ValueError("an expert needs an activation or a gate function")
        self.gate_proj = nn.Linear(hidden, inter, bias=bias, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=bias, dtype=dtype, device=device)
        self.act_fn, self.gate = act, gate

    def down_input(self, x: torch.Tensor) -> torch.Tensor:
        """What ``down_proj`` gets for ``x``: ``act(gate_proj(x)) * up_proj(x)``, or ``gate`` of the two."""
        if self.gate is not None:
            return self.gate(self.gate_proj(x), self.up_proj(x))
        assert self.act_fn is not None
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.down_input(x))


class Experts(nn.ModuleList):
    """A block's experts, one `ExpertMLP` each, called as transformers' fused experts are:
    ``experts(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``."""

    calibrate_all = False
    calibrate_only: frozenset[int] | None = None  # with calibrate_all: these experts only (None: every one)
    transient_caches = False  # `lean_experts`: each expert forgets its runtime's caches once it has run

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,  # type: ignore[override]
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if self.calibrate_all and (self.calibrate_only is None or index in self.calibrate_only):
                y = expert(hidden_states)[token]  # every token through the expert; the chosen ones kept
            elif token.numel():
                y = expert(hidden_states[token])
            else:
                continue
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
            if self.transient_caches:
                _forget_caches(expert)
        return out


def _forget_caches(expert: nn.Module) -> None:
    for module in expert.modules():
        if isinstance(module, QuantLinear):
            module.drop_caches()


@contextmanager
def _set_on_experts(model: nn.Module, attribute: str, value: bool) -> Iterator[None]:
    """Every `Experts` of ``model`` has ``attribute`` = ``value`` while inside, and what it had before on leaving."""
    lists = [m for m in model.modules() if isinstance(m, Experts)]
    before = [getattr(experts, attribute) for experts in lists]
    for experts in lists:
        setattr(experts, attribute, value)
    try:
        yield
    finally:
        for experts, mode in zip(lists, before, strict=True):
            setattr(experts, attribute, mode)


@contextmanager
def all_experts(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Every `Experts` of ``model`` runs every token through every expert while inside (``enabled``; False: as the
    router chooses, also inside an enclosing ``all_experts``), as it did before on leaving."""
    with _set_on_experts(model, "calibrate_all", enabled):
        yield


@contextmanager
def only_experts(experts: Experts, indices: set[int]) -> Iterator[None]:
    """While inside, `all_experts` sends every token through the experts ``indices`` of ``experts`` only (the
    others run on the tokens routed to them): a pass that gathers those experts' statistics costs their share."""
    experts.calibrate_only = frozenset(indices)
    try:
        yield
    finally:
        experts.calibrate_only = None


@contextmanager
def lean_experts(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While inside (``enabled``), every expert of ``model`` drops what its quantized Linears' runtime built (the
    int4 kernel's copy of the codes, a dequantized weight) as soon as it has run, so that a pass over a layer of
    128 experts holds one expert's caches at a time, not all of them; the function is the same."""
    with _set_on_experts(model, "transient_caches", enabled):
        yield


def down_input_feed(experts: Experts, consumers: dict[int, Callable[[torch.Tensor], None]]
                    ) -> Callable[[torch.Tensor], None]:
    """A consumer of ``experts``' input ``[tokens, hidden]`` that gives each expert of ``consumers`` the input its
    down projection gets when every token goes through it (`all_experts`), without running a down projection, the
    router's sum or what follows in the layer."""
    def consume(hidden_states: torch.Tensor) -> None:
        for index, consume_one in consumers.items():
            consume_one(experts[index].down_input(hidden_states))

    return consume


def expert_index(name: str) -> tuple[str, int] | None:
    """``("...mlp.experts", 3)`` for a name inside expert 3 (``...mlp.experts.3.down_proj``), else None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit() and parts[i - 1] == "experts":
            return ".".join(parts[:i]), int(parts[i])
    return None

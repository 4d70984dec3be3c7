"""SpinQuant (Liu et al. 2024, "SpinQuant: LLM Quantization with Learned Rotations", arXiv 2405.16406): QuaRot's
offline rotations R1 (the residual stream) and R2 (each layer's value heads) learned on calibration data.

Any orthogonal R keeps the float function (y = x W^T = (x R)(W R)^T), but not every R quantizes equally well.
SpinQuant minimises the cross-entropy of the quantized network over R1 and every layer's R2 on the Stiefel manifold
{R : R^T R = I}, starting from the (randomized) Hadamard matrices of QuaRot.

Parameterization here: the network is a copy of the model already rotated by QuaRot's Hadamards H1, H2 (norms
folded, R3/R4 online); learned U1 (hidden x hidden) and U2_l (head_dim x head_dim, one per layer) start at the
identity and act on top, so the rotations found are Q1 = H1 U1 and Q2_l = H2 U2_l, which then fold into the model's
weights exactly as QuaRot's do. `RotatedWeights` writes W U1 for the Linears reading the residual stream,
U1^T W (and b U1) for those writing it, U2^T W_h / W_h U2 per head on the value path; the embeddings' outputs are
multiplied by U1 and the head's input by U1^T (the same products, without rotating a vocabulary-sized table).

Optimiser: Cayley SGD with momentum (Li et al. 2020, "Efficient Riemannian Optimization on the Stiefel Manifold via
the Cayley Transform"). With G the Euclidean gradient at X, A = G X^T - X G^T is skew-symmetric; M <- beta M + A;
X <- (I + a/2 M)^-1 (I - a/2 M) X, the Cayley transform of a skew matrix, orthogonal to float64 rounding; the step
a = min(lr, 1 / ||M||_F) keeps a ||M|| <= 1 (Li et al.'s bound, with q = 1/2). Maths in float64.

Quantization in the loss: each quantized Linear's input and the KV cache are fake-quantized by the recipe's specs
with the straight-through estimator (x + (q(x) - x) detached); weights too when the recipe rounds them to nearest.
With GPTQ the weights stay float in the loss: SpinQuant's README learns the rotations for GPTQ "with respect to a
network where only activations are quantized". Deliberate deviations: static activation and KV specs are learned
against dynamic ranges of the same granularity (their scales are calibrated only after the rotation is fixed); the
default step cap is lr = 0.1, not SpinQuant's 1.5: with 1.5 every step hits the bound a ||M|| = 1 and on the default
model (512-token batches, 30x fewer tokens a step than SpinQuant's) the held-out loss rose (3.465 -> 3.794 after 16
steps, W4A4), with 0.1 it fell to 3.436 (`scripts/learned_rotation_sweep.py`, BENCHMARKS.md). The ``kl`` loss
(KL divergence from the float network's next-token distribution, one more forward a step) is an option.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from llmquant.quant import QuantSpec, fake_quantize, straight_through
from llmquant.quant.rotation import rotate_blocks


@dataclass(frozen=True)
class SpinQuantConfig:
    """The budget and step of the search: ``iterations`` Cayley steps of ``batch`` samples each, drawn in turn
    from the first ``samples`` calibration samples (0: all); ``learn_r2`` also learns each layer's R2."""

    iterations: int = 100
    samples: int = 0
    batch: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    learn_r2: bool = True
    loss: str = "ce"  # "ce": next-token cross-entropy (SpinQuant); "kl": KL(float || quantized) of the next token


@dataclass
class LearnedRotations:
    """The result: U1 and each layer's U2 (float64, on top of the Hadamards), the loss history and the cost."""

    u1: torch.Tensor | None
    u2: dict[int, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    def describe(self) -> dict[str, Any]:
        first, last = self.losses[: max(1, len(self.losses) // 10)], self.losses[-max(1, len(self.losses) // 10):]
        return {"iterations": len(self.losses), "tokens": self.tokens, "seconds": round(self.seconds, 1),
                "loss_first_tenth": sum(first) / len(first) if first else None,
                "loss_last_tenth": sum(last) / len(last) if last else None,
                "learned": (["R1"] if self.u1 is not None else []) + ([f"R2 x {len(self.u2)}"] if self.u2 else [])}


# --- Cayley SGD ------------------------------------------------------------------------------------
def cayley_step(x: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, lr: float,
                beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cayley SGD step (module docstring) of the orthogonal ``x`` along ``-grad``; returns the new point and
    the new momentum (skew-symmetric), both float64."""
    x, grad = x.double(), grad.double()
    skew = beta * momentum + (grad @ x.T - x @ grad.T)
    step = min(lr, 1.0 / (torch.linalg.matrix_norm(skew).item() + 1e-12))
    eye = torch.eye(x.shape[0], dtype=torch.float64, device=x.device)
    return torch.linalg.solve(eye + step / 2 * skew, (eye - step / 2 * skew) @ x), skew


# --- the rotated, fake-quantized network -------------------------------------------------------------
class RotateWeight(nn.Module):
    """Parametrization of a weight: W <- W U on blocks of ``n`` input columns (``side="input"``), or U^T W on
    blocks of ``n`` output rows (``"output"``; a bias [out] as b U per block)."""

    def __init__(self, u: nn.Parameter, side: str) -> None:
        super().__init__()
        self.u, self.side = u, side

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        u = self.u.to(w.dtype)
        return rotate_blocks(w, u.shape[0], self.side, lambda blocks: blocks @ u)


class QuantizerSwitch:
    """Whether the network's quantizers act (off: the float function, the teacher of the "kl" loss)."""

    on = True


class StraightThroughWeight(nn.Module):
    """Parametrization of a weight: fake-quantized by ``spec``, the gradient passing straight through."""

    def __init__(self, spec: QuantSpec, switch: QuantizerSwitch) -> None:
        super().__init__()
        self.spec, self.switch = spec, switch

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize_straight_through(w, self.spec) if self.switch.on else w


def fake_quantize_straight_through(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """fake_quantize(x) in the forward pass, the identity in the backward pass."""
    return straight_through(x, fake_quantize(x, spec))


def learning_spec(spec: QuantSpec) -> QuantSpec:
    """The spec a quantizer is learned against: its own, with a static range made dynamic (module docstring)."""
    return spec if spec.dynamic else spec.model_copy(update={"dynamic": True, "observer": "minmax"})


class KVStraightThrough(nn.Module):
    """An attention's KV-cache quantizer for the loss: keys and values fake-quantized, straight through."""

    def __init__(self, spec: QuantSpec, switch: QuantizerSwitch) -> None:
        super().__init__()
        self.spec, self.switch = learning_spec(spec), switch

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.switch.on:
            return key, value
        return fake_quantize_straight_through(key, self.spec), fake_quantize_straight_through(value, self.spec)


@dataclass(frozen=True)
class LayerRotations:
    """Where one decoder layer's U1 and U2 act (names relative to the layer): Linears reading and writing the
    residual stream, and the value path (producer, reader) of R2."""

    readers: tuple[str, ...]
    writers: tuple[str, ...]
    value_path: tuple[str, str] | None


@dataclass(frozen=True)
class NetworkMap:
    """Where the rotations act in the whole network: the embeddings, each layer, the head; which Linears quantize
    their inputs (and weights, in the loss), which attentions their KV cache (names from the model's root)."""

    embeddings: tuple[str, ...]
    head: str | None
    layers: dict[str, LayerRotations]  # decoder layer name -> its rotations
    inputs: dict[str, QuantSpec]
    weights: dict[str, QuantSpec]
    kv_cache: dict[str, QuantSpec]


def _rotate_weight(linear: nn.Module, u: nn.Parameter, side: str) -> None:
    parametrize.register_parametrization(linear, "weight", RotateWeight(u, side))
    if side == "output" and getattr(linear, "bias", None) is not None:
        parametrize.register_parametrization(linear, "bias", RotateWeight(u, side))


def _hook_output(u: nn.Parameter) -> Callable:
    return lambda _module, _args, out: out @ u.to(out.dtype)


def _hook_input(u: nn.Parameter) -> Callable:
    return lambda _module, args: (args[0] @ u.to(args[0].dtype).T, *args[1:])


def quantize_input_hook(spec: QuantSpec, switch: QuantizerSwitch) -> Callable:
    return lambda _module, args: (fake_quantize_straight_through(args[0], spec), *args[1:]) if switch.on else None


class RotatedNetwork:
    """The network of the loss: ``model`` (QuaRot-rotated, changed in place: pass a copy) with U1 and each layer's
    U2 as parametrizations, and the quantizers of ``where`` as straight-through hooks. ``u1``/``u2`` are the float32
    parameters the forward uses; `set` writes new values into them."""

    def __init__(self, model: nn.Module, where: NetworkMap, hidden: int, head_dim: int) -> None:
        """``hidden``: the size of U1 (0: R1 is not learned); ``head_dim``: the size of the U2s (0: not learned)."""
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.switch = model, QuantizerSwitch()
        self.u1 = nn.Parameter(torch.eye(hidden)) if hidden else None
        self.u2 = {name: nn.Parameter(torch.eye(head_dim)) for name, rows in where.layers.items()
                   if head_dim and rows.value_path is not None}
        if self.u1 is not None:
            self._wire_r1(where, self.u1)
        for layer_name, u2 in self.u2.items():
            producer, reader = where.layers[layer_name].value_path  # type: ignore[misc]
            layer = model.get_submodule(layer_name)
            _rotate_weight(layer.get_submodule(producer), u2, "output")
            _rotate_weight(layer.get_submodule(reader), u2, "input")
        self._wire_quantizers(where)

    def _wire_r1(self, where: NetworkMap, u1: nn.Parameter) -> None:
        """U1 after the embeddings, before the head, on the Linears reading and writing the residual stream."""
        model = self.model
        for name in where.embeddings:
            model.get_submodule(name).register_forward_hook(_hook_output(u1))
        if where.head is not None:
            model.get_submodule(where.head).register_forward_pre_hook(_hook_input(u1), prepend=True)
        for layer_name, rows in where.layers.items():
            layer = model.get_submodule(layer_name)
            for name in rows.readers:
                _rotate_weight(layer.get_submodule(name), u1, "input")
            for name in rows.writers:
                _rotate_weight(layer.get_submodule(name), u1, "output")

    def _wire_quantizers(self, where: NetworkMap) -> None:
        """The straight-through quantizers of the loss, after the rotations (weights, inputs, KV caches)."""
        model = self.model
        for name, spec in where.weights.items():
            quantizer = StraightThroughWeight(spec, self.switch)
            parametrize.register_parametrization(model.get_submodule(name), "weight", quantizer)
        for name, spec in where.inputs.items():
            model.get_submodule(name).register_forward_pre_hook(quantize_input_hook(learning_spec(spec), self.switch))
        for name, spec in where.kv_cache.items():
            model.get_submodule(name).kv_cache_quantizer = KVStraightThrough(spec, self.switch)

    def named_rotations(self) -> Iterator[tuple[str, nn.Parameter]]:
        """("R1", U1) and (layer name, U2) for each layer whose R2 is learned."""
        if self.u1 is not None:
            yield "R1", self.u1
        yield from self.u2.items()

    def loss(self, ids: torch.Tensor, kind: str = "ce") -> torch.Tensor:
        """On token ids ``[b, T]``: the next-token cross-entropy of the quantized network (``"ce"``), or the KL
        divergence from the float network's next-token distribution to the quantized one's (``"kl"``, per token)."""
        if kind == "ce":
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.switch.on = False
        try:
            with torch.no_grad():
                teacher = torch.log_softmax(self.model(input_ids=ids, use_cache=False).logits.float(), -1)
        finally:
            self.switch.on = True
        student = torch.log_softmax(self.model(input_ids=ids, use_cache=False).logits.float(), -1)
        return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


def learn(network: RotatedNetwork, samples: torch.Tensor, config: SpinQuantConfig,
          progress: bool = True) -> LearnedRotations:
    """Cayley SGD on U1 and the U2s of ``network`` over token ids ``samples`` ``[n, T]`` (module docstring)."""
    pool = samples[: config.samples] if config.samples else samples
    names, params = zip(*network.named_rotations(), strict=True)
    points = [p.detach().double().clone() for p in params]
    momenta = [torch.zeros_like(x) for x in points]
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(config.iterations), desc="learning rotations", unit="step", disable=not progress)
    for step in bar:
        first = (step * config.batch) % pool.shape[0]
        batch = pool[torch.arange(first, first + config.batch) % pool.shape[0]]
        for p in params:
            p.grad = None
        loss = network.loss(batch, config.loss)
        loss.backward()
        lr = config.lr * (1 - step / config.iterations)  # linear decay, as SpinQuant's schedule
        with torch.no_grad():
            for i, p in enumerate(params):
                if p.grad is not None:  # (a rotation the loss does not reach keeps its value)
                    points[i], momenta[i] = cayley_step(points[i], p.grad, momenta[i], lr, config.momentum)
                    p.copy_(points[i].to(p.dtype))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    found = dict(zip(names, points, strict=True))
    u1 = found.pop("R1", None)
    return LearnedRotations(u1=u1, u2=found, losses=losses, seconds=time.perf_counter() - start,
                            tokens=config.iterations * config.batch * samples.shape[1])


__all__ = ["KVStraightThrough", "LayerRotations", "LearnedRotations", "NetworkMap", "QuantizerSwitch", "RotateWeight",
           "RotatedNetwork", "SpinQuantConfig", "StraightThroughWeight", "cayley_step",
           "fake_quantize_straight_through", "learn", "learning_spec", "quantize_input_hook"]

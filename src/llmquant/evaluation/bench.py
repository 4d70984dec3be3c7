"""Speed and memory of a (quantized) model against the float model it came from, measured in one run.

Protocol (`run_bench`):

- Inputs: seeded random token ids ``[batch, prompt]`` (the same ids for both models); the models run
  under `torch.no_grad` (as transformers' ``generate``; `torch.inference_mode`'s tensors carry no version
  counter, which the int8 runtime needs to quantize an input shared by several Linears once), on the threads
  torch has (``threads`` in the result).
- One measurement of a model at one batch size: a prefill, ``model(ids, use_cache=True,
  logits_to_keep=1)`` (the prompt's keys and values go to the cache, only the last position's logits
  are computed, as in serving), timed; then ``decode`` greedy steps, each feeding the argmax token
  with the KV cache, timed together. Prefill throughput = batch * prompt / prefill seconds,
  decode throughput = batch * decode / decode seconds.
- Interleaving: a short warm-up per model first (kernels, caches such as the int8 runtime's transposed
  weights), then ``repeats`` rounds; each round measures every batch size for every model in turn, so
  a load on the machine hits both models alike. The figure of a model is the median over rounds.
- Ratios per round (``ratios["rounds"]``): float seconds / quantized seconds of each round's pair of measurements,
  taken one right after the other. A load that comes and goes between rounds moves both sides of a pair, so their
  spread (shown in the table as the lowest and highest) says how far the medians' ratio can be trusted on a busy
  machine.
- Memory: bytes of the model's parameters and buffers (a tensor shared by two names counted once), plus
  ``runtime_cache_bytes``, the tensors a runtime keeps after the first forward outside the state dict
  (a cached dequantized weight); disk: the size of every file of
  the checkpoint directory (or the .gguf file; the cached float32 conversion for the default model).
- Attention: the model's as ``attention`` says (`llmquant.load`; by default the causal blocks of
  `llmquant.nn.causal_blocks` on the CPU), the baseline's as ``baseline_attention`` says, by default as
  transformers runs it ("model"): the ratio then holds the blocks' gain too; ``baseline_attention="blocks"``
  measures the float model with the same attention.
- Ratios are quantized / float: above 1 is faster for throughput, below 1 is smaller for memory.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.device import device_of, dtype_name
from llmquant.errors import LlmquantError
from llmquant.nn.attention_choice import attention_in_use
from llmquant.nn.kv_storage import cache_argument, returned_cache

WARMUP_TOKENS = 16


@dataclass(frozen=True)
class BenchConfig:
    """What is measured: batch sizes, prompt and decode lengths, rounds."""

    batches: tuple[int, ...] = (1, 8)
    prompt: int = 512
    decode: int = 64
    repeats: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"batch": min(self.batches, default=0), "prompt": self.prompt, "decode": self.decode,
                  "repeats": self.repeats}
        for name, value in checks.items():
            if value < 1:
                raise LlmquantError(f"--{name} must be at least 1, got {value}")

    def check_fits(self, model: nn.Module) -> None:
        """The prompt and the decoded tokens must fit the model's positions."""
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and self.prompt + self.decode > limit:
            raise LlmquantError(f"--prompt {self.prompt} + --decode {self.decode} exceeds the model's "
                                f"max_position_embeddings {limit}")


@dataclass(frozen=True)
class ModelFigures:
    """One model's medians (tokens per second by batch size) and its bytes."""

    prefill_tokens_per_s: dict[str, float]
    decode_tokens_per_s: dict[str, float]
    memory_bytes: int
    runtime_cache_bytes: int
    disk_bytes: int | None


@dataclass(frozen=True)
class BenchResult:
    """The figures of both models, their ratios (quantized / float) and how they were measured."""

    model: str
    baseline: str
    runtime: str
    config: BenchConfig
    attention: str  # what each model's attention ran (`llmquant.nn.attention_choice.attention_in_use`)
    baseline_attention: str
    threads: int
    device: str
    baseline_dtype: str
    quantized: ModelFigures
    float32: ModelFigures
    ratios: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        found["config"]["batches"] = list(self.config.batches)
        return found


# --- bytes -----------------------------------------------------------------------------------------
def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in tensors:
        if tensor.is_meta:
            continue
        # (oneDNN's prepacked weights are opaque: no storage to share, each counted once)
        key = (id(tensor), -1) if tensor.is_mkldnn else (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` (tied tensors counted once)."""
    return _unique_bytes([*model.parameters(), *model.buffers()])


def runtime_cache_bytes(model: nn.Module) -> int:
    """Bytes a runtime keeps besides the state dict after a forward (`QuantLinear.runtime_caches`: a cached
    dequantized weight, the int4 kernel's copy of 4-bit codes, oneDNN's copy of int8 codes)."""
    from llmquant.nn.quant_linear import QuantLinear

    return _unique_bytes(t for m in model.modules() if isinstance(m, QuantLinear) for t in m.runtime_caches())


def disk_bytes(path: Path | None) -> int | None:
    """Size of a checkpoint on disk: every file under a directory, or one file; None without a path."""
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_path(source: str | os.PathLike | None) -> Path | None:
    """Where a model given as on the command line lives on disk (None for a hub id)."""
    if source is None:
        from llmquant.model.loading import local_checkpoint_dir

        return local_checkpoint_dir(None)
    path = Path(source)
    return path if path.exists() else None


# --- timing ----------------------------------------------------------------------------------------
def prompt_ids(vocab_size: int, batch: int, prompt: int, seed: int) -> torch.Tensor:
    """Seeded random token ids ``[batch, prompt]``."""
    return torch.randint(0, vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))


def _prefill_kwargs(model: nn.Module) -> dict[str, Any]:
    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"use_cache": True, **({"logits_to_keep": 1} if keeps else {})}


def median_seconds(call: Callable[[], object], repeats: int, warmups: int = 1) -> float:
    """The median wall time of ``call`` over ``repeats`` timed calls, after ``warmups`` untimed ones (the timing
    loop of the scripts that time one operation: `scripts/runtime_profile.py`, `scripts/gptq_sweep_time.py`)."""
    for _ in range(warmups):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronized(device: torch.device) -> float:
    """The clock, once the device has finished what was queued (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_generation(model: nn.Module, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """Seconds of the prefill of ``ids`` and of ``steps`` greedy decode steps after it (KV cache), on the device
    the model is on."""
    device = device_of(model)
    ids = ids.to(device)
    with torch.no_grad():
        start = _synchronized(device)
        out = model(ids, **_prefill_kwargs(model))
        prefilled = _synchronized(device)
        argument = cache_argument(model)
        cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(token, **{argument: cache}, use_cache=True)
            cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        return prefilled - start, _synchronized(device) - prefilled


def measure(models: dict[str, nn.Module], config: BenchConfig, vocab_size: int,
            progress: bool = False) -> dict[str, dict[int, list]]:
    """``{name: {batch: [(prefill_s, decode_s) per round]}}``, the models interleaved (module docstring); with
    ``progress``, a bar of the generations done and the time left (on stderr)."""
    inputs = {b: prompt_ids(vocab_size, b, config.prompt, config.seed) for b in config.batches}
    for model in models.values():
        model.eval()
        time_generation(model, inputs[min(config.batches)][:, :WARMUP_TOKENS], 2)
    times: dict[str, dict[int, list]] = {name: {b: [] for b in config.batches} for name in models}
    rounds = [(batch, name) for _ in range(config.repeats) for batch in config.batches for name in models]
    for batch, name in tqdm(rounds, desc="bench", unit="generation", disable=not progress):
        times[name][batch].append(time_generation(models[name], inputs[batch], config.decode))
    return times


def throughputs(times: dict[int, list], config: BenchConfig) -> tuple[dict[str, float], dict[str, float]]:
    """Median prefill and decode tokens per second by batch size (keys are strings, as in JSON)."""
    prefill = {str(b): b * config.prompt / statistics.median(t[0] for t in runs) for b, runs in times.items()}
    decode = {str(b): b * config.decode / statistics.median(t[1] for t in runs) for b, runs in times.items()}
    return prefill, decode


def round_ratios(quantized: dict[int, list], reference: dict[int, list]) -> dict[str, dict[str, list[float]]]:
    """float seconds / quantized seconds of each round, prefill and decode by batch size (module docstring)."""
    def per_round(part: int) -> dict[str, list[float]]:
        return {str(b): [f[part] / q[part] for q, f in zip(quantized[b], reference[b], strict=True)] for b in quantized}

    return {"prefill": per_round(0), "decode": per_round(1)}


def ratios(quantized: ModelFigures, reference: ModelFigures) -> dict[str, Any]:
    """quantized / float for every figure (None where a size on disk is unknown)."""
    def per_batch(q: dict[str, float], f: dict[str, float]) -> dict[str, float]:
        return {b: q[b] / f[b] for b in q}

    disk = (quantized.disk_bytes / reference.disk_bytes
            if quantized.disk_bytes and reference.disk_bytes else None)
    return {
        "prefill": per_batch(quantized.prefill_tokens_per_s, reference.prefill_tokens_per_s),
        "decode": per_batch(quantized.decode_tokens_per_s, reference.decode_tokens_per_s),
        "memory": quantized.memory_bytes / reference.memory_bytes,
        "memory_with_runtime_cache": (quantized.memory_bytes + quantized.runtime_cache_bytes)
        / (reference.memory_bytes + reference.runtime_cache_bytes),
        "disk": disk,
    }


# --- the whole benchmark -----------------------------------------------------------------------------
def run_bench(
    model: str | os.PathLike | None,
    baseline: str | os.PathLike | None = None,
    runtime: str = "int8",
    config: BenchConfig | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attention: str = "auto",
    progress: bool = False,
    baseline_attention: str = "model",
) -> BenchResult:
    """Benchmark ``model`` (a checkpoint, loaded with ``runtime`` and ``attention``, `llmquant.load`) against
    ``baseline`` (the float model it came from; None: the default model; its attention as ``baseline_attention``
    says, by default as transformers runs it) as the
    module docstring says, both on ``device`` (auto: the GPU when there is one) in ``dtype`` (auto: each in its own,
    a bf16 checkpoint against its bf16 model)."""
    import llmquant

    config = config or BenchConfig()
    start = time.perf_counter()
    quantized, _ = llmquant.load(model, runtime=runtime, device=device, dtype=dtype, attention=attention)
    reference, _ = llmquant.load(baseline, device=device, dtype=dtype, attention=baseline_attention)
    vocab = quantized.config.vocab_size
    if reference.config.vocab_size != vocab:
        raise LlmquantError(f"the baseline's vocabulary ({reference.config.vocab_size} tokens) differs from the "
                            f"model's ({vocab}): pass the float model it was quantized from as --baseline")
    config.check_fits(quantized)
    times = measure({"float": reference, "quantized": quantized}, config, vocab, progress)
    figures: dict[str, ModelFigures] = {}
    for name, net, source in (("float", reference, baseline), ("quantized", quantized, model)):
        prefill, decode = throughputs(times[name], config)
        figures[name] = ModelFigures(prefill, decode, model_bytes(net), runtime_cache_bytes(net),
                                     disk_bytes(checkpoint_path(source)))
    return BenchResult(
        model=str(model) if model is not None else "default", baseline=str(baseline) if baseline else "default",
        runtime=runtime, config=config, attention=attention_in_use(quantized),
        baseline_attention=attention_in_use(reference), threads=torch.get_num_threads(),
        device=_device_name(device_of(quantized)),
        baseline_dtype=dtype_name(next(reference.parameters()).dtype), quantized=figures["quantized"],
        float32=figures["float"],
        ratios=ratios(figures["quantized"], figures["float"]) | {"rounds": round_ratios(times["quantized"],
                                                                                     times["float"])},
        seconds=time.perf_counter() - start,
    )


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f} .. {max(values):.3f}"


def markdown_table(result: BenchResult) -> str:
    """The result as a Markdown table: one row per figure, float | quantized | ratio | the rounds' lowest and
    highest ratios (speed rows)."""
    q, f, r = result.quantized, result.float32, result.ratios
    c = result.config
    rows = [f"{c.prompt}-token prompts, {c.decode} decoded tokens, median of {c.repeats}, runtime "
            f"{result.runtime}, attention {result.attention} (baseline {result.baseline_attention}), "
            f"{result.device}, {result.threads} threads; model "
            f"{result.model}, baseline "
            f"{result.baseline}", "", f"| figure | {result.baseline_dtype} | quantized | quantized / float | rounds |",
            "|---|---|---|---|---|"]
    rounds = r["rounds"]
    for batch in q.prefill_tokens_per_s:
        rows.append(f"| prefill tokens/s, batch {batch} | {f.prefill_tokens_per_s[batch]:.1f} | "
                    f"{q.prefill_tokens_per_s[batch]:.1f} | {r['prefill'][batch]:.3f} | "
                    f"{_spread(rounds['prefill'][batch])} |")
    for batch in q.decode_tokens_per_s:
        rows.append(f"| decode tokens/s, batch {batch} | {f.decode_tokens_per_s[batch]:.1f} | "
                    f"{q.decode_tokens_per_s[batch]:.1f} | {r['decode'][batch]:.3f} | "
                    f"{_spread(rounds['decode'][batch])} |")
    rows.append(f"| parameters + buffers (MiB) | {_mib(f.memory_bytes)} | {_mib(q.memory_bytes)} | "
                f"{r['memory']:.3f} | |")
    rows.append(f"| + runtime caches (MiB) | {_mib(f.memory_bytes + f.runtime_cache_bytes)} | "
                f"{_mib(q.memory_bytes + q.runtime_cache_bytes)} | {r['memory_with_runtime_cache']:.3f} | |")
    rows.append(f"| checkpoint on disk (MiB) | {_mib(f.disk_bytes)} | {_mib(q.disk_bytes)} | {_ratio(r['disk'])} | |")
    return "\n".join(rows)


__all__ = ["BenchConfig", "BenchResult", "ModelFigures", "markdown_table", "model_bytes", "run_bench"]

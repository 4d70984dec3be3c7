"""The W8A8 linear for a few rows (a decode step) on CPUs with AVX512-VNNI, in two calls of a small C++ op,
``int8_gemv.cpp``: the per-token input codes (`token_codes`), and y = s_x * s_w * (x_q @ W_q^T) + b (`gemv_linear`:
VPDPBUSD on the input codes made unsigned, corrected by each weight row's sum, exact in int32; then the scaling and
the bias in the torch path's float32 order; W4A8 and W4A4 weights in groups too, one scale per group), the same bits
as `llmquant.nn.int8_linear`'s torch operations (tested); the input codes of prefills too (`token_codes`,
`static_codes`), and W4A8 Linears (weights in groups) at any row count (`grouped_gemm`: the weight packed once in
VPDPBUSD's layout, blocks of 6 rows by 32 outputs; the same bits as `grouped_linear`), W4A4 ones with inputs per
token in groups too (`grouped_gemm`'s ``input_groups``: the bits of `input_grouped_linear`), their codes, asymmetric
or with a clip ratio searched per token or group, in one call (`block_codes`, shared with the AVX2 op). The INT8 KV
cache (`llmquant.nn.kv_storage`) takes its codes from the same op, and at decode steps its attention reads the int8 (or
FP8) keys and values (`decode_attention`) instead of a dequantized copy of the cache (`dequantize_rows` makes that
copy elsewhere). Weight-only int8 Linears (W8A16, per channel or in groups) run their decode rows on it too
(`weight_only_linear`), and W4 (W3, W2) ones theirs in float32 from the checkpoint's packed 4-bit words (``int4_gemv``,
`llmquant.nn.int4_linear.Int4DecodeRows`). Each product asks for the next block of weight rows while it multiplies
this one.
Built once per machine by ``torch.utils.cpp_extension`` (ninja and a C++ compiler; torch keeps the build in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).

Why: at one row torch's int8 products are not bound by memory as float32's is, and each small operation around
them costs microseconds. On the Xeon of BENCHMARKS.md ("A decode op for W8A8"), one thread, each product on the next
layer's weight as in a forward, at one row: gate_proj 62 us against 162 for ``torch._int_mm``, q_proj 28 against
68; at 4 rows 81 against 135 and 32 against 48; at 8 rows ``torch._int_mm``'s blocked GEMM wins (136 against 156),
hence `GEMV_MAX_ROWS`. A decode step of the default model at batch 1: 62 against 83 ms (float32 84).

Where it cannot run (no VNNI, no compiler or ninja, a failed build: `gemv_refusal`, logged once)
``torch._int_mm`` multiplies as before. ``LLMQUANT_GEMV=0`` turns it off.

On x86 CPUs with AVX2 but no VNNI, a second, smaller op, ``int8_gemv_avx2.cpp``, multiplies W8A8 (and grouped W4A8 /
W4A4) Linears at every row count (`avx2_gemm`: VPMADDWD on the codes widened to 16 bits, exact; the same bits as the
torch path) from a copy of the weight's codes packed once in panels of 16 outputs (`avx2_gemm_pack`: one byte a code,
where the torch path multiplies a float32 copy, `llmquant.nn.int8_linear.int_mm_refusal`), and makes the per-token or
static input codes in one call (`token_codes`, `static_codes`), or, for a decode step's few rows, the codes and the
product in one call (`avx2_token_linear`, `avx2_static_linear`); weight-only int8 Linears too (`avx2_weight_only`),
and W4 ones through int16 input codes (the op's ``int16_linear``: `int16_token_codes`, then ``int8_gemm``, in one
call; `llmquant.nn.int4_linear.int16_linear`). On the AMD EPYC (AVX2) of BENCHMARKS.md, one thread, each product on
the next of 30 weights (`scripts/runtime_profile.py avx2`, bench/speed_2026-12-02_avx2_op/avx2_op_t1.txt): gate_proj
(576 -> 1536) at 1 row 105 against float32's 439 us, at 16 rows 535 against 1,332, at 512 rows 12.1 against 14.2 ms;
k_proj (576 -> 192) 34 against 77 us at 1 row. Its panels, read in order, beat the stored [out, in] rows even at one
row (gate_proj 114 against 174 us in 8 interleaved row streams, an earlier version in one run).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from llmquant.quant.primitives import MIN_SCALE

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 4  # this op up to this many rows (decode steps), torch's products beyond (measured: module docstring)
SOURCE = Path(__file__).with_name("int8_gemv.cpp")
# The instructions `gemv_refusal` checks for; no fused multiply-add contraction (torch's path multiplies, then adds
# the bias: the same bits); OpenMP, without which ATen's parallel_for runs on one thread.
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-ffp-contract=off", "-fopenmp"]
_kernel: ModuleType | None = None
_build_error: str | None = None

AVX2_SOURCE = Path(__file__).with_name("int8_gemv_avx2.cpp")
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]  # (torch's AVX2 capability has FMA too)
_avx2_kernel: ModuleType | None = None
_avx2_build_error: str | None = None


def switch_refusal(device: torch.device) -> str | None:
    """What refuses every C++ op of llmquant before the CPU's instructions are asked: the switch ``LLMQUANT_GEMV=0``,
    and a device other than the CPU; else None."""
    if os.environ.get("LLMQUANT_GEMV", "1") == "0":
        return "off (LLMQUANT_GEMV=0)"
    if device.type != "cpu":
        return "not on the CPU"
    return None


def float32_avx2_refusal(tensor: torch.Tensor, holds: str, build_error: str | None) -> str | None:
    """What refuses a float32 op built with AVX2 (the causal attention op, the E4M3 rounding op) for ``tensor``: the
    switch and the device (`switch_refusal`), another dtype (``holds``: what the tensor is, for the message), a CPU
    without AVX2, the op's failed build (``build_error``); else None."""
    if (refusal := switch_refusal(tensor.device)) is not None:
        return refusal
    if tensor.dtype != torch.float32:
        return f"{tensor.dtype} {holds} (the op takes float32)"
    if not cpu_features().avx2:
        return "the CPU has no AVX2 instructions"
    return build_error


def gemv_refusal(device: torch.device) -> str | None:
    """Why the op does not run on ``device``, or None (it may still fail to build: `gemv_kernel`)."""
    if (refusal := switch_refusal(device)) is not None:
        return refusal
    if not cpu_features().avx512_vnni:
        return "the CPU has no AVX512-VNNI instructions"
    if _kernel is not None:
        return None
    if _build_error is not None:
        return _build_error
    return tool_refusal()


def tool_refusal() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) to build it"
    headers = Path(sysconfig.get_paths()["include"])
    if not (headers / "Python.h").is_file():
        return f"no Python headers ({headers / 'Python.h'}) to build it"
    with _ninja_on_path():
        if shutil.which("ninja") is None:
            return "ninja is not installed (pip install ninja)"
    return None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """The ninja of the ``ninja`` package (installed with llmquant) first on PATH, where torch looks for it."""
    try:
        import ninja
    except ImportError:
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def gemv_kernel() -> ModuleType | None:
    """The built op (built on the first call: about 30 s, once per machine), or None where it cannot be built (the
    reason logged once and kept for `gemv_refusal`)."""
    global _kernel, _build_error
    if _kernel is None and _build_error is None:
        _kernel, _build_error = build_op(SOURCE, "llmquant_int8_gemv", FLAGS, "torch._int_mm")
    return _kernel


def avx2_gemv_refusal(device: torch.device) -> str | None:
    """Why the AVX2 op (``int8_gemv_avx2.cpp``) does not run on ``device``, or None: it runs on x86 CPUs with AVX2
    where the VNNI op does not (`gemv_refusal`) and torch's int8 products are slow (`int_mm_refusal` of
    `llmquant.nn.int8_linear`: no VNNI and no AMX)."""
    if (refusal := switch_refusal(device)) is not None:
        return refusal
    if cpu_features().int8_instructions:
        return "the CPU has VNNI or AMX int8 instructions (torch's int8 products and the VNNI op run there)"
    if not cpu_features().avx2:
        return "the CPU has no AVX2 instructions"
    if _avx2_kernel is not None:
        return None
    return _avx2_build_error if _avx2_build_error is not None else tool_refusal()


@dataclass(frozen=True)
class CpuFeatures:
    """The x86 instructions the CPU runtime chooses its kernels by (torch's probes, read once by `cpu_features`;
    tests feign a CPU by replacing that function)."""

    avx2: bool  # torch runs its kernels with AVX2 or AVX512: the AVX2 op's instructions, FMA included
    avx512: bool  # torch runs its kernels with AVX512
    vnni: bool  # AVX512-VNNI int8 dot products (torch 2.13's probe asks for no AVX-VNNI)
    amx: bool  # AMX tiles: oneDNN's fast int8 and bfloat16 kernels
    avx512_bf16: bool  # bfloat16 dot products

    @property
    def avx512_vnni(self) -> bool:
        """torch's kernels at AVX512 and VNNI: the VNNI op's instructions."""
        return self.avx512 and self.vnni

    @property
    def int8_instructions(self) -> bool:
        """VNNI or AMX: x86 int8 kernels without them multiply slowly, in 16-bit pairs that can saturate."""
        return self.vnni or self.amx

    @property
    def native_bfloat16(self) -> bool:
        """AVX512-BF16 or AMX: without them oneDNN emulates its bfloat16 GEMM (a 512-token W4 prefill took 6x
        float32's time on an AVX2-only EPYC: BENCHMARKS.md "Runtimes")."""
        return self.avx512_bf16 or self.amx


@functools.cache
def cpu_features() -> CpuFeatures:
    """This CPU's `CpuFeatures`."""
    capability = torch.backends.cpu.get_cpu_capability()
    return CpuFeatures(avx2=capability in ("AVX2", "AVX512"), avx512=capability == "AVX512",
                       vnni=torch.cpu._is_vnni_supported(), amx=torch.cpu._is_amx_tile_supported(),
                       avx512_bf16=torch.cpu._is_avx512_bf16_supported())


def weight_only_refusal(device: torch.device) -> str | None:
    """Why neither the decode op nor the AVX2 op runs weight-only int8 Linears on ``device``, or None."""
    vnni = gemv_refusal(device)
    if vnni is None or (avx2 := avx2_gemv_refusal(device)) is None:
        return None
    return vnni if vnni == avx2 else f"{vnni}; the AVX2 op: {avx2}"


def avx2_kernel(tensor: torch.Tensor) -> ModuleType | None:
    """The AVX2 op where it runs for ``tensor``'s device (built on the first call, once per machine), else None."""
    global _avx2_kernel, _avx2_build_error
    if avx2_gemv_refusal(tensor.device) is not None:
        return None
    if _avx2_kernel is None:
        _avx2_kernel, _avx2_build_error = build_op(AVX2_SOURCE, "llmquant_int8_gemv_avx2", AVX2_FLAGS,
                                                   "the float32 product of the codes")
    return _avx2_kernel


STALE_LOCK_SECONDS = 600  # a build takes about a minute here; a lock this old was left by a build that was stopped


def drop_stale_lock(name: str) -> bool:
    """Remove the build lock of op ``name`` where it is older than `STALE_LOCK_SECONDS`, with a warning: torch waits
    forever on the lock a stopped build (Ctrl-C, a killed process) left behind. Returns whether it removed one. The
    build folder is torch's (a private function of `torch.utils.cpp_extension`; where a later torch lacks it, nothing
    is removed)."""
    from torch.utils import cpp_extension

    build_directory = getattr(cpp_extension, "_get_build_directory", None)
    if build_directory is None:
        return False
    lock = Path(build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= STALE_LOCK_SECONDS:
        return False  # (another process may be building it now: torch waits for it)
    log.warning("llmquant runtime: removing %s, a build lock %.0f s old (a build stopped before it finished)", lock,
                age)
    lock.unlink(missing_ok=True)
    return True


def build_op(source: Path, name: str, flags: list[str], instead: str) -> tuple[ModuleType | None, str | None]:
    """The op built from ``source`` (kept by torch in ``TORCH_EXTENSIONS_DIR``), or None and why: the tools missing
    (`tool_refusal`), or the build failing (logged once; ``instead`` names what runs then). Also builds
    `llmquant.nn.causal_blocks`' attention op."""
    if (refusal := tool_refusal()) is not None:
        return None, refusal
    log.info("llmquant runtime: loading the C++ op %s (built on its first use on a machine)", source.name)
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension
        drop_stale_lock(name)
        with _ninja_on_path():
            kernel = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=flags,
                                        extra_ldflags=["-fopenmp"])
        log.info("llmquant runtime: %s ready in %.1f s", source.name, time.perf_counter() - start)
        return kernel, None
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        error = f"building {source.name} failed ({type(err).__name__}: {first_line})"
        log.warning("llmquant runtime: %s; %s runs instead", error, instead)
        return None, error


def cpu_kernel(tensor: torch.Tensor) -> ModuleType | None:
    """The built op where it runs for ``tensor``'s device (on the CPU), else None."""
    return gemv_kernel() if gemv_refusal(tensor.device) is None else None


def kv_kernel(tensor: torch.Tensor) -> ModuleType | None:
    """The op that serves an INT8 KV cache's decode steps (`store_token_codes`, `decode_attention`) for ``tensor``'s
    device: the VNNI op, else the AVX2 op, else None."""
    kernel = cpu_kernel(tensor)
    return kernel if kernel is not None else avx2_kernel(tensor)


def call_op(kernel: ModuleType, name: str, *args: object) -> Any:
    """``kernel.<name>(*args)``; under torch.profiler inside a ``llmquant::<name>`` range, so that its profile shows
    the op's calls (which, bound by pybind11 rather than registered with torch, it does not see otherwise)."""
    if not torch.autograd.profiler._is_profiler_enabled:
        return getattr(kernel, name)(*args)
    with torch.profiler.record_function(f"llmquant::{name}"):
        return getattr(kernel, name)(*args)


def scale_product(kernel: ModuleType, product: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``product`` (contiguous ``[n, out]``: oneDNN's exact integer product in float32, or ``torch._int_mm``'s in
    int32, converted to float32 in its own memory) times s_x * s_w, plus the bias, in place and in one pass:
    `llmquant.nn.int8_linear.scale_output`'s values without its ``[n, out]`` outer product or, for int32, the new
    float32 tensor of its promotion (`scripts/runtime_profile.py ops`). Returns the float32 result (a view of
    ``product``'s memory)."""
    call_op(kernel, "scale_product", product, scale, weight_scale, bias)
    return product if product.dtype == torch.float32 else product.view(torch.float32)


def dequantize_rows(kernel: ModuleType, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = float(codes) * scales in one pass, for int8 ``codes`` ``[planes, s, d]`` (each plane's rows
    contiguous, the planes possibly apart), float32 ``scales`` ``[planes, s, 1]`` and a contiguous float32 ``out``:
    the INT8 KV cache's dequantization, the values of ``out.copy_(codes).mul_(scales)``."""
    call_op(kernel, "dequantize_rows", codes, scales, out)


def decode_attention(kernel: ModuleType, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     key_scales: torch.Tensor, value_scales: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v for one query position ``query`` ``[b, H, 1, dk]`` over int8 ``keys``
    ``[b, h, s, dk]`` and ``values`` ``[b, h, s, dv]`` (views of an INT8 KV cache's stores) with their scales ``[b, 1
    or h, s, 1]``, read as codes: the cache is not dequantized into memory. ``mask``: None, or ``[b, 1 or H, 1, s]``
    float (added) or bool (True: attend), as transformers gives sdpa. Returns ``[b, 1, H, dv]``, the layout of
    transformers' sdpa attention's output. float32, not the bits of sdpa over the dequantized cache (a rounding
    order and an exp of its own; tests bound the difference)."""
    batch, heads = query.shape[:2]
    flat_mask = None if mask is None else mask.reshape(batch, mask.shape[1], mask.shape[-1])
    out = call_op(kernel, "int8_decode_attention", query.reshape(batch, heads, -1), keys, values, key_scales,
                  value_scales, flat_mask, float(scaling))
    return out.unsqueeze(1)


def token_codes(kernel: ModuleType, rows: torch.Tensor, qmax: int, qmin: int, clip_ratio: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes of float32 ``rows`` ``[..., in]`` and their scales ``[rows, 1]``: what
    `llmquant.nn.int8_linear.int8_codes` makes for a dynamic per-token input (clipped: the scale from clip_ratio *
    absmax, the codes clamped to [qmin, qmax]), in one call."""
    codes, scale = call_op(kernel, "token_codes", rows, float(qmax), MIN_SCALE, float(qmin), float(clip_ratio))
    return codes, scale


def block_codes(kernel: ModuleType, blocks: torch.Tensor, qmin: int, qmax: int, clip: float | tuple[float, ...],
                asymmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes of float32 ``blocks`` ``[..., width]`` (each row a block: a token, or a token's group of columns)
    and their scales ``[rows, 1]`` by either op (``block_codes.h``) in one call: what
    `llmquant.nn.int8_linear.int8_codes` (symmetric) or `asymmetric_int8_codes` (shifted by the zero point) make per
    token, with a clip ratio or a grid of them searched per block (``clip`` a tuple:
    `llmquant.quant.primitives.searched_clip_ratios`); the same bits. A block with a NaN has a NaN scale."""
    grid = [float(ratio) for ratio in clip] if isinstance(clip, tuple) else [float(clip)]
    width = blocks.shape[-1]
    codes, scale = call_op(kernel, "block_codes", blocks.reshape(-1, width).contiguous(), float(qmin), float(qmax),
                           MIN_SCALE, grid, asymmetric)
    return codes.reshape(blocks.shape), scale


def int16_token_codes(kernel: ModuleType, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int16 codes of float32 ``rows`` ``[n, in]`` and their scales ``[n, 1]`` by the AVX2 op, in one call:
    torch's ``s = (|x|.amax(1) / 32767).clamp(min=tiny)``, ``round(x / s)`` as int16, the same bits."""
    codes, scale = call_op(kernel, "int16_token_codes", rows.contiguous())
    return codes, scale


def store_token_codes(kernel: ModuleType, states: list[torch.Tensor], codes: torch.Tensor, scales: torch.Tensor,
                      length: int, qmax: int, qmin: int, clip_ratio: float = 1.0) -> None:
    """Write the per-token codes of float32 ``states`` (p tensors ``[b, h, n, d]``: a decode step's keys and values)
    and their scales into an INT8 KV cache's stores ``codes`` ``[p, b, h, capacity, d]`` int8 and ``scales`` ``[p, b,
    h, capacity, 1]`` at the positions ``[length, length + n)``: `token_codes`' bits, without a new tensor."""
    call_op(kernel, "store_token_codes", states, codes, scales, length, float(qmax), MIN_SCALE, float(qmin),
            float(clip_ratio))


def store_static_codes(kernel: ModuleType, states: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                       length: int, scale: torch.Tensor, qmin: float, qmax: float) -> None:
    """Write the static per-tensor codes of float32 ``states`` ``[b, h, n, d]`` (a decode step's keys or values) into
    an INT8 or FP8 KV cache's store ``codes`` ``[1, b, h, capacity, d]`` and the one ``scale`` into ``scales`` ``[1, b,
    1, capacity, 1]`` at the positions ``[length, length + n)``: `quantize_states`' bits (int8: clamp(round(x / s),
    qmin, qmax); E4M3: torch's conversion of clamp(x / s, -qmax, qmax)), without a new tensor."""
    call_op(kernel, "store_static_codes", states, codes, scales, length, scale, float(qmin), float(qmax))


def tensor_codes(kernel: ModuleType, rows: torch.Tensor, qmax: int, qmin: int, clip_ratio: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor dynamic int8 codes of float32 ``rows`` ``[..., in]`` and their one scale ``[1, 1]`` (from
    clip_ratio * the absmax of every value; clipped codes clamped to [qmin, qmax]): what
    `llmquant.nn.int8_linear.int8_codes` makes for a dynamic per-tensor input, in one call."""
    codes, scale = call_op(kernel, "tensor_codes", rows, float(qmax), MIN_SCALE, float(qmin), float(clip_ratio))
    return codes, scale


def static_codes(kernel: ModuleType, rows: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """int8 codes clamp(round(x / s), qmin, qmax) of float32 ``rows`` ``[n, in]`` under one static ``scale``: what
    `llmquant.nn.int8_linear.int8_codes` makes for a static per-tensor input, in one call."""
    return call_op(kernel, "static_codes", rows, scale, float(qmin), float(qmax))


def static_fp8_codes(kernel: ModuleType, rows: torch.Tensor, scale: torch.Tensor, qmax: float) -> torch.Tensor:
    """FP8 (E4M3) codes of float32 ``rows`` ``[..., in]`` under one static ``scale``, as float8_e4m3fn: what
    `llmquant.quant.primitives.quantize` makes for a float spec per tensor (clamp(x / s, -qmax, qmax), then torch's
    own conversion), in one call."""
    return call_op(kernel, "static_fp8_codes", rows, scale, float(qmax)).view(torch.float8_e4m3fn)


def gemv_linear(kernel: ModuleType, x_codes: torch.Tensor, weight_codes: torch.Tensor, row_sums: torch.Tensor,
                scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                group_size: int = 0) -> torch.Tensor:
    """y ``[n, out]`` float32 in one call, for int8 ``x_codes`` ``[n, in]`` with ``scale`` (``[n, 1]`` or ``[1, 1]``)
    and ``weight_codes`` ``[out, in]`` with their row sums (`weight_row_sums`). ``group_size`` 0: ``weight_scale``
    ``[1, out]`` or ``[1, 1]``, y = float(x_q @ W_q^T) * (s_x * s_w) + b (`llmquant.nn.int8_linear.scale_output`'s
    order); else ``weight_scale`` ``[out, groups]``, y = (sum over groups in order of float(x_q,g @ W_q,g^T) * s_w,g)
    * s_x + b (`llmquant.nn.int8_linear.grouped_linear`'s). The integer products are exact."""
    return call_op(kernel, "int8_gemv", x_codes.contiguous(), weight_codes.contiguous(), row_sums, scale,
                   weight_scale, bias, group_size)


AVX2_PANEL = 16  # outputs of a panel of `avx2_gemm_pack`


def avx2_gemm_pack(weight_codes: torch.Tensor, weight_scale: torch.Tensor, group_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """What `avx2_gemm` reads of int8 ``weight_codes`` ``[out, in]`` (``in`` even) with ``weight_scale`` (``[1, out]``
    or ``[1, 1]``, or ``[out, groups]`` in groups of ``group_size`` columns): the codes in panels of 16 outputs,
    ``[ceil(out / 16), in / 2, 16, 2]`` (each input pair of 16 outputs in 32 bytes; zero rows past ``out``), and the
    scales ``[groups, ceil(out / 16) * 16]`` float32 (one group for a scale per output or one)."""
    panels, scales = _panels(weight_codes, weight_scale, group_size)
    return panels.reshape(*panels.shape[:2], -1, 2).permute(0, 2, 1, 3).contiguous(), scales


def avx2_gemm(kernel: ModuleType, x_codes: torch.Tensor, pack: tuple[torch.Tensor, torch.Tensor],
              scale: torch.Tensor, bias: torch.Tensor | None, outputs: int, group_size: int = 0,
              input_group_size: int = 0) -> torch.Tensor:
    """y ``[..., out]`` float32 in one call, for int8 (or int16) ``x_codes`` ``[..., in]`` (any number of rows) with
    ``scale`` (one per row, or one) and the weight packed by `avx2_gemm_pack`; ``group_size`` 0: y = float(x_q @
    W_q^T) * (s_x * s_w) + b (`llmquant.nn.int8_linear.scale_output`'s order), else y = (sum over groups in order of
    float(x_q,g @ W_q,g^T) * s_w,g) * s_x + b (`llmquant.nn.int8_linear.grouped_linear`'s): the same bits, the integer
    products exact (int16 codes: while a group's sums fit int32, the caller's check). ``input_group_size`` (with
    ``group_size`` 0): inputs per token in groups of that many columns, ``scale`` ``[rows, in / input_group_size]``,
    y = (sum over groups in order of float(x_q,g @ W_q,g^T) * s_x,g) * s_w + b
    (`llmquant.nn.int8_linear.input_grouped_linear`'s order). Tiles of 6 rows by 16 outputs, each input pair of the
    16 multiplied by one VPMADDWD, the panels in parallel."""
    packed, scales = pack
    y = call_op(kernel, "int8_gemm", x_codes.reshape(-1, x_codes.shape[-1]).contiguous(), packed, scales, scale,
                bias, outputs, group_size, input_group_size)
    return y.reshape(*x_codes.shape[:-1], outputs)


def avx2_token_linear(kernel: ModuleType, rows: torch.Tensor, qmax: int, qmin: int, clip_ratio: float,
                      pack: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None, outputs: int) -> torch.Tensor:
    """`token_codes` of float32 ``rows`` ``[..., in]``, then `avx2_gemm` (a weight scale per output or one, no
    groups), in one call of the AVX2 op (``token_linear``): the same bits, y ``[..., out]`` float32, with none of the
    two calls' Python between them (a decode step's Linears: `llmquant.nn.int8_linear.DecodeRows`)."""
    packed, scales = pack
    return call_op(kernel, "token_linear", rows, float(qmax), MIN_SCALE, float(qmin), float(clip_ratio), packed,
                   scales, bias, outputs)


def avx2_static_linear(kernel: ModuleType, rows: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                       pack: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None, outputs: int
                       ) -> torch.Tensor:
    """`avx2_token_linear` for a static per-tensor input ``scale``: the codes clamp(round(x / s), qmin, qmax) (the
    bits of `llmquant.nn.int8_linear.int8_codes`), then `avx2_gemm`, in one call of the AVX2 op (``static_linear``)."""
    packed, scales = pack
    return call_op(kernel, "static_linear", rows, scale, float(qmin), float(qmax), packed, scales, bias, outputs)


def avx2_weight_only_pack(weight_codes: torch.Tensor, weight_scale: torch.Tensor, group_size: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """What `avx2_weight_only` reads of a weight-only int8 weight ``[out, in]`` with ``weight_scale`` (one per output,
    or one, or ``[out, groups]`` in groups of ``group_size`` columns): the codes in panels of 16 outputs, ``[ceil(out
    / 16), in, 16]`` (each input's 16 codes together; zero rows past ``out``), and the scales ``[groups, ceil(out /
    16) * 16]`` float32."""
    panels, scales = _panels(weight_codes, weight_scale, group_size)
    return panels.transpose(1, 2).contiguous(), scales


def _panels(weight_codes: torch.Tensor, weight_scale: torch.Tensor, group_size: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes ``[out, in]`` as ``[ceil(out / 16), 16, in]`` (zero rows past ``out``) and the weight scales as
    ``[groups, ceil(out / 16) * 16]`` float32 (one group for a scale per output, or one)."""
    out, inner = weight_codes.shape
    pad = -out % AVX2_PANEL
    panels = torch.nn.functional.pad(weight_codes, (0, 0, 0, pad)).reshape(-1, AVX2_PANEL, inner)
    groups = inner // group_size if group_size else 1
    scales = weight_scale.reshape(-1, groups).float().expand(out, groups)
    return panels, torch.nn.functional.pad(scales, (0, 0, 0, pad)).t().contiguous()


def avx2_weight_only(kernel: ModuleType, rows: torch.Tensor, pack: tuple[torch.Tensor, torch.Tensor],
                     bias: torch.Tensor | None, outputs: int, group_size: int = 0) -> torch.Tensor:
    """`weight_only_linear`'s y (within float32 roundings of ``x @ dequantized(W_q)^T + b``) by the AVX2 op, for
    float32 ``rows`` ``[n, in]`` and the weight packed by `avx2_weight_only_pack`: the weight read at one byte a
    code, not as its float32 copy."""
    packed, scales = pack
    return call_op(kernel, "weight_only_gemm", rows, packed, scales, bias, outputs, group_size)


WEIGHT_ONLY_GROUP_MULTIPLE = 16  # `weight_only_linear` takes groups of a multiple of this many columns
# `weight_only_linear` up to this many rows (it converts the codes again for each row): the default model's head in
# groups of 32 (49,152 x 576), one / two threads, against float32's F.linear: 8 rows 24.8 / 12.8 ms against 34.5 /
# 19.4, 16 rows 52.7 / 28.6 against 24.1 / 13.2 (`scripts/runtime_profile.py rows`); a batch of up to 8 prompts'
# last rows then needs no float copy of the weight
WEIGHT_ONLY_MAX_ROWS = 8


def weight_only_linear(kernel: ModuleType, rows: torch.Tensor, weight_codes: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None, group_size: int = 0) -> torch.Tensor:
    """y ``[n, out]`` = (x @ W_q^T) * s_w + b for float32 ``rows`` ``[n, in]`` and an int8 weight ``[out, in]`` with
    one scale per output (or one), or with ``group_size`` > 0 (a multiple of `WEIGHT_ONLY_GROUP_MULTIPLE` dividing
    ``in``) one per output and group (``[out, in / group_size]``): y = sum_g s_w,g (x_g @ W_q,g^T) + b. A weight-only
    int8 Linear (W8A16) read at 1 byte a weight, its sums in float32 (within float32 roundings of
    ``x @ dequantized(W_q)^T``, not its bits)."""
    return call_op(kernel, "weight_only_gemv", rows, weight_codes.contiguous(), weight_scale.reshape(-1), bias,
                   group_size)


def grouped_pack(weight_codes: torch.Tensor, weight_scale: torch.Tensor, group_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `grouped_gemm` reads of int8 ``weight_codes`` ``[out, in]`` quantized in groups of ``group_size`` columns
    with ``weight_scale`` ``[out, groups]``: the codes in VPDPBUSD's layout ``[ceil(out / 16), in / 4, 16, 4]`` (4
    codes of 16 outputs in 64 bytes; zero rows past ``out``), and ``[groups, ceil(out / 16) * 16]`` tables of 128
    times each group's code sums (int32) and of the scales (float32). A scale per channel ``[out, 1]`` (or one
    for the tensor) gives a ``[1, ceil(out / 16) * 16]`` table: a weight for inputs in groups (`grouped_gemm`'s
    ``input_groups``)."""
    out, inner = weight_codes.shape
    if weight_scale.numel() == 1:
        weight_scale = weight_scale.reshape(1, 1).expand(out, 1)
    pad = -out % 16
    padded = torch.nn.functional.pad(weight_codes, (0, 0, 0, pad))
    packed = padded.reshape(-1, 16, inner // 4, 4).permute(0, 2, 1, 3).contiguous()
    sums128 = torch.nn.functional.pad(weight_row_sums(weight_codes, group_size) * 128, (0, 0, 0, pad))
    scales = torch.nn.functional.pad(weight_scale.reshape(out, -1).float(), (0, 0, 0, pad))
    return packed, sums128.t().contiguous(), scales.t().contiguous()


GROUPED_GEMM_MULTIPLE = 4  # `grouped_gemm` takes groups (and inputs) of a multiple of this many columns


def grouped_gemm(kernel: ModuleType, x_codes: torch.Tensor, pack: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 scale: torch.Tensor, bias: torch.Tensor | None, outputs: int, group_size: int,
                 input_groups: bool = False) -> torch.Tensor:
    """y ``[n, out]`` = (sum over groups in order of float(x_q,g @ W_q,g^T) * s_w,g) * s_x + b for int8 ``x_codes``
    ``[n, in]`` (any number of rows) and a weight in groups of ``group_size`` columns packed by `grouped_pack`:
    `llmquant.nn.int8_linear.grouped_linear`'s values in one call (VPDPBUSD blocks of 6 rows by 32 outputs, each
    group's dots exact in int32), instead of one integer product and two float passes per group. ``input_groups``:
    the input quantized per token in groups of ``group_size`` columns (``scale`` ``[n, groups]``) and the weight
    packed with its scale per channel (or tensor) or in the same groups: `input_grouped_linear`'s values."""
    packed, sums128, scales = pack
    return call_op(kernel, "grouped_gemm", x_codes.contiguous(), packed, sums128, scales, scale, bias, outputs,
                   group_size, input_groups)


def weight_row_sums(weight_codes: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """sum_k W_q[j, k] per output j (``[out, 1]``), or over each group of ``group_size`` columns (``[out, groups]``),
    int32: the op's correction for making the input codes unsigned."""
    out, inner = weight_codes.shape
    return weight_codes.reshape(out, -1, group_size or inner).sum(-1, dtype=torch.int32)

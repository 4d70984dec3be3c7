"""Recipes: what to quantize and how, in code, JSON or YAML, validated field by field.

Example (YAML)::

    scheme: w_int8_per_channel_a_int8_per_tensor_static
    kv_cache: int8_per_tensor          # optional, replaces the scheme's KV cache
    ignore: [lm_head]                  # targets left float (the default, as in the seeds)
    moe_calibrate: all                 # every token through every expert while calibrating (or: routed)
    clip_search: {samples: 4}          # clip ratios of dynamic activations and KV cache, on held-out samples
    activation_clip: 0.9               # or fixed from the start, for every input and KV-cache range (QuaRot: 0.9, 0.95)
    # activation_clip_grid: [0.9, 0.85, 0.8, 0.75, 0.7]   # or chosen per token at run time (least squared error)
    kv_cache_clip: 0.95
    # kv_cache_clip_grid: [1.0, 0.95, 0.9, 0.85]           # the same for a dynamic KV cache (per token and head)
    # kv_cache_keep_first: 1           # the KV cache's first positions stay float (the attention sink)
    overrides:                         # later entries win; targets as in llmquant.model.targets
      - targets: ["re:.*down_proj"]
        scheme: w_int8_per_channel_a_int8_per_token_dynamic
        activation_clip: 0.7           # optional: these inputs' clip ratio
      - targets: [Linear]              # Neural Compressor's set_local("Linear", fp32): all float
        scheme: none
    calib: {dataset: pydoc, samples: 32, seqlen: 512, seed: 0}

The recipe is resolved once against a model into a `QuantPlan`: one typed record per Linear and per
attention, which can be printed and checked before any weight is touched.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from torch import nn

from llmquant.algorithms.awq import AWQStep
from llmquant.algorithms.block_training import BlockTrainingConfig
from llmquant.algorithms.gptq import GPTQOptions, GPTQStep
from llmquant.algorithms.learned_online import OnlineLearningConfig, OnlineLearningStep
from llmquant.algorithms.lifecycle import LayerStep
from llmquant.algorithms.quarot import ONLINE_BEFORE_LINEARS, ONLINE_ROTATIONS, QuaRotConfig
from llmquant.algorithms.scale_refit import refit_refusal
from llmquant.algorithms.scale_training import ScaleTrainingConfig
from llmquant.algorithms.smoothquant import SmoothingStep
from llmquant.algorithms.spinquant import SpinQuantConfig
from llmquant.errors import LlmquantError
from llmquant.model.model_map import ModelMap
from llmquant.model.targets import has_own_forward, matches_any
from llmquant.quant.scheme import KV_CACHE, Scheme, scheme_from_name, scheme_names
from llmquant.quant.spec import ObserverName, check_clip_grid

log = logging.getLogger(__name__)
DEFAULT_SAMPLES = 32  # calibration windows of a recipe that needs samples and does not say how many


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Calibration(_Strict):
    """The calibration samples, and ``propagate``: what the next decoder layer is calibrated on, the outputs of the
    quantized layer (each layer sees what it will see at run time) or of the float one (the float model's
    activations all the way; llm-compressor calibrates inside ``DisableQuantization``, which is that for round to
    nearest); not given: `Recipe.propagation`. ``dataset`` is a corpus of `llmquant.data`, or corpora joined by ``+``
    (``pydoc+stdlib``: as many windows from each, in turn). ``samples`` not given: `DEFAULT_SAMPLES` for a recipe
    that needs samples, none (no pass) for one that does not (`Recipe.calibration_samples`)."""

    dataset: str = "pydoc"
    samples: int | None = Field(None, ge=0)  # None: `Recipe.calibration_samples`; 0: no calibration pass
    seqlen: int = Field(512, ge=2)
    seed: int = 0
    propagate: Literal["quantized", "float"] | None = None  # None: `Recipe.propagation`


def _valid_group_size(value: int | None) -> int | None:
    if value is not None and value != -1 and value < 2:
        raise ValueError(f"group_size must be >= 2, or -1 for per channel; got {value}")
    return value


class Override(_Strict):
    """``scheme`` for the Linears ``targets`` names; ``group_size`` (-1: per channel) for a grouped weight-only
    scheme, default the recipe's; ``activation_clip`` the clip ratio of their inputs' ranges, default the recipe's
    (a wider input's absmax lies further out in its distribution: `best_w4a4kv4.yaml` clips down_proj's 1536-wide
    inputs at 0.7 and the others at 0.8, BENCHMARKS.md "down_proj's inputs clipped at 0.7")."""

    targets: list[str] = Field(min_length=1)
    scheme: str
    group_size: int | None = None
    activation_clip: float | None = Field(None, gt=0.0, le=1.0)

    _group = field_validator("group_size")(classmethod(lambda cls, value: _valid_group_size(value)))

    @model_serializer(mode="wrap")
    def _used_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Without ``group_size`` and ``activation_clip`` where not given (a recipe's fingerprint stays as it was)."""
        data = handler(self)
        for name in ("group_size", "activation_clip"):
            if getattr(self, name) is None:
                data.pop(name, None)
        return data

    @field_validator("scheme")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in scheme_names():
            raise ValueError(f"unknown scheme '{value}'; allowed: {', '.join(scheme_names())}")
        return value


class PreOpt(_Strict):
    """A smoothing pre-optimization: ``smoothquant`` smooths every group (norm -> linears and linear ->
    linear), ``smooth_fc_fc`` only the linear -> linear ones; ``alpha`` in [0, 1] or ``"auto"`` (searched)."""

    name: Literal["smoothquant", "smooth_fc_fc"]
    alpha: float | Literal["auto"] = 0.5

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: float | str) -> float | str:
        if value != "auto" and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or 'auto', got {value}")
        return value


class LearnRotations(_Strict):
    """SpinQuant's learned R1 and R2 (`llmquant.algorithms.spinquant`) on top of QuaRot's Hadamards: ``iterations``
    Cayley SGD steps of ``batch`` calibration samples, drawn in turn from the first ``samples`` (0: all); ``lr``
    the largest step (decayed linearly to 0), ``momentum``; ``r2: false`` learns R1 only; ``loss``: ``ce`` (the
    next-token cross-entropy, SpinQuant's) or ``kl`` (the KL divergence from the float model's next-token
    distribution). ``scheme`` is the scheme
    the loss quantizes with (default: the recipe's); ``weights`` whether the loss quantizes the weights (default:
    yes, unless the algorithm is GPTQ and the scheme quantizes activations or the KV cache, as SpinQuant does)."""

    iterations: int = Field(SpinQuantConfig.iterations, ge=1)
    samples: int = Field(SpinQuantConfig.samples, ge=0)
    batch: int = Field(SpinQuantConfig.batch, ge=1)
    lr: float = Field(SpinQuantConfig.lr, gt=0)
    momentum: float = Field(SpinQuantConfig.momentum, ge=0, lt=1)
    r2: bool = SpinQuantConfig.learn_r2
    loss: Literal["ce", "kl"] = SpinQuantConfig.loss
    scheme: str | None = None
    weights: bool | None = None

    @field_validator("scheme")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        return None if value is None else Override._known(value)

    def config(self) -> SpinQuantConfig:
        return SpinQuantConfig(iterations=self.iterations, samples=self.samples, batch=self.batch, lr=self.lr,
                               momentum=self.momentum, learn_r2=self.r2, loss=self.loss)


class LearnOnline(_Strict):
    """Each layer's online rotations before Linears (R4, R5, R6) learned on its output error
    (`llmquant.algorithms.learned_online`): ``iterations`` Adam steps a layer of ``lr`` (cosine-decayed) on ``batch``
    calibration samples each; ``weights``: the loss rounds the weights to nearest; ``max_size``: only rotations of
    at most this many channels (0: all); ``form``: one dense orthogonal U or the Kronecker product of two small ones;
    ``holdout``: calibration batches set aside to decide whether a layer keeps what it learned (0: all of them)."""

    iterations: int = Field(OnlineLearningConfig.iterations, ge=1)
    batch: int = Field(OnlineLearningConfig.batch, ge=1)
    lr: float = Field(OnlineLearningConfig.lr, gt=0)
    weights: bool = OnlineLearningConfig.weights
    max_size: int = Field(OnlineLearningConfig.max_size, ge=0)
    form: Literal["dense", "kronecker"] = OnlineLearningConfig.form
    holdout: int = Field(OnlineLearningConfig.holdout, ge=0)

    def config(self) -> OnlineLearningConfig:
        return OnlineLearningConfig(**self.model_dump())


class QuaRotPreOpt(_Strict):
    """QuaRot rotations (`llmquant.algorithms.quarot`): ``rotations`` among R1..R6 (default R1..R4);
    ``online_had: false`` (seed 003's ``"online-had"``) keeps only the offline R1 and R2. ``randomize``
    puts seeded random signs on the offline Hadamards; ``fallback`` is what a size without a Hadamard
    matrix gets (a seeded random orthogonal matrix, a block-diagonal Hadamard, or no rotation).

    Seed 003's layer-map keys are accepted as they are: ``backbone`` (checked), ``model_decoder_layers``
    and ``self_attn`` (they replace the found decoder layers and attention), ``v_proj`` and ``o_proj``
    (the value path R2 rotates, relative to a decoder layer). ``learn`` learns R1 and R2 on the calibration
    samples (SpinQuant) instead of keeping the Hadamards; ``learn_online`` learns each layer's online rotations
    before Linears (R4, R5, R6) on the layer's output error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    name: Literal["quarot"]
    rotations: list[Literal["R1", "R2", "R3", "R4", "R5", "R6"]] = Field(
        default_factory=lambda: ["R1", "R2", "R3", "R4"])
    online_had: bool = Field(True, alias="online-had")
    randomize: bool = True
    seed: int = 0
    fallback: Literal["random", "block_diagonal", "skip"] = "random"
    backbone: str | None = None
    model_decoder_layers: str | None = None
    self_attn: str | None = None
    v_proj: str | None = None
    o_proj: str | None = None
    learn: LearnRotations | None = None
    learn_online: LearnOnline | None = None

    def active_rotations(self) -> tuple[str, ...]:
        return tuple(r for r in self.rotations if self.online_had or r not in ONLINE_ROTATIONS)

    def config(self) -> QuaRotConfig:
        return QuaRotConfig(rotations=self.active_rotations(), randomize=self.randomize, seed=self.seed,
                            fallback=self.fallback, value_path=self.value_path())

    def value_path(self) -> tuple[str, str] | None:
        if (self.v_proj is None) != (self.o_proj is None):
            raise LlmquantError("the quarot layer map needs both v_proj and o_proj, or neither")
        return (self.v_proj, self.o_proj) if self.v_proj is not None and self.o_proj is not None else None


AnyPreOpt = Annotated[PreOpt | QuaRotPreOpt, Field(discriminator="name")]


class ClipSearch(_Strict):
    """Clip ratios of the dynamic activation and KV-cache quantizers searched after quantization
    (`llmquant.pipeline.clip_search`) on the last ``samples`` calibration samples, held out of the calibration;
    ``grid``: the ratios tried; ``by``: one ratio for every dynamic input (``model``), or then one per input name
    (``input``: q/k/v, o, gate/up, down... each the same in every layer)."""

    activations: bool = True
    kv_cache: bool = True
    samples: int = Field(4, ge=1)
    grid: list[float] = Field(default_factory=lambda: [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7], min_length=1)
    by: Literal["model", "input"] = "model"

    @field_validator("grid")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        bad = [r for r in value if not 0.0 < r <= 1.0]
        if bad:
            raise ValueError(f"clip ratios must be in (0, 1], got {bad}")
        return value


class ScaleTraining(_Strict):
    """The weights' scales trained end to end once every layer is quantized (`llmquant.algorithms.scale_training`,
    EfficientQAT's E2E-QP): ``epochs`` passes over the calibration samples but the last ``holdout`` (which decide
    whether the trained scales are kept; 0: kept unchecked), ``batch`` samples a step, Adam's step ``lr`` on the
    scales' logarithms, cosine-decayed; ``loss``: ``kl`` from the float model's next-token distribution (its
    ``top_k`` tokens a position, taken before quantization) or ``ce`` on the samples' own tokens; ``norms``: the
    norms' gains trained too; ``codes_lr`` above 0: the codes too, with that step (in steps of their grid).
    ``samples``: how many windows it trains on (None: the calibration samples): more than ``calib.samples`` takes the
    others (``extra_windows``) from the calibration text, drawn with the same seed after the calibration windows
    (``corpus``: the draw's first ``calib.samples`` windows are the calibration ones, `Recipe.drawn_samples`), or
    generated by the float model from random first tokens (``generated``: LLM-QAT's data-free windows,
    `llmquant.algorithms.generated_windows`); only this step sees them."""

    epochs: float = Field(ScaleTrainingConfig.epochs, gt=0)
    batch: int = Field(ScaleTrainingConfig.batch, ge=1)
    lr: float = Field(ScaleTrainingConfig.lr, gt=0)
    holdout: int = Field(ScaleTrainingConfig.holdout, ge=0)
    loss: Literal["kl", "ce"] = ScaleTrainingConfig.loss
    top_k: int = Field(ScaleTrainingConfig.top_k, ge=1)
    norms: bool = ScaleTrainingConfig.norms
    codes_lr: float = Field(ScaleTrainingConfig.codes_lr, ge=0)
    samples: int | None = Field(None, ge=1)
    extra_windows: Literal["corpus", "generated"] = "corpus"

    def config(self) -> ScaleTrainingConfig:
        return ScaleTrainingConfig(**self.model_dump(exclude={"samples", "extra_windows"}))


class BlockTraining(_Strict):
    """Each decoder layer's quantized weights trained against its float output once its Linears are quantized
    (`llmquant.algorithms.block_training`, EfficientQAT's Block-AP): ``epochs`` passes over the layer's calibration
    samples but the last ``holdout`` (which decide whether what was trained is kept; 0: kept unchecked), one sample a
    step; Adam's step ``lr`` on the scales' logarithms and ``codes_lr`` on the codes' offsets (in steps of their
    grid; 0: the codes stay), cosine-decayed; ``target``: the float model's own output of the layer (``model``, the
    default) or the float layer's output on the same inputs (``layer``)."""

    epochs: float = Field(BlockTrainingConfig.epochs, gt=0)
    lr: float = Field(BlockTrainingConfig.lr, gt=0)
    codes_lr: float = Field(BlockTrainingConfig.codes_lr, ge=0)
    holdout: int = Field(BlockTrainingConfig.holdout, ge=0)
    target: Literal["layer", "model"] = BlockTrainingConfig.target

    def config(self) -> BlockTrainingConfig:
        return BlockTrainingConfig(**self.model_dump())


class Recipe(_Strict):
    scheme: str = "w_int8_per_channel_a_int8_per_token_dynamic"
    algorithm: Literal["rtn", "awq", "gptq"] = "rtn"
    gptq: GPTQOptions = Field(default_factory=lambda: GPTQOptions())
    group_size: int | None = None
    kv_cache: str | None = None
    weight_observer: ObserverName | None = None
    activation_observer: ObserverName | None = None
    kv_cache_observer: ObserverName | None = None  # a static KV cache's range (default min-max)
    pre_opts: list[AnyPreOpt] = Field(default_factory=list)
    smooth_groups: list[dict[str, Any]] | None = None  # a hand-written map replacing the detected groups
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    overrides: list[Override] = Field(default_factory=list)
    calib: Calibration = Field(default_factory=Calibration)
    moe_calibrate: Literal["all", "routed"] = "all"
    clip_search: ClipSearch | None = None
    block_training: BlockTraining | None = None  # each layer's weights against its float output, once quantized
    scale_training: ScaleTraining | None = None  # after every layer (and the clip search): the scales, end to end
    # clip ratios of every input (kv_cache_clip: KV-cache) quantizer's range from the start, so that calibration,
    # static scales and GPTQ's quantized inputs see them (QuaRot's fixed 0.9 and 0.95); clip_search, after, replaces
    # those of the dynamic ones
    activation_clip: float | None = Field(None, gt=0.0, le=1.0)
    kv_cache_clip: float | None = Field(None, gt=0.0, le=1.0)
    # or each dynamic input's clip ratio chosen per token (per tensor) at run time from these, by the least squared
    # error of its quantized values (`QuantSpec.clip_grid`), the static ones left unclipped
    activation_clip_grid: tuple[float, ...] | None = None
    kv_cache_clip_grid: tuple[float, ...] | None = None  # the same for a dynamic integer KV cache
    # keys minus their calibrated mean before they are quantized (`llmquant.nn.kv_cache`, centred keys)
    kv_cache_center_keys: bool = False
    # the first N positions of every KV cache stay float (`llmquant.nn.kv_cache`, IntactKV's pivot tokens)
    kv_cache_keep_first: int = Field(0, ge=0)

    @model_serializer(mode="wrap")
    def _used_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A recipe writes only the options its algorithm uses: GPTQ's knobs go with ``algorithm: gptq``
        (so a recipe file, a manifest or a run's fingerprint does not change with an unused default)."""
        data = handler(self)
        if self.algorithm != "gptq":
            data.pop("gptq", None)
        if self.moe_calibrate == "all":  # (the default; a dense model has no expert to calibrate)
            data.pop("moe_calibrate", None)
        for name in ("clip_search", "block_training", "scale_training", "activation_clip", "kv_cache_clip",
                     "activation_clip_grid", "kv_cache_clip_grid"):
            if getattr(self, name) is None:
                data.pop(name, None)
        if not self.kv_cache_center_keys:
            data.pop("kv_cache_center_keys", None)
        if not self.kv_cache_keep_first:
            data.pop("kv_cache_keep_first", None)
        return data

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        return Override._known(value)

    @field_validator("kv_cache")
    @classmethod
    def _known_kv(cls, value: str | None) -> str | None:
        if value is not None and value not in KV_CACHE:
            raise ValueError(f"unknown kv cache '{value}'; allowed: {', '.join(KV_CACHE)}")
        return value

    _group = field_validator("group_size")(classmethod(lambda cls, value: _valid_group_size(value)))

    @model_validator(mode="after")
    def _one_activation_clip(self) -> Recipe:
        """``activation_clip_grid`` holds ratios in (0, 1] and takes the place of ``activation_clip`` and of
        ``clip_search``'s activation ratio (each would fix the ratio the grid chooses)."""
        grid = self.activation_clip_grid
        if grid is None:
            return self
        check_clip_grid("activation_clip_grid", grid)
        if self.activation_clip is not None:
            raise ValueError(f"give either activation_clip ({self.activation_clip:g}) or activation_clip_grid, not "
                             "both")
        if self.clip_search is not None and self.clip_search.activations:
            raise ValueError("clip_search would replace the clip grid of the activations by one ratio: set "
                             "clip_search.activations false, or leave activation_clip_grid out")
        names = [self.scheme, *(o.scheme for o in self.overrides if o.activation_clip is None)]
        for name in dict.fromkeys(names):
            spec = scheme_from_name(name, None, None).input_activations
            if spec is not None and spec.dynamic and spec.type != "int":
                raise ValueError(f"activation_clip_grid chooses integer ranges; {name} quantizes its inputs to "
                                 f"E4M3 floats; allowed: schemes with dynamic integer inputs")
        return self

    @model_validator(mode="after")
    def _one_kv_cache_clip(self) -> Recipe:
        """``kv_cache_clip_grid`` holds ratios in (0, 1], takes the place of ``kv_cache_clip`` and of ``clip_search``'s
        KV-cache ratio, and needs a dynamic integer KV cache (a static one's scales are calibrated)."""
        grid = self.kv_cache_clip_grid
        if grid is None:
            return self
        check_clip_grid("kv_cache_clip_grid", grid)
        if self.kv_cache_clip is not None:
            raise ValueError(f"give either kv_cache_clip ({self.kv_cache_clip:g}) or kv_cache_clip_grid, not both")
        if self.clip_search is not None and self.clip_search.kv_cache:
            raise ValueError("clip_search would replace the clip grid of the KV cache by one ratio: set "
                             "clip_search.kv_cache false, or leave kv_cache_clip_grid out")
        # the preset's KV spec, not `scheme_named`'s: that one applies the grid, which would fail in `QuantSpec`
        # with a message that does not name this recipe's fields
        kv = scheme_from_name(self.scheme, None, self.kv_cache).kv_cache
        if kv is None or not kv.dynamic or kv.type != "int":
            found = "no KV cache" if kv is None else f"a {'static' if not kv.dynamic else 'float'} KV cache"
            dynamic = [name for name, spec in KV_CACHE.items() if spec.dynamic and spec.type == "int"]
            raise ValueError(f"kv_cache_clip_grid chooses the ranges of a dynamic integer KV cache, but this recipe "
                             f"has {found}; allowed: kv_cache {', '.join(dynamic)}")
        return self

    @model_validator(mode="after")
    def _keys_to_center(self) -> Recipe:
        """``kv_cache_center_keys`` needs a KV cache with dynamic scales (a static scale would be calibrated before
        the keys' mean is known)."""
        if not self.kv_cache_center_keys:
            return self
        kv = self.scheme_named(self.scheme).kv_cache
        if kv is None or not kv.dynamic:
            found = "no KV cache" if kv is None else "a static KV cache"
            dynamic = [name for name, spec in KV_CACHE.items() if spec.dynamic]
            raise ValueError(f"kv_cache_center_keys centres the keys of a dynamic KV cache, but this recipe has "
                             f"{found}; allowed: kv_cache {', '.join(dynamic)}")
        return self

    @model_validator(mode="after")
    def _first_positions_to_keep(self) -> Recipe:
        """``kv_cache_keep_first`` keeps positions of a quantized KV cache float: the recipe needs one."""
        if self.kv_cache_keep_first and self.scheme_named(self.scheme).kv_cache is None:
            raise ValueError(f"kv_cache_keep_first {self.kv_cache_keep_first} keeps the first positions of a quantized "
                             f"KV cache float, but this recipe has no KV cache; allowed: kv_cache "
                             f"{', '.join(KV_CACHE)}, or kv_cache_keep_first 0")
        return self

    @model_validator(mode="after")
    def _samples_for_the_recipe(self) -> Recipe:
        """``calib.samples: 0`` (no calibration pass) takes only a recipe that needs no sample (`needs_samples_for`)."""
        if self.calib.samples == 0 and (needs := self.needs_samples_for()):
            raise ValueError(f"calib.samples 0 quantizes without calibration samples, but this recipe needs them "
                             f"for {', '.join(dict.fromkeys(needs))}; allowed with 0: round to nearest, dynamic "
                             f"activations and KV cache, no rotation; otherwise give 1 or more samples")
        return self

    @model_validator(mode="after")
    def _holdout_leaves_batches(self) -> Recipe:
        """``learn_online.holdout`` leaves at least one batch of the calibration samples to learn from (checked again
        per layer, where the samples of one rank of several are fewer)."""
        quarot = self.quarot()
        learn = quarot.learn_online if quarot is not None else None
        samples = self.calibration_samples() if learn is not None and learn.holdout else 0
        if samples:
            batches = -(-samples // learn.batch)
            if learn.holdout >= batches:
                raise ValueError(f"quarot.learn_online.holdout {learn.holdout} sets aside every one of the {batches} "
                                 f"batches of {learn.batch} that calib.samples {samples} makes; allowed: "
                                 f"0 to {batches - 1}, or more samples")
        return self

    @model_validator(mode="after")
    def _scales_to_train(self) -> Recipe:
        """``scale_training`` needs quantized weights (integer ones to train codes), and samples to train on besides
        those it holds out."""
        if self.scale_training is None:
            return self
        self._check_weights_to_train("scale_training")
        extra = self.scale_training.samples
        calibrating = self.calibration_samples()
        if extra is not None and extra < calibrating:
            raise ValueError(f"scale_training.samples {extra} is fewer than calib.samples {calibrating}, "
                             f"which it always trains on; allowed: {calibrating} or more, or none (the "
                             f"calibration samples)")
        if self.scale_training.extra_windows == "generated" and (extra or 0) <= calibrating:
            raise ValueError(f"scale_training.extra_windows 'generated' generates the windows beyond calib.samples "
                             f"{calibrating}, but scale_training.samples is {extra}; allowed: samples above "
                             f"{calibrating}, or extra_windows 'corpus'")
        holdout, samples = self.scale_training.holdout, self.training_samples()
        held = self.clip_search.samples if self.clip_search is not None else 0
        if samples and holdout >= samples - held:
            what, field = ("samples", "scale_training.samples") if extra is not None else ("calibration samples",
                                                                                           "calib.samples")
            left = f"{samples - held} {what}{' the clip search leaves' if held else ''}"
            raise ValueError(f"scale_training.holdout {holdout} leaves none of the {left} to train on; allowed: 0 to "
                             f"{samples - held - 1}, or more {field}")
        return self

    @model_validator(mode="after")
    def _blocks_to_train(self) -> Recipe:
        """``block_training`` needs quantized weights (integer ones to train codes), and calibration samples to train
        on besides those it holds out."""
        if self.block_training is None:
            return self
        self._check_weights_to_train("block_training")
        held = self.clip_search.samples if self.clip_search is not None else 0
        left = self.calibration_samples() - held
        if self.block_training.holdout >= left:
            where = " the clip search leaves" if held else ""
            raise ValueError(f"block_training.holdout {self.block_training.holdout} leaves none of the {left} "
                             f"calibration samples{where} to train on; allowed: 0 to {max(left - 1, 0)}, or more "
                             f"calib.samples")
        return self

    def _check_weights_to_train(self, step: str) -> None:
        """A training ``step`` needs quantized weights among the recipe's schemes."""
        names = self._scheme_names()
        if all(self.scheme_named(name).weights is None for name in names):
            raise ValueError(f"{step} trains the scales of quantized weights, but the recipe's schemes "
                             f"({', '.join(names)}) quantize no weight; allowed: a scheme with weights (w_...)")

    def training_samples(self) -> int:
        """How many windows scale training sees: ``scale_training.samples`` where that is more than ``calib.samples``
        (the calibration windows first, then the others), else ``calib.samples``."""
        extra = self.scale_training.samples if self.scale_training is not None else None
        return max(self.calibration_samples(), extra or 0)

    def generated_samples(self) -> int:
        """How many of `training_samples` the float model generates (``extra_windows: generated``), else 0."""
        generates = self.scale_training is not None and self.scale_training.extra_windows == "generated"
        return self.training_samples() - self.calibration_samples() if generates else 0

    def drawn_samples(self) -> int:
        """How many windows the run draws from the calibration text: the training windows but those generated. The
        seeded draw of n windows starts with the draw of fewer (`llmquant.data.calibration_samples`), so the
        calibration windows are the same either way; the rest only train the scales."""
        return self.training_samples() - self.generated_samples()

    def _scheme_names(self) -> list[str]:
        """The recipe's scheme and its overrides' schemes, each once, in order."""
        return list(dict.fromkeys([self.scheme, *(override.scheme for override in self.overrides)]))

    def needs_samples_for(self) -> list[str]:
        """What the recipe needs calibration samples for: what it learns from them (`learns_from_samples`), a
        rotation (its equivalence check runs one sample), a clip search. Empty: they would only measure the layers'
        output errors."""
        return self.learns_from_samples() + (["rotations"] if self.quarot() is not None else []) + (
            ["clip_search"] if self.clip_search is not None else [])

    def calibration_samples(self) -> int:
        """``calib.samples``, or where it is not given `DEFAULT_SAMPLES` for a recipe that needs samples and 0 (no
        calibration pass, as llm-compressor quantizes FP8_DYNAMIC) for one that does not (`needs_samples_for`):
        such a recipe's checkpoint does not depend on them, and one sample a process measuring each layer's output
        error cost 2.5x llm-compressor's whole FP8_DYNAMIC run (BENCHMARKS.md). Given token ids calibrate whatever
        their count (`llmquant.api.calibration_ids`)."""
        if self.calib.samples is not None:
            return self.calib.samples
        return DEFAULT_SAMPLES if self.needs_samples_for() else 0

    def propagation(self) -> Literal["quantized", "float"]:
        """``calib.propagate``, or where it is not given: ``quantized`` for a recipe that fits each layer to the
        inputs it will see at run time (GPTQ and GPTAQ's Hessians, AWQ's search, block training, learned online
        rotations), ``float`` for one that takes only statistics of the activations (static input and KV-cache
        scales, smoothing), as SmoothQuant and llm-compressor calibrate them. ``float`` needs one pass of the layer
        over every sample instead of two; on the default model it gave perplexities within the spread float rounding
        gives static scales (lower for 5 of 6 recipes within x1.05 of float; 1.4% lower and 1.5% higher for two
        recipes of int8 per-tensor weights, x1.1-x1.5; BENCHMARKS.md, "Calibrated on the float model's activations
        by default" and "FP8 weight codes in one pass; FP8 against llm-compressor over calibration draws");
        ``quantized`` helps GPTQ (the best int8 per-tensor static recipe, GPTAQ: 13.943 against 13.952)."""
        if self.calib.propagate is not None:
            return self.calib.propagate
        quarot = self.quarot()
        fits = (self.algorithm != "rtn" or self.block_training is not None
                or (quarot is not None and quarot.learn_online is not None))
        return "quantized" if fits else "float"

    def learns_from_samples(self) -> list[str]:
        """What the recipe learns from its calibration samples: learned rotations, a per-layer step (smoothing, AWQ,
        GPTQ), static input scales, a static KV-cache scale or the keys' mean. Nothing (empty) for round to nearest
        with dynamic activations and KV cache: QuaRot's Hadamard rotations are data-free too."""
        names = self._scheme_names()
        schemes = [self.scheme_named(name) for name in names]
        static_inputs = any(s.input_activations is not None and not s.input_activations.dynamic for s in schemes)
        kv_cache = schemes[0].kv_cache  # (the base scheme's, on every attention: `resolve`)
        quarot = self.quarot()
        return ((["learned rotations"] if quarot is not None and quarot.learn is not None else [])
                + [step.name for step in self.layer_steps()] + (["static input scales"] if static_inputs else [])
                + (["a static KV-cache scale"] if kv_cache is not None and not kv_cache.dynamic else [])
                + (["the keys' mean"] if self.kv_cache_center_keys else [])
                + (["block training"] if self.block_training is not None else [])
                + (["scale training"] if self.scale_training is not None else []))

    def quarot(self) -> QuaRotPreOpt | None:
        """The recipe's QuaRot pre-optimization, if any (at most one)."""
        found = [p for p in self.pre_opts if isinstance(p, QuaRotPreOpt)]
        if len(found) > 1:
            raise LlmquantError("a recipe takes at most one quarot pre-optimization")
        return found[0] if found else None

    def layer_steps(self) -> list[LayerStep]:
        """The per-layer steps the engine runs for this recipe, in order (`llmquant.algorithms.lifecycle`):
        smoothing (smoothquant / smooth_fc_fc pre-optimizations), then the rounding algorithm (round to nearest
        needs no step: it is how every QuantLinear starts)."""
        alphas = {p.name: p.alpha for p in self.pre_opts if isinstance(p, PreOpt)}
        steps: list[LayerStep] = []
        if alphas:
            if self.algorithm == "awq":
                raise LlmquantError("AWQ rescales the same groups as smoothquant/smooth_fc_fc: choose one of them")
            steps.append(SmoothingStep(alphas, self.smooth_groups))
        quarot = self.quarot()
        if quarot is not None and quarot.learn_online is not None:
            if not set(quarot.active_rotations()) & set(ONLINE_BEFORE_LINEARS):
                raise LlmquantError(f"quarot.learn_online learns online rotations before Linears (R4, R5, R6), but "
                                    f"the recipe's rotations are {', '.join(quarot.active_rotations()) or 'none'}: "
                                    "add one of them")
            steps.append(OnlineLearningStep(quarot.learn_online.config()))
        if self.algorithm == "awq":
            tiled = [name for name in self._scheme_names()
                     if (w := self.scheme_named(name).weights) is not None and w.granularity == "block"]
            if tiled:  # its clip search works per row and input group
                raise LlmquantError(f"AWQ searches clipping ranges per row and input group, not per tile: "
                                    f"{tiled[0]} takes rtn or gptq")
            steps.append(AWQStep(self.smooth_groups))
        elif self.algorithm == "gptq":
            if self.gptq.refit_scales:
                self._check_refit()
            steps.append(GPTQStep(self.gptq))
        return steps

    def _check_refit(self) -> None:
        """``gptq.refit_scales`` refits symmetric per-channel and per-group weight scales: refused for a recipe
        whose weight schemes have none of them (a scheme that has some keeps the others' scales)."""
        weights = [(name, self.scheme_named(name, group).weights) for name, group in
                   dict.fromkeys([(self.scheme, None), *((o.scheme, o.group_size) for o in self.overrides)])]
        refusals = [(name, refit_refusal(spec)) for name, spec in weights if spec is not None]
        if refusals and all(refusal is not None for _, refusal in refusals):
            name, refusal = refusals[0]
            raise LlmquantError(f"gptq.refit_scales refits symmetric per-channel or per-group weight scales; "
                                f"{name} has {refusal}")

    # --- construction that turns every validation problem into one line ----------------------
    @classmethod
    def build(cls, **fields: Any) -> Recipe:
        try:
            return cls(**fields)
        except ValidationError as err:
            raise LlmquantError(one_line(err)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        return cls.build(**read_mapping(Path(path), "recipe", "fields"))

    def to_file(self, path: str | Path) -> None:
        path = Path(path)
        data = self.model_dump(mode="json")
        text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        path.write_text(text)

    # --- resolution -----------------------------------------------------------------------------
    def scheme_named(self, name: str, group_size: int | None = None, activation_clip: float | None = None) -> Scheme:
        scheme = scheme_from_name(name, group_size or self.group_size, self.kv_cache)
        scheme = _with_observers(scheme, self.weight_observer, self.activation_observer, self.kv_cache_observer)
        scheme = _with_clip_ratios(scheme, activation_clip or self.activation_clip, self.kv_cache_clip)
        scheme = _with_clip_grid(scheme, "kv_cache", self.kv_cache_clip_grid)
        return scheme if activation_clip is not None else _with_clip_grid(scheme, "input_activations",
                                                                          self.activation_clip_grid)

    def resolve(self, model: nn.Module, model_map: ModelMap) -> QuantPlan:
        """One record per Linear (and per attention for the KV cache), with its scheme. The gates of MoE blocks
        (a router that is a Linear, a shared expert's gate) stay float unless an override names them."""
        base = self.scheme_named(self.scheme)
        linears: dict[str, Scheme] = {}
        fallbacks: dict[tuple[int, int, int], list[str]] = {}
        layers = model_map.layers(model)
        gates = {f"{model_map.layer_name(i)}.{gate}" for i, layer in enumerate(layers)
                 for block in model_map.moe_blocks(layer) for gate in block.gates}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or has_own_forward(module):  # (the latter: `not_quantizable`)
                continue
            scheme = Scheme() if name in gates else base
            for override in self.overrides:
                if matches_any(name, module, override.targets):
                    scheme = self.scheme_named(override.scheme, override.group_size, override.activation_clip)
            if matches_any(name, module, self.ignore):
                scheme = Scheme()
            linears[name] = _fitting_groups(scheme.linear_part(), name, module.in_features, fallbacks)
        attention = {f"{model_map.layer_name(i)}.{model_map.attention}": base.kv_cache for i, layer in enumerate(layers)
                     if model_map.attention_of(layer) is not None}  # (a hybrid model's other layers keep no cache)
        for (requested, chosen, in_features), names in fallbacks.items():
            log.warning("group size %d does not divide the %d inputs of %d Linears (%s, ...): they use group size "
                        "%d instead", requested, in_features, len(names), names[0], chosen)
        return QuantPlan(linears=linears, kv_cache=attention,
                         group_fallbacks={n: c for (_, c, _), names in fallbacks.items() for n in names},
                         calibrate_all_experts=self.moe_calibrate == "all",
                         propagate_float=self.propagation() == "float", center_keys=self.kv_cache_center_keys,
                         kv_keep_first=self.kv_cache_keep_first,
                         block_training=self.block_training.config() if self.block_training is not None else None)


def fitting_group_size(in_features: int, group_size: int) -> int:
    """The group size a Linear of ``in_features`` inputs uses when ``group_size`` does not divide them:
    the largest power of two at least half of it that does (what serving kernels take: 32, 64, ...), else
    the largest divisor below it (1: per channel). 576 inputs with groups of 128 -> 64; 100 with 64 -> 50."""
    powers = [2**k for k in range(1, group_size.bit_length()) if group_size // 2 <= 2**k < group_size]
    fitting = [g for g in powers if in_features % g == 0]
    if fitting:
        return max(fitting)
    return max(d for d in range(1, group_size) if in_features % d == 0)


def _fitting_groups(scheme: Scheme, name: str, in_features: int,
                    fallbacks: dict[tuple[int, int, int], list[str]]) -> Scheme:
    """``scheme`` with the group size of its weight and of its input (FP8 block schemes quantize inputs per token
    in groups) replaced by `fitting_group_size` where it does not divide the Linear's inputs (recorded in
    ``fallbacks``). A group of 1 becomes per channel for a weight, per token for an input."""
    update = {}
    for part, whole in (("weights", "channel"), ("input_activations", "token")):
        spec = getattr(scheme, part)
        if spec is None or spec.granularity != "group" or in_features % spec.group_size == 0:
            continue
        chosen = fitting_group_size(in_features, spec.group_size)
        names = fallbacks.setdefault((spec.group_size, chosen, in_features), [])
        if name not in names:
            names.append(name)
        grain = {"granularity": whole, "group_size": None} if chosen == 1 else {"group_size": chosen}
        update[part] = spec.model_copy(update=grain)
    return scheme.model_copy(update=update) if update else scheme


def _with_observers(scheme: Scheme, weight: str | None, activation: str | None, kv_cache: str | None) -> Scheme:
    w, a, kv = scheme.weights, scheme.input_activations, scheme.kv_cache
    if weight and w is not None:
        w = w.model_copy(update={"observer": weight})
    if activation and a is not None and not a.dynamic:
        a = a.model_copy(update={"observer": activation})
    if kv_cache and kv is not None and not kv.dynamic:
        kv = kv.model_copy(update={"observer": kv_cache})
    return Scheme(weights=w, input_activations=a, kv_cache=kv)


def _with_clip_ratios(scheme: Scheme, activation: float | None, kv_cache: float | None) -> Scheme:
    """``scheme`` with the clip ratio ``activation`` on its input spec and ``kv_cache`` on its KV-cache spec
    (`QuantSpec.clip_ratio`: every range shrunk by it, dynamic or calibrated), where given."""
    update = {part: spec.model_copy(update={"clip_ratio": ratio})
              for part, spec, ratio in (("input_activations", scheme.input_activations, activation),
                                        ("kv_cache", scheme.kv_cache, kv_cache))
              if spec is not None and ratio is not None}
    return scheme.model_copy(update=update) if update else scheme


def _with_clip_grid(scheme: Scheme, part: Literal["input_activations", "kv_cache"],
                    grid: tuple[float, ...] | None) -> Scheme:
    """``scheme`` with ``grid`` as the `QuantSpec.clip_grid` of its dynamic spec ``part``, where both are."""
    spec = getattr(scheme, part)
    if grid is None or spec is None or not spec.dynamic:
        return scheme
    return scheme.model_copy(update={part: spec.model_copy(update={"clip_grid": tuple(grid)})})


@dataclass(frozen=True)
class QuantPlan:
    """The recipe resolved against one model: a scheme per Linear name, a KV spec per attention."""

    linears: dict[str, Scheme]
    kv_cache: dict[str, Any]
    group_fallbacks: dict[str, int] = field(default_factory=dict)  # Linear -> the group size it got instead
    calibrate_all_experts: bool = True  # `llmquant.nn.experts.all_experts` during the calibration passes
    propagate_float: bool = False  # the next layer is calibrated on this layer's float outputs (`Calibration`)
    center_keys: bool = False  # every KV-cache quantizer centres its keys (`Recipe.kv_cache_center_keys`)
    kv_keep_first: int = 0  # every KV-cache quantizer keeps this many first positions float
    block_training: BlockTrainingConfig | None = None  # each layer's weights trained once quantized (`BlockTraining`)

    def left_float(self, decoder_layers: str) -> list[str]:
        """The Linears the plan leaves float, those of the decoder layers once for all (``layers.*.mlp.gate``)."""
        names = [_any_layer(n, decoder_layers) for n, s in self.linears.items() if s.weights is None]
        return list(dict.fromkeys(names))

    def summary(self, decoder_layers: str) -> list[dict[str, Any]]:
        """`describe`'s rows, then the quantized KV caches, with the decoder layers' index as ``*``: one row a module
        and setting, with how many modules it stands for (``layers.*.mlp.down_proj``, 30), in the plan's order."""
        caches = [{"module": name, "kv_cache": spec.describe(), **({"center_keys": True} if self.center_keys else {}),
                   **({"keep_first": self.kv_keep_first} if self.kv_keep_first else {})}
                  for name, spec in self.kv_cache.items() if spec is not None]
        rows: dict[str, dict[str, Any]] = {}
        for row in [*self.describe(), *caches]:
            row = {**row, "module": _any_layer(row["module"], decoder_layers)}
            rows.setdefault(json.dumps(row, sort_keys=True), {**row, "count": 0})["count"] += 1
        return list(rows.values())

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for name, scheme in self.linears.items():
            w = scheme.weights.describe() if scheme.weights else "float"
            a = scheme.input_activations.describe() if scheme.input_activations else "float"
            row: dict[str, Any] = {"module": name, "weights": w, "input": a}
            if name in self.group_fallbacks:
                row["group_size_fallback"] = self.group_fallbacks[name]
            rows.append(row)
        return rows


def _any_layer(name: str, decoder_layers: str) -> str:
    """``name`` with its decoder layer's index as ``*`` (``model.layers.3.mlp.up`` -> ``model.layers.*.mlp.up``)."""
    return re.sub(rf"^{re.escape(decoder_layers)}\.\d+\.", f"{decoder_layers}.*.", name)


def read_mapping(path: Path, what: str, of: str) -> dict[str, Any]:
    """A non-empty mapping from a .json file (or YAML otherwise); every problem is one line naming ``what``."""
    try:
        text = path.read_text()
    except OSError as err:
        raise LlmquantError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise LlmquantError(f"{what} {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from None
    if not isinstance(data, dict) or not data:
        raise LlmquantError(f"{what} {path} must hold a mapping of {of}, got {type(data).__name__}")
    return data


def set_fields(fields: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    """``fields`` (a recipe's ``model_dump()``) with each ``PATH=VALUE`` of ``settings`` applied in order: PATH is
    dotted (``gptq.asymmetric``, ``scale_training.samples``), a ``pre_opts`` entry named by its ``name``
    (``pre_opts.smoothquant.alpha``); VALUE is read as YAML (``0.35``, ``true``, ``[R2, R4]``, ``{epochs: 1}``). A
    missing or empty mapping on the way is made; the recipe validates the result."""
    fields = copy.deepcopy(fields)
    for setting in settings:
        path, equals, text = setting.partition("=")
        keys = path.strip().split(".")
        if not equals or not all(keys):
            raise LlmquantError(f"--set takes FIELD=VALUE (a dotted field, e.g. gptq.asymmetric=0.35), got '{setting}'")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            reason = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise LlmquantError(f"--set {path}: '{text}' is not a YAML value ({reason})") from None
        place = fields
        for depth, key in enumerate(keys[:-1]):
            place = _field_step(place, key, ".".join(keys[:depth + 1]))
        if not isinstance(place, dict):
            what = "a list; name one of its entries" if isinstance(place, list) else f"{place!r}, not a mapping"
            raise LlmquantError(f"--set {path}: {'.'.join(keys[:-1])} is {what}")
        place[keys[-1]] = value
    return fields


def _field_step(place: Any, key: str, path: str) -> Any:
    """The mapping at ``key`` below ``place`` (made where missing or null), or a list's entry named ``key``."""
    if isinstance(place, list):
        named = [entry for entry in place if isinstance(entry, dict) and entry.get("name") == key]
        if not named:
            names = ", ".join(str(entry.get("name")) for entry in place if isinstance(entry, dict)) or "none"
            parent = path.rpartition(".")[0]
            raise LlmquantError(f"--set {path}: {parent} has no entry named '{key}'; it has: {names}")
        return named[0]
    if not isinstance(place, dict):
        raise LlmquantError(f"--set {path}: the field above it is {place!r}, not a mapping")
    if place.get(key) is None:
        place[key] = {}
    return place[key]


def one_line(err: ValidationError) -> str:
    """A pydantic error as one line: field, value, what is allowed."""
    parts = []
    for e in err.errors():
        message = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # the whole recipe's check (a model validator): its message names the fields
            parts.append(f"recipe: {message}")
            continue
        field = ".".join(str(p) for p in e["loc"])
        parts.append(f"recipe field '{field}' = {e.get('input')!r}: {message}")
    return "; ".join(parts)

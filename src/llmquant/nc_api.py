"""The Neural Compressor style SmoothQuant API, as a thin front of the recipe path.

    quant_config = SmoothQuantConfig(alpha=0.5)
    quant_config.set_local("Linear", SmoothQuantConfig(w_dtype="fp32", act_dtype="fp32"))  # keep Linears float
    prepared = prepare(model, quant_config=quant_config, example_inputs=example_inputs)
    run_fn(prepared)            # the user's own calibration: any forwards of token ids
    q_model = convert(prepared)

`prepare` records the token ids of every forward until `convert`, which runs `llmquant.quantize` with
the equivalent `Recipe` on them: the same model as the recipe path, by construction. Folding is always
on (the scales go into the preceding norm or Linear); ``folding=False`` is refused rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from llmquant.api import quantize
from llmquant.errors import LlmquantError
from llmquant.recipe import Recipe

DType = Literal["int8", "fp32"]


@dataclass
class SmoothQuantConfig:
    alpha: float | str = 0.5
    folding: bool = True
    w_dtype: DType = "int8"
    act_dtype: DType = "int8"
    scheme: str = "w_int8_per_channel_a_int8_per_tensor_static"
    local: dict[str, SmoothQuantConfig] = field(default_factory=dict)

    def set_local(self, target: str, config: SmoothQuantConfig) -> SmoothQuantConfig:
        """Another config for modules of this type ("Linear") or name ("lm_head", "re:.*down_proj")."""
        self.local[target] = config
        return self

    def to_recipe(self) -> Recipe:
        if not self.folding:
            raise LlmquantError("folding=False is not supported: llmquant always folds the smoothing scales")
        overrides = []
        for target, local in self.local.items():
            keeps_float = local.w_dtype == "fp32" and local.act_dtype == "fp32"
            if local.w_dtype != local.act_dtype:
                raise LlmquantError(
                    f"set_local('{target}'): w_dtype and act_dtype must both be int8 or both fp32"
                )
            overrides.append({"targets": [target], "scheme": "none" if keeps_float else local.scheme})
        return Recipe.build(
            scheme=self.scheme,
            pre_opts=[{"name": "smoothquant", "alpha": self.alpha}],
            overrides=overrides,
        )


def prepare(model: nn.Module, quant_config: SmoothQuantConfig, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """Start recording the token ids the model sees; ``example_inputs`` are recorded first."""
    recorded: list[torch.Tensor] = []

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            raise LlmquantError("calibration forwards must pass token ids (input_ids)")
        recorded.extend(row.detach().clone() for row in ids.reshape(-1, ids.shape[-1]))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    model._llmquant_prepared = (quant_config, recorded, handle)  # type: ignore[attr-defined]
    if example_inputs is not None:
        with torch.no_grad():
            model(example_inputs)
    return model


def convert(model: nn.Module, tokenizer: object = None) -> nn.Module:
    """Quantize a prepared model on what it recorded, with the recipe equivalent to its config."""
    prepared = getattr(model, "_llmquant_prepared", None)
    if prepared is None:
        raise LlmquantError("convert() needs a model returned by prepare()")
    config, recorded, handle = prepared
    handle.remove()
    del model._llmquant_prepared
    if not recorded:
        raise LlmquantError("the calibration set is empty: run the prepared model on some inputs before convert()")
    lengths = {row.numel() for row in recorded}
    if len(lengths) > 1:
        raise LlmquantError(f"calibration inputs must share one length, got lengths {sorted(lengths)}")
    return quantize(model, config.to_recipe(), tokenizer, calib=torch.stack(recorded), progress=False)

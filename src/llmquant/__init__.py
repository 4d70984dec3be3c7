"""llmquant: post-training quantization of large language models (PyTorch + transformers)."""

__version__ = "0.1.0"

from llmquant.api import load, quantize, save, train_checkpoint_scales
from llmquant.errors import LlmquantError
from llmquant.nc_api import SmoothQuantConfig, convert, prepare
from llmquant.quant.scheme import W8A8_SCHEMES, WEIGHT_ONLY_SCHEMES, Scheme, scheme_from_name
from llmquant.quant.spec import QuantSpec
from llmquant.recipe import Override, PreOpt, Recipe

__all__ = [
    "W8A8_SCHEMES",
    "WEIGHT_ONLY_SCHEMES",
    "LlmquantError",
    "Override",
    "PreOpt",
    "QuantSpec",
    "Recipe",
    "Scheme",
    "SmoothQuantConfig",
    "convert",
    "load",
    "prepare",
    "quantize",
    "save",
    "scheme_from_name",
    "train_checkpoint_scales",
]

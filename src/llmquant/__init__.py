"""llmquant: post-training quantization of large language models (PyTorch + transformers)."""

__version__ = "0.1.0"

from llmquant.api import load, quantize, save
from llmquant.errors import LlmquantError
from llmquant.quant.scheme import W8A8_SCHEMES, WEIGHT_ONLY_SCHEMES, Scheme, scheme_from_name
from llmquant.quant.spec import QuantSpec
from llmquant.recipe import Override, Recipe

__all__ = [
    "W8A8_SCHEMES",
    "WEIGHT_ONLY_SCHEMES",
    "LlmquantError",
    "Override",
    "QuantSpec",
    "Recipe",
    "Scheme",
    "load",
    "quantize",
    "save",
    "scheme_from_name",
]

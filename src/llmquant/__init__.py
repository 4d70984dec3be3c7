"""llmquant: post-training quantization of large language models (PyTorch + transformers)."""

__version__ = "0.1.0"

from llmquant.api import load, quantize, save  # noqa: E402
from llmquant.errors import LlmquantError  # noqa: E402
from llmquant.quant.scheme import W8A8_SCHEMES, WEIGHT_ONLY_SCHEMES, Scheme, scheme_from_name  # noqa: E402
from llmquant.quant.spec import QuantSpec  # noqa: E402
from llmquant.recipe import Override, Recipe  # noqa: E402

__all__ = [
    "LlmquantError",
    "Override",
    "QuantSpec",
    "Recipe",
    "Scheme",
    "W8A8_SCHEMES",
    "WEIGHT_ONLY_SCHEMES",
    "load",
    "quantize",
    "save",
    "scheme_from_name",
]

"""Layer 1, numerics: quantization specs, pure quantize/dequantize functions and observers."""

from llmquant.quant.observers import Observer, observe_once
from llmquant.quant.primitives import dequantize, fake_quantize, qparams_for, qparams_from_min_max, quantize
from llmquant.quant.spec import QuantSpec

__all__ = [
    "Observer",
    "QuantSpec",
    "dequantize",
    "fake_quantize",
    "observe_once",
    "qparams_for",
    "qparams_from_min_max",
    "quantize",
]

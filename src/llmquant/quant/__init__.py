"""Layer 1, numerics: quantization specs, pure quantize/dequantize functions, observers, int32 packing."""

from llmquant.quant.observers import Observer, observe_once
from llmquant.quant.packing import pack_int32, packed_length, unpack_int32
from llmquant.quant.primitives import (
    dequantize,
    fake_quantize,
    qparams_for,
    qparams_from_min_max,
    quantize,
    straight_through,
)
from llmquant.quant.spec import QuantSpec

__all__ = [
    "Observer",
    "QuantSpec",
    "dequantize",
    "fake_quantize",
    "observe_once",
    "pack_int32",
    "packed_length",
    "qparams_for",
    "qparams_from_min_max",
    "quantize",
    "straight_through",
    "unpack_int32",
]

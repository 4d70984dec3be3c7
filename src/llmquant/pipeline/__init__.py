"""Layer 5, the engine: run a recipe on a model (`quantize`), decoder layer by decoder layer."""

from llmquant.pipeline.engine import (
    Manifest,
    calibration_part,
    find_smooth_groups,
    quantize,
    scale_training_entry,
    scale_training_inputs,
)
from llmquant.pipeline.layer_io import LayerInputs, capture_layer_inputs, run_layer

__all__ = ["LayerInputs", "Manifest", "calibration_part", "capture_layer_inputs", "find_smooth_groups", "quantize",
           "run_layer", "scale_training_entry", "scale_training_inputs"]

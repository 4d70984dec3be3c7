"""Where the decoder layers of a model being quantized live between their turns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmquant.model.lazy import LazyLayers
from llmquant.model.model_map import ModelMap
from llmquant.model.offloaded import load_offloaded


@dataclass
class LayerSource:
    """Where decoder layers live: in memory (the default; a layer accelerate keeps offloaded is loaded when
    its turn comes, `llmquant.model.offloaded`), or on disk (`LazyLayers`, read one at a time and released
    to ``meta`` once their result is in the run directory; the embeddings and head are released too while
    the layers run, when nothing changes them)."""

    lazy: LazyLayers | None = None

    @property
    def streams(self) -> bool:
        return self.lazy is not None

    def materialize(self, model: nn.Module, model_map: ModelMap, index: int) -> nn.Module:
        if self.lazy is not None:
            return self.lazy.materialize(index)
        layer = model_map.layers(model)[index]
        load_offloaded(layer)
        return layer

    def release(self, index: int) -> None:
        if self.lazy is not None:
            self.lazy.release(index)

    def release_outside(self) -> None:
        if self.lazy is not None:
            self.lazy.release_outside()

    def materialize_outside(self) -> None:
        if self.lazy is not None:
            self.lazy.materialize_outside()


__all__ = ["LayerSource"]

"""TEAL-style input masks: the identity basis with input `i` of a token kept when `|x_i|` passes a threshold.

The same layer and plan entry as the neuron adapter (`importance: "magnitude"`); only the score differs. Measured
better than the locally optimal weighted score on the real models (docs/benchmarks.md); the default method, `teal`.
"""

from __future__ import annotations

import torch

from .neuron import MAGNITUDE, NeuronKind


class MagnitudeKind(NeuronKind):
    name = "magnitude"
    importance = MAGNITUDE

    def score(self, sample: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        return sample.abs()


KIND = MagnitudeKind()

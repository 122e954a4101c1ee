"""What every RaNA layer shares: the PEFT layer base, the keep masks and the FLOP counters.

The layers themselves live with their adapter kind in `rana_hf.adapters` (`RaNALinear` in `adapters.rank`,
`RaNANeuronLinear` in `adapters.neuron`, `RaNAGatedLinear` in `adapters.cats`); each computes its reference forward in
plain torch here on the CPU or GPU, and counts the work its masks kept while a `FlopCounter` is active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


@dataclass
class _ModuleCount:
    tokens: int = 0
    dense_macs: int = 0
    actual_macs: int = 0


@dataclass
class FlopCounter:
    """Collects measured MACs from RaNA layers while active (see `counting`).

    Attributes:
        token_mask: optional [batch, seq] bool mask of the tokens to count (padding excluded).
        modules: per-module counts, keyed by module name.
    """

    token_mask: torch.Tensor | None = None
    modules: dict[str, _ModuleCount] = field(default_factory=dict)

    def add(self, name: str, tokens: int, dense_macs: int, actual_macs: int) -> None:
        count = self.modules.setdefault(name, _ModuleCount())
        count.tokens += tokens
        count.dense_macs += dense_macs
        count.actual_macs += actual_macs


_ACTIVE_COUNTER: FlopCounter | None = None


def active_counter() -> FlopCounter | None:
    return _ACTIVE_COUNTER


@contextlib.contextmanager
def counting(counter: FlopCounter | None) -> Iterator[FlopCounter | None]:
    """Make RaNA layers add their measured cost to `counter` for the duration of the block (None pauses counting)."""
    global _ACTIVE_COUNTER
    previous, _ACTIVE_COUNTER = _ACTIVE_COUNTER, counter
    try:
        yield counter
    finally:
        _ACTIVE_COUNTER = previous


def tally(counter: FlopCounter, keep: torch.Tensor) -> tuple[int, int]:
    """(tokens, kept components summed over tokens) of a [..., r] keep mask, padding excluded when the counter has a
    token mask of the same leading shape."""
    kept = keep.reshape(-1, keep.shape[-1]).sum(-1, dtype=torch.float32)  # [tokens]
    mask = counter.token_mask
    if mask is not None and mask.numel() == kept.numel():
        weights = mask.reshape(-1).to(device=kept.device, dtype=torch.float32)
        return int(weights.sum()), int((kept * weights).sum())
    return kept.numel(), int(kept.sum())


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask [..., r] keeping the `k` largest scores of every token (the `budget_mode="topk"` mask)."""
    k = max(0, min(int(k), score.shape[-1]))
    keep = torch.zeros_like(score, dtype=torch.bool)
    if k:
        keep.scatter_(-1, score.topk(k, dim=-1).indices, True)
    return keep


def keep_mask(score: torch.Tensor, threshold: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Which components/neurons to keep: `score >= threshold`, or (with `top_k`) each token's `top_k` largest
    `score / threshold` (a positive threshold, scalar or per neuron, orders them as the importance does)."""
    # a half-precision score meets a float32 threshold of at least one dimension: type promotion compares in float32
    # without copying the score (a 0-dim float32 tensor would not promote it, hence atleast_1d)
    threshold = torch.atleast_1d(threshold.float())
    return top_k_mask(score / threshold, top_k) if top_k is not None else score >= threshold


class RaNALayer(BaseTunerLayer):
    """State shared by the RaNA tuner layers (PEFT's per-adapter containers)."""

    adapter_layer_names = ("rana_hf_A", "rana_hf_B")
    other_param_names = ()
    # The layer computes without its base layer's dense weight (a rank adapter: `A` and `B` replace it), so inference
    # does not need that weight (`api.parameter_counts`, standalone checkpoints, decode mode).
    replaces_weight = False

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.rana_hf_A = nn.ParameterDict()
        self.rana_hf_B = nn.ParameterDict()
        self.rana_hf_threshold = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        self.module_name = ""
        self.top_k: int | None = None  # budget_mode="topk": components (or neurons) kept per token, exactly
        self._decode = None  # `inference.DecodeState` once `prepare_for_decode` re-laid this layer
        self._dense_freed = False
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"RaNA adapts torch.nn.Linear modules, got {type(base_layer).__name__}")
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def _active(self) -> str | None:
        if self.disable_adapters:
            return None
        for name in self.active_adapters:
            if name in self.rana_hf_A or name in self.rana_hf_threshold:
                return name
        return None

    def dense_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The original linear (adapters off); refused once `prepare_for_decode` freed its weight."""
        if self._dense_freed:
            raise RuntimeError(
                f"{self.module_name!r}: the dense weight was freed by prepare_for_decode; the adapter cannot be "
                "switched off. Load the model again to compare with dense."
            )
        return self.base_layer(x, *args, **kwargs)

    def check_filled(self, adapter_name: str) -> None:
        """Refuse to run with tensors (thresholds, A, B) that calibration or loading never filled: they start as NaN
        (once per layer; syncs once)."""
        if getattr(self, "_filled", False):
            return
        containers = {"threshold": self.rana_hf_threshold, "A": self.rana_hf_A, "B": self.rana_hf_B}
        tensors = {kind: c[adapter_name] if adapter_name in c else None for kind, c in containers.items()}
        for kind, tensor in tensors.items():
            if tensor is None or tensor.device.type == "meta" or not tensor.numel():
                continue
            if bool(torch.isnan(tensor).any()):
                what = "no calibrated threshold" if kind == "threshold" else f"no {kind} (NaN: never filled)"
                raise RuntimeError(
                    f"RaNA layer {self.module_name!r} has {what}: its tensors were never filled. Build the model "
                    "with `rana_hf.compress` or load a complete RaNA checkpoint (this one may be truncated)."
                )
        self._filled = True

    @property
    def fits_threshold(self) -> bool:
        """Whether this layer holds a threshold of its own (a member of a shared router reads its owner's)."""
        return True

    def refit_threshold(self, sample: torch.Tensor, entry: dict, adapter_name: str) -> float:
        """Set the threshold so that the layer keeps its planned share (`entry`) on `sample`, a [S, in_features]
        sample of its actual inputs. Returns the new scalar threshold (per-neuron thresholds: their `tau`)."""
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "RaNA adapters cannot be merged into dense weights: the mask depends on each input. "
            "Use `model.unload()` to get the original model back."
        )

    def unmerge(self) -> None:
        pass

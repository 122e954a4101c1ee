"""RaNA layers: the reference forward in plain torch and the FLOP counters.

`RaNALinear` is the rank adapter `y = A (mask * B x) + bias` with `mask_i = |(B x)_i| >= threshold`. Linears that read
the same input (q, k and v) can share one router: the *owner* holds `B` and the threshold and computes the masked
codes once; *members* hold only their rows of `A` and reuse the owner's codes for the same input tensor.
`RaNANeuronLinear` is the neuron adapter of an MLP down projection: input neuron `j` is kept when
`|h_j| * ||W[:, j]|| >= tau`, i.e. `|h_j| >= tau / ||W[:, j]||`, a per-neuron threshold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from .calibration import execution_device, module_weight

# Roles of a rank adapter.
OWN = "own"  # computes its own codes from its own B
OWNER = "owner"  # computes the codes of a shared router and caches them for its members
MEMBER = "member"  # reuses the owner's codes


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


def _tally(counter: FlopCounter, keep: torch.Tensor) -> tuple[int, int]:
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

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "RaNA adapters cannot be merged into dense weights: the mask depends on each input. "
            "Use `model.unload()` to get the original model back."
        )

    def unmerge(self) -> None:
        pass


class RaNALinear(nn.Module, RaNALayer):
    """Rank adapter `y = A[:, :r] (mask * B[:r] x) + bias`, optionally sharing its router with sibling linears."""

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str,
        rank: int,
        role: str = OWN,
    ) -> None:
        super().__init__()
        RaNALayer.__init__(self, base_layer)
        if role not in (OWN, OWNER, MEMBER):
            raise ValueError(f"role must be one of {(OWN, OWNER, MEMBER)}, got {role!r}")
        self.role = role
        self._owner: list[RaNALinear] = []  # plain list: the owner must not be registered twice in the state dict
        self.num_members = 0  # owner only: members that will read each cached code tensor
        self._cache: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._cache_reads_left = 0
        weight = base_layer.weight
        device = execution_device(base_layer)  # not meta when accelerate offloaded the base layer
        factory = {"device": device, "dtype": weight.dtype}
        # NaN until calibration or loading fills them: a checkpoint missing a tensor fails at the first forward
        # (check_filled) instead of computing with zeros
        self.rana_hf_A[adapter_name] = nn.Parameter(torch.full((self.out_features, rank), float("nan"), **factory))
        if role != MEMBER:
            self.rana_hf_B[adapter_name] = nn.Parameter(torch.full((rank, self.in_features), float("nan"), **factory))
            self.rana_hf_threshold[adapter_name] = torch.full((), float("nan"), device=device)
        self.set_adapter(adapter_name)

    @property
    def rank(self) -> int:
        return next(iter(self.rana_hf_A.values())).shape[1]

    def attach_owner(self, owner: RaNALinear) -> None:
        if self.role != MEMBER or owner.role != OWNER:
            raise ValueError("only a member can be attached, and only to an owner")
        self._owner[:] = [owner]
        owner.num_members += 1

    def _router(self) -> RaNALinear:
        if self.role != MEMBER:
            return self
        if not self._owner:
            raise RuntimeError(f"RaNA member {self.module_name!r} is not attached to its router owner")
        return self._owner[0]

    def masked_codes(self, x: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mask * B x, mask)` for `x` [..., n] -> [..., r]; the owner caches them for its members (same input)."""
        router = self._router()
        cache = router._cache
        compiling = torch.compiler.is_compiling()  # tensor identity and versions cannot be traced: no sharing then
        if not compiling and self.role == MEMBER and cache is not None and cache[0] is x and cache[1] == x._version:
            router._cache_reads_left -= 1
            if router._cache_reads_left <= 0:  # last reader: do not keep the activation (and its graph) alive
                router._cache = None
            return cache[2], cache[3]
        router.check_filled(adapter_name)
        down = router.rana_hf_B[adapter_name]
        codes = F.linear(x.to(down.dtype), down)  # [..., r]
        with torch.no_grad():
            keep = keep_mask(codes.abs(), router.rana_hf_threshold[adapter_name], router.top_k)
        codes = codes * keep
        counter = _ACTIVE_COUNTER
        if counter is not None:  # the router's cost, paid once per token whichever module computes it
            tokens, _ = _tally(counter, keep)
            counter.add(router.module_name, 0, 0, tokens * self.in_features * down.shape[0])
        if not compiling and router.role == OWNER and self.role == OWNER and router.num_members:
            router._cache = (x, x._version, codes, keep)
            router._cache_reads_left = router.num_members
        return codes, keep

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x: [..., n] -> [..., m]
        state = self._decode
        if state is not None and state.runs(self, x) and state.decodes(x):  # a decode step of a prepared layer
            return state.forward(self, x)
        adapter_name = self._active()
        if adapter_name is None:
            return self.dense_forward(x, *args, **kwargs)
        codes, keep = self.masked_codes(x, adapter_name)
        if self.role == MEMBER:
            self.check_filled(adapter_name)  # its A (the owner checked the router)
        up = self.rana_hf_A[adapter_name]
        bias = module_weight(self.base_layer, "bias")
        result = F.linear(codes, up, bias.to(device=up.device, dtype=up.dtype) if bias is not None else None)
        counter = _ACTIVE_COUNTER
        if counter is not None:
            tokens, kept = _tally(counter, keep)
            dense = tokens * self.in_features * self.out_features
            counter.add(self.module_name, tokens, dense, kept * self.out_features)
        return result.to(x.dtype)

    def __repr__(self) -> str:
        return f"rana.{super().__repr__()}"

    def extra_repr(self) -> str:
        return f"role={self.role}, rank={self.rank}"


class RaNANeuronLinear(nn.Module, RaNALayer):
    """Neuron adapter: `y = W (keep * h) + bias` with `keep_j = |h_j| >= rana_hf_threshold[j]` (per input neuron)."""

    adapter_layer_names = ()

    def __init__(self, base_layer: nn.Linear, adapter_name: str) -> None:
        super().__init__()
        RaNALayer.__init__(self, base_layer)
        device = execution_device(base_layer)
        self.rana_hf_threshold[adapter_name] = torch.full((self.in_features,), float("nan"), device=device)
        self.set_adapter(adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x: [..., n] (the gated product act(gate) * up) -> [..., m]
        if self._decode is not None and self._decode.runs(self, x):  # a prepared layer: decode step or prefill
            return self._decode.forward(self, x)
        adapter_name = self._active()
        if adapter_name is None:
            return self.dense_forward(x, *args, **kwargs)
        self.check_filled(adapter_name)
        threshold = self.rana_hf_threshold[adapter_name]
        with torch.no_grad():
            keep = keep_mask(x.abs(), threshold, self.top_k)
        result = self.base_layer(x * keep)
        counter = _ACTIVE_COUNTER
        if counter is not None:
            tokens, kept = _tally(counter, keep)
            dense = tokens * self.in_features * self.out_features
            counter.add(self.module_name, tokens, dense, kept * self.out_features)
        return result

    def __repr__(self) -> str:
        return f"rana.{super().__repr__()}"


class RaNAGatedLinear(nn.Module, RaNALayer):
    """CATS-style gate projection: `g = W x + bias`, with `g_j` zeroed where `|act(g_j)| < threshold`.

    The MLP computes `down(act(g) * up(x))`; as `act(0) = 0`, a zeroed `g_j` drops hidden neuron `j`, so a kernel can
    skip row `j` of up and column `j` of down. The reference path computes them and counts the kept work for the
    *followers* (up and down), which stay plain linears.
    """

    adapter_layer_names = ()

    def __init__(self, base_layer: nn.Linear, adapter_name: str, activation, followers: list[tuple[str, int, int]]):
        super().__init__()
        RaNALayer.__init__(self, base_layer)
        if not callable(activation) or float(activation(torch.zeros(1, device="cpu")).abs()) != 0.0:
            raise ValueError("a CATS-style gate needs an MLP activation with act(0) == 0 (SiLU, GELU, ReLU)")
        self._activation = [activation]  # plain list: the parent owns the activation module
        self.followers = followers  # (module name, dense MACs per token, MACs per kept hidden neuron)
        self.rana_hf_threshold[adapter_name] = torch.full((), float("nan"), device=execution_device(base_layer))
        self.set_adapter(adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x: [..., d] -> [..., h]
        result = self.base_layer(x, *args, **kwargs)
        adapter_name = self._active()
        if adapter_name is None:
            return result
        self.check_filled(adapter_name)
        with torch.no_grad():
            score = self._activation[0](result).abs()
            keep = keep_mask(score, self.rana_hf_threshold[adapter_name], self.top_k)
        counter = _ACTIVE_COUNTER
        if counter is not None:
            tokens, kept = _tally(counter, keep)
            dense = tokens * self.in_features * self.out_features
            counter.add(self.module_name, tokens, dense, dense)
            for name, dense_per_token, per_kept in self.followers:
                counter.add(name, tokens, tokens * dense_per_token, kept * per_kept)
        return result * keep

    def __repr__(self) -> str:
        return f"rana.{super().__repr__()}"

"""The two interfaces of an adapter kind: planning (`AdapterKind`) and the plan entry it writes (`EntryKind`).

Targeted linears are planned in *units*: linears that read one input and take one adapter decision together (q/k/v
behind one router, a single linear, a whole gated MLP). For a unit, an `AdapterKind` turns calibration statistics into
*options* (a cost in MACs per token and an estimated squared output error, one per budget) and materialises the option
the allocator chose as JSON plan entries plus the tensors that fill the new layers.

A plan entry is read back by its `EntryKind` (`entry["kind"]`): it validates the entry, builds the `RaNALayer` that
replaces the linear, and links layers that work together. Several adapter kinds can write the same entry kind (static
SVD writes rank entries; TEAL-style magnitude masks write neuron entries).

Kinds receive everything model-specific through a `PlanContext` (the planner): weights, input samples, cached bases.
They never see a model, never run one, and do not branch on other kinds' names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..decomposition import RankBasis
from ..layers import RaNALayer

# Budget grid of the error-vs-cost curves (fractions of a unit's dense cost): the planner's curves, and the kinds that
# plan on a grid of their own (a compensation's screening, the per-linear split of a unit's masks).
KEEP_GRID = tuple(round(0.04 * i, 2) for i in range(1, 25))

# The option of leaving a unit's linears as they are, at their dense cost: every kind may answer a budget with it (its
# best plan being no cheaper than dense), and global allocation always offers it (`adapters.dense`).
DENSE = "dense"


@dataclass
class Unit:
    """Linears planned together.

    Attributes:
        names: module names; q/k/v (shared router), [name], or [gate, up, down] for a whole gated MLP.
        stream: statistics stream of the unit's input (the module whose input hook sampled it).
        kinds: candidate adapter kinds (names in the registry).
        loss_names: modules whose output error the unit's error measures (for the loss-gradient weight).
        split_kinds: kinds each linear of the unit may take on its own, the unit's budget split between its linears
            (the kind `split` among `kinds`); empty: none.
    """

    names: list[str]
    stream: str
    kinds: tuple[str, ...]
    loss_names: list[str] = field(default_factory=list)
    split_kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.loss_names:
            self.loss_names = list(self.names)

    def offers(self, kind: str) -> bool:
        """The unit may take `kind`, as a whole or per linear."""
        return kind in self.kinds or kind in self.split_kinds


@dataclass
class Option:
    """One way for a unit to spend a budget: `macs` per token, `error` = squared output error per token.

    `kind` names the adapter kind that materialises it (a kind may answer with a `dense` option when its best plan is
    no cheaper than dense); `payload` is that kind's own record of the plan (thresholds, ranks, ...).
    """

    kind: str
    macs: float
    error: float
    payload: Any = None


class PlanContext(Protocol):
    """What the planner offers a kind: the base model's linears and the statistics of their inputs."""

    modules: dict[str, nn.Module]
    # loss per unit of estimated loss, by kind, measured end to end (`api._auto_plan`); absent: 1
    kind_scale: dict[str, float]

    def weights(self, names: list[str]) -> list[torch.Tensor]:
        """float32 weights of `names`, where the weights live."""

    def sample(self, unit: Unit) -> torch.Tensor:
        """[N, n] float32 sample of the unit's input tokens, on the device of its weights."""

    def basis(self, unit: Unit, names: list[str] | None = None) -> RankBasis:
        """The data-aware basis of `names` (default: the unit's linears, stacked) on the unit's input (cached)."""

    def loss_weight(self, names: list[str]) -> float:
        """Mean squared loss gradient at the outputs of `names` (width-weighted; 1 without one)."""

    def principal_axes(self, unit: Unit) -> torch.Tensor:
        """Eigenvectors [n, n] (columns, by decreasing eigenvalue) of the unit's input second moment (cached)."""

    def activation(self, unit: Unit) -> Callable[[torch.Tensor], torch.Tensor]:
        """The activation of the gated MLP that holds the unit's first linear."""

    def max_rank(self, in_features: int, out_features: int) -> int | None:
        """Largest rank a rank adapter of this shape may take (None: no cap)."""

    def curve(self, unit: Unit, kind: str) -> list[Option]:
        """The options of `kind` for `unit` over the budget grid `KEEP_GRID` (cached; None options left out)."""

    def within_cap(self, unit: Unit, option: Option) -> bool:
        """Whether the option's ranks are all within `max_rank`."""


def dense_macs(modules: dict[str, nn.Module], names: list[str]) -> float:
    """MACs per token of the linears `names` computed densely."""
    return float(sum(modules[n].in_features * modules[n].out_features for n in names))


def entry(kind: str, module: nn.Linear, **extra) -> dict:
    """A plan entry (JSON) of kind `kind` for a linear."""
    return {"kind": kind, "in_features": module.in_features, "out_features": module.out_features, **extra}


class AdapterKind:
    """One way to adapt a unit. Subclasses set the class attributes and implement `options` and `materialize`.

    Attributes:
        name: the registry name (`Unit.kinds`, `Option.kind`, the plan's `stats["adapter"]`).
        needs_covariance: the kind needs the second moment `X X^T` of the unit's input (else a token sample is enough).
        fixed_cost: the unit costs its dense FLOPs whatever the budget (uniform allocation spreads the budget over
            the other units).
        min_keep: the kind has options only above this fraction of the unit's dense cost.
        floor_reason: why `min_keep` is what it is, for the error of a budget below it.
    """

    name: ClassVar[str]
    needs_covariance: ClassVar[bool] = False
    fixed_cost: ClassVar[bool] = False
    min_keep: ClassVar[float] = 0.0
    floor_reason: ClassVar[str] = ""

    def options(self, ctx: PlanContext, unit: Unit, budgets: list[float]) -> list[Option | None]:
        """One option per budget (MACs per token), None where the kind cannot spend that budget."""
        raise NotImplementedError

    def materialize(self, ctx: PlanContext, unit: Unit, option: Option, plan: dict, fills: dict) -> None:
        """Write the plan entries of the unit's chosen `option` into `plan` and the tensors its layers need into
        `fills` (module name -> {container attribute: tensor})."""
        raise NotImplementedError

    def stats(self, option: Option) -> dict:
        """What the plan records of the chosen option (`plan[first name]["stats"]`)."""
        return {"adapter": option.kind, "expected_macs": option.macs, "error": option.error}

    def within_cap(self, ctx: PlanContext, unit: Unit, option: Option) -> bool:
        """Whether the option's ranks are all within `ctx.max_rank` (an option planned without the cap that is within
        it can stand for the capped one)."""
        return True

    def parts(self, unit: Unit, option: Option) -> list[tuple[Unit, Option]] | None:
        """An option made of other kinds' options for parts of the unit: (part, its option) pairs, each materialised
        and counted as a unit of its own; None (the default): the kind materialises the option itself."""
        return None

    def cache_key(self, ctx: PlanContext, unit: Unit) -> tuple:
        """What a unit's options depend on beyond its linears and the kind (cached curves are keyed by it)."""
        return ()


class EntryKind:
    """One kind of plan entry: how a linear planned that way is checked and built.

    Attributes:
        name: `entry["kind"]`.
        injected: a RaNA layer replaces the linear (False: the linear stays as it is).
        counted_dense: a linear left as it is whose dense FLOPs count toward the targeted ones (measured by a hook).
    """

    name: ClassVar[str]
    injected: ClassVar[bool] = True
    counted_dense: ClassVar[bool] = False

    def check(self, name: str, entry: dict, plan: dict) -> None:
        """Refuse a malformed entry (as read from JSON), before any module is touched."""

    def build(self, plan: dict, name: str, target: nn.Linear, parent: nn.Module, adapter_name: str) -> RaNALayer:
        """The RaNA layer that replaces `target` (its tensors unfilled)."""
        raise ValueError(f"plan entry {name!r} of kind {self.name!r} is not a RaNA layer")

    def top_k(self, entry: dict) -> int | None:
        """Components or neurons each token keeps under `budget_mode="topk"` (None: the layer has no mask)."""
        return None

    def link(self, name: str, entry: dict, layers: dict[str, RaNALayer]) -> None:
        """Connect the layer `name` to the others it works with, once every layer of the plan exists."""

    def rank_ratio(self, name: str, entry: dict, plan: dict) -> float:
        """A rank adapter's rank over its break-even rank `mn/(m+n)` (`m`: its router group's outputs; 0: no rank)."""
        return 0.0

    def parameters(self, entry: dict) -> int:
        """Weight parameters the linear holds once prepared for decoding (`inference.prepare_for_decode`): by default
        its own weight, used as it is (thresholds and biases are not counted)."""
        return entry["in_features"] * entry["out_features"]

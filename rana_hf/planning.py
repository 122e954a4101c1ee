"""Planning: calibration statistics -> a per-module plan (JSON) and the tensors that fill the injected layers.

One framework for every method. Targeted linears are grouped into *units* (linears that share an input and one
adapter decision: q/k/v with one router, a single linear, a gated MLP). Each unit has candidate adapter *kinds*:

- `rank`: the data-aware basis with a per-token magnitude mask (RaNA's rank adapter, router cost `n * rank`);
- `svd`: the same basis at a fixed rank, no mask (static SVD);
- `neuron`: the identity basis (no router): input neuron `i` kept when `|x_i| * ||W[:, i]|| >= tau`;
- `magnitude`: the identity basis with the mask on `|x_i|` alone (TEAL-style);
- `cats`: a gated MLP with the mask on `|act(gate x)|`, skipping those rows of up and columns of down (CATS-style);
- `mlp`: the paper's gated MLP (rank adapters on gate and up, neuron adapter on down, grid-searched split).

Every kind turns a budget (MACs per token) into an *option*: its measured cost and squared output error on the
calibration sample. Uniform allocation gives every unit the same fraction of its dense cost (the paper); global
allocation weighs each unit's error by its output's loss gradient (`fisher`) and spends one budget on the lower convex
hulls of all units' error-vs-cost curves (`allocation.allocate_global`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import allocation, decomposition
from .calibration import StreamStats, module_weight
from .layers import MEMBER, OWN, OWNER
from .tuner import DENSE as DENSE_ENTRY
from .tuner import FOLLOWER as FOLLOWER_ENTRY
from .tuner import GATED as GATED_ENTRY
from .tuner import NEURON as NEURON_ENTRY
from .tuner import RANK as RANK_ENTRY

# Adapter kinds a unit can choose from.
RANK, SVD, NEURON, MAGNITUDE, CATS, PAPER_MLP, DENSE = "rank", "svd", "neuron", "magnitude", "cats", "mlp", "dense"
NEEDS_COVARIANCE = (RANK, SVD, PAPER_MLP)

# Budget grid of the error-vs-cost curves (fractions of the unit's dense cost).
KEEP_GRID = tuple(round(0.04 * i, 2) for i in range(1, 25))


@dataclass
class Unit:
    """Linears planned together.

    Attributes:
        names: module names; q/k/v (shared router), [name], or [gate, up, down] for `mlp`/`cats` units.
        stream: statistics stream of the unit's input (the module whose input hook sampled it).
        kinds: candidate adapter kinds.
        loss_names: modules whose output error the unit's error measures (for the loss-gradient weight).
    """

    names: list[str]
    stream: str
    kinds: tuple[str, ...]
    loss_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.loss_names:
            self.loss_names = list(self.names)


@dataclass
class Option:
    """One way for a unit to spend a budget: `macs` per token, `error` = squared output error per token."""

    kind: str
    macs: float
    error: float
    payload: Any = None


def make_units(method: str, allocation_mode: str, groups, modules: dict[str, nn.Module]) -> list[Unit]:
    """The planning units and their candidate kinds for a method (see the module docstring)."""
    units = []
    for group in groups:
        kind, names = group.kind, group.names
        if kind in ("qkv", "linear"):
            if method in ("teal", "auto"):  # one unit per linear: q, k and v get their own budgets (and masks)
                kinds = (MAGNITUDE,) if method == "teal" else (RANK, NEURON, MAGNITUDE)
                units.extend(Unit([name], group.stream, kinds) for name in names)
            else:
                kinds = {"rana": (RANK,), "svd": (SVD,), "cats": (DENSE,)}[method]
                units.append(Unit(list(names), group.stream, kinds))
        elif kind == "mlp":
            gate, up, down = names
            if method == "cats":
                units.append(Unit(list(names), gate, (CATS,), loss_names=[down]))
            elif method == "rana" and allocation_mode == "uniform":
                units.append(Unit(list(names), gate, (PAPER_MLP,), loss_names=[down]))
            else:
                first, last = {
                    "rana": ((RANK,), (NEURON,)),
                    "svd": ((SVD,), (SVD,)),
                    "teal": ((MAGNITUDE,), (MAGNITUDE,)),
                    "auto": ((RANK, NEURON, MAGNITUDE), (NEURON, MAGNITUDE, RANK)),
                }[method]
                units.extend([Unit([gate], gate, first), Unit([up], gate, first), Unit([down], down, last)])
        else:  # a down projection without its gate/up targeted: its input is the dense gated product
            kinds = {
                "rana": (NEURON,),
                "svd": (SVD,),
                "teal": (MAGNITUDE,),
                "cats": (DENSE,),
                "auto": (NEURON, MAGNITUDE, RANK),
            }
            units.append(Unit(list(names), group.stream, kinds[method]))
    return units


def streams_for(units: list[Unit], modules: dict[str, nn.Module]) -> dict[str, tuple[nn.Module, bool]]:
    """Input streams the units need: stream name -> (module to hook, whether its second moment is needed)."""
    streams: dict[str, tuple[nn.Module, bool]] = {}
    for unit in units:
        want = any(kind in NEEDS_COVARIANCE for kind in unit.kinds)
        _, previous = streams.get(unit.stream, (None, False))
        streams[unit.stream] = (modules[unit.stream], previous or want)
    return streams


def dense_macs(modules: dict[str, nn.Module], names: list[str]) -> float:
    return float(sum(modules[n].in_features * modules[n].out_features for n in names))


class Planner:
    """Options and plans for units from one set of calibration statistics; bases and curves are cached, so several
    methods and budgets can be planned from one calibration pass.

    Args:
        modules: name -> module of the base model.
        stats: input statistics per stream.
        fisher: per-module mean squared loss gradient at the output (None: unweighted errors).
        balance_qkv: weigh the blocks of a shared q/k/v basis equally.
        no_larger_than_dense: cap ranks so that `A` and `B` hold no more parameters than the weight they replace.
        cache: dict holding bases and curves, shared by planners built on the same statistics.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        stats: dict[str, StreamStats],
        fisher: dict[str, float] | None = None,
        balance_qkv: bool = False,
        no_larger_than_dense: bool = False,
        cache: dict | None = None,
    ) -> None:
        self.modules = modules
        self.stats = stats
        self.fisher = fisher
        self.balance_qkv = balance_qkv
        self.no_larger_than_dense = no_larger_than_dense
        cache = {} if cache is None else cache  # shared between planners of one calibration
        self._bases: dict[tuple, decomposition.RankBasis] = cache.setdefault("bases", {})
        self._curves: dict[tuple, list[Option | None]] = cache.setdefault("curves", {})
        # Loss per unit of estimated loss, by adapter kind, measured end to end (see `api._auto_plan`); 1 by default.
        self.kind_scale: dict[str, float] = {}

    # ----- statistics helpers

    def _weights(self, names: list[str]) -> list[torch.Tensor]:
        return [module_weight(self.modules[n]).detach().float() for n in names]

    def sample(self, unit: Unit) -> torch.Tensor:
        sample = self.stats[unit.stream].sample
        if sample.shape[0] == 0:
            raise ValueError(f"no calibration tokens reached {unit.stream!r}")
        # [N, n] float32, where the weights are: on a GPU the curves' sorts and products run there
        return sample.to(module_weight(self.modules[unit.names[0]]).device)

    def basis(self, unit: Unit, names: list[str] | None = None) -> decomposition.RankBasis:
        names = names or unit.names
        key = (tuple(names), unit.stream, self.balance_qkv)
        if key not in self._bases:
            covariance = self.stats[unit.stream].covariance
            if covariance is None:
                raise RuntimeError(f"internal: no second moment collected for {unit.stream!r}")
            weights = self._weights(names)
            row_scale = None
            if len(names) > 1 and self.balance_qkv:
                scales = decomposition.block_output_scales(weights, covariance)
                weights = [w / float(scale) for w, scale in zip(weights, scales, strict=True)]
                row_scale = torch.cat(
                    [torch.full((w.shape[0],), float(sc)) for w, sc in zip(weights, scales, strict=True)]
                )
            basis = decomposition.data_aware_basis(decomposition.stack_weights(weights), covariance)
            if row_scale is not None:  # W x ~ diag(scale) A_balanced (mask * B x)
                basis.up = basis.up * row_scale.to(basis.up.device)[:, None]
            self._bases[key] = basis
        return self._bases[key]

    def unit_fisher(self, unit: Unit) -> float:
        if self.fisher is None:
            return 1.0
        widths = [self.modules[n].out_features for n in unit.loss_names]
        return sum(self.fisher[n] * w for n, w in zip(unit.loss_names, widths, strict=True)) / sum(widths)

    def _max_rank(self, in_features: int, out_features: int) -> int | None:
        if not self.no_larger_than_dense:
            return None
        return max(1, (in_features * out_features) // (in_features + out_features))

    # ----- options

    def options(self, unit: Unit, kind: str, budgets: list[float]) -> list[Option | None]:
        """One option per budget (None where the kind cannot spend that budget)."""
        out_features = sum(self.modules[n].out_features for n in unit.names)
        in_features = self.modules[unit.names[0]].in_features
        dense = dense_macs(self.modules, unit.names)
        if kind == DENSE:
            return [Option(DENSE, dense, 0.0) for _ in budgets]
        if kind in (RANK, SVD):
            basis = self.basis(unit)
            sample = self.sample(unit)
            codes = sample.to(basis.down.device) @ basis.down.T  # [N, r]
            search = allocation.rank_plans if kind == RANK else allocation.static_rank_plans
            if kind == RANK and len(budgets) > 1:  # a curve: 32 candidate ranks are plenty and twice as fast
                search = functools.partial(allocation.rank_plans, max_candidates=32)
            plans = search(
                codes, in_features, out_features, budgets, max_rank=self._max_rank(in_features, out_features)
            )
            result = []
            for plan in plans:
                if plan.dense:
                    result.append(Option(DENSE, dense, 0.0))
                elif plan.rank == 0 or plan.mean_kept <= 0:
                    result.append(None)
                else:
                    error = max(plan.total_energy - plan.kept_energy, 0.0) / codes.shape[0]
                    result.append(Option(kind, plan.macs_per_token, error, plan))
            return result
        if kind in (NEURON, MAGNITUDE):
            sample = self.sample(unit)
            norms = torch.cat(self._weights(unit.names), dim=0).norm(dim=0).to(sample.device)  # [n]
            energy = sample.pow(2) * norms.pow(2)  # [N, n]: x_i^2 ||W[:, i]||^2, the error of dropping input i
            score = energy.sqrt() if kind == NEURON else sample.abs()
            fractions = [budget / dense for budget in budgets]
            plans = allocation.mask_plans(score, energy, fractions)
            result = []
            for fraction, plan in zip(fractions, plans, strict=True):
                if fraction >= 1.0:
                    result.append(Option(DENSE, dense, 0.0))
                elif plan.keep_fraction <= 0:
                    result.append(None)
                else:
                    error = (plan.total_energy - plan.kept_energy) / sample.shape[0]
                    result.append(Option(kind, dense * plan.keep_fraction, error, (plan, norms)))
            return result
        if kind == CATS:
            gate, up, down = (self.modules[n] for n in unit.names)
            sample = self.sample(unit)
            activation = self._activation(unit)
            gated = activation(sample @ module_weight(gate).float().T)  # [N, h]
            product = gated * (sample @ module_weight(up).float().T)
            energy = product.pow(2) * module_weight(down).float().norm(dim=0).pow(2)
            hidden, model_dim = module_weight(gate).shape
            fractions = [(budget - hidden * model_dim) / (2 * hidden * model_dim) for budget in budgets]
            plans = allocation.mask_plans(gated.abs(), energy, [max(f, 0.0) for f in fractions])
            result = []
            for fraction, plan in zip(fractions, plans, strict=True):
                if fraction >= 1.0:
                    result.append(Option(DENSE, dense, 0.0))
                elif fraction <= 0 or plan.keep_fraction <= 0:
                    result.append(None)
                else:
                    macs = hidden * model_dim * (1 + 2 * plan.keep_fraction)
                    result.append(Option(CATS, macs, (plan.total_energy - plan.kept_energy) / sample.shape[0], plan))
            return result
        if kind == PAPER_MLP:
            gate, up, down = (self.modules[n] for n in unit.names)
            sample = self.sample(unit)
            result = []
            for budget in budgets:
                if budget >= dense:
                    result.append(Option(DENSE, dense, 0.0))
                    continue
                mlp_plan = allocation.search_mlp_split(
                    sample.to(module_weight(gate).device),
                    module_weight(gate).float(),
                    module_weight(up).float(),
                    module_weight(down).float(),
                    self._activation(unit),
                    self.basis(unit, [unit.names[0]]),
                    self.basis(unit, [unit.names[1]]),
                    budget,
                    max_rank=self._max_rank(gate.in_features, gate.out_features),
                )
                result.append(Option(PAPER_MLP, mlp_plan.macs_per_token, mlp_plan.relative_error, mlp_plan))
            return result
        raise ValueError(f"unknown adapter kind {kind!r}")

    def _activation(self, unit: Unit):
        parent = self.modules[unit.names[0].rpartition(".")[0]]
        activation = getattr(parent, "act_fn", None)
        if not callable(activation):
            raise ValueError(f"{unit.names[0]!r} has no gated-MLP parent with an `act_fn`")
        return activation

    def curve(self, unit: Unit, kind: str) -> list[Option]:
        """Options of one kind over the budget grid `KEEP_GRID` (cached)."""
        key = (tuple(unit.names), kind, self.balance_qkv, self.no_larger_than_dense)
        if key not in self._curves:
            dense = dense_macs(self.modules, unit.names)
            self._curves[key] = self.options(unit, kind, [f * dense for f in KEEP_GRID])
        return [option for option in self._curves[key] if option is not None]

    # ----- allocation

    def allocate(self, units: list[Unit], keep_fraction: float, mode: str) -> list[Option]:
        """Choose one option per unit so that the expected cost is `keep_fraction` of dense (uniform or global)."""
        dense = [dense_macs(self.modules, unit.names) for unit in units]
        total = sum(dense)
        if mode == "uniform":
            fractions = [keep_fraction] * len(units)
            if any(CATS in unit.kinds for unit in units):  # CATS spends the whole budget in the MLPs
                fixed = sum(d for d, unit in zip(dense, units, strict=True) if CATS not in unit.kinds)
                mlp = total - fixed
                if mlp <= 0:
                    raise ValueError("method 'cats' adapts gated MLPs (gate/up/down all targeted); none is targeted")
                mlp_fraction = (keep_fraction * total - fixed) / mlp
                fractions = [mlp_fraction if CATS in unit.kinds else 1.0 for unit in units]
                if mlp_fraction <= 1 / 3:
                    best = 1 - (fixed + mlp / 3) / total
                    raise ValueError(
                        f"method 'cats' cannot reach flop_reduction={1 - keep_fraction:.3f} on these targets: the "
                        f"gate projections stay dense, so at most {best:.3f} is reachable. Lower flop_reduction."
                    )
            chosen = []
            for unit, fraction, unit_dense in zip(units, fractions, dense, strict=True):
                candidates = [
                    option
                    for kind in unit.kinds
                    for option in self.options(unit, kind, [fraction * unit_dense])
                    if option is not None
                ]
                if not candidates:
                    raise ValueError(
                        f"no adapter of kinds {unit.kinds} fits {fraction:.3f} of the cost of {unit.names[0]!r}"
                    )
                chosen.append(min(candidates, key=lambda option: self.estimated_loss(unit, option)))
            return chosen
        options = []
        for unit, unit_dense in zip(units, dense, strict=True):
            unit_options = [Option(DENSE, unit_dense, 0.0)]
            for kind in unit.kinds:
                if kind != DENSE:
                    unit_options.extend(self.curve(unit, kind))
            options.append(unit_options)
        curves = [
            [(option.macs, self.estimated_loss(unit, option)) for option in unit_options]
            for unit, unit_options in zip(units, options, strict=True)
        ]
        try:
            picks = allocation.allocate_global(curves, keep_fraction * total)
        except ValueError as error:
            cheapest = sum(min(option.macs for option in unit_options) for unit_options in options)
            raise ValueError(
                f"flop_reduction={1 - keep_fraction:.3f} is out of reach for these adapter kinds: the cheapest plan "
                f"keeps {cheapest / total:.3f} of the targeted FLOPs. Lower flop_reduction."
            ) from error
        return [unit_options[pick] for unit_options, pick in zip(options, picks, strict=True)]

    def estimated_loss(self, unit: Unit, option: Option) -> float:
        """`0.5 * fisher * error` per token, scaled by the kind's measured loss scale."""
        return 0.5 * self.unit_fisher(unit) * option.error * self.kind_scale.get(option.kind, 1.0)

    # ----- plan entries

    def materialize(self, unit: Unit, option: Option, plan: dict, fills: dict) -> None:
        """Write the plan entries (JSON) of a unit's chosen option, and the tensors to copy into its layers."""
        modules = [self.modules[n] for n in unit.names]
        info = {"adapter": option.kind, "expected_macs": option.macs, "error": option.error}
        if option.kind == DENSE:
            for name, module in zip(unit.names, modules, strict=True):
                plan[name] = _entry(DENSE_ENTRY, module)
        elif option.kind in (RANK, SVD):
            rank_plan = option.payload
            basis = self.basis(unit)
            rank, offset = rank_plan.rank, 0
            for index, (name, module) in enumerate(zip(unit.names, modules, strict=True)):
                rows = slice(offset, offset + module.out_features)
                offset += module.out_features
                role = OWN if len(unit.names) == 1 else (OWNER if index == 0 else MEMBER)
                entry = _entry(RANK_ENTRY, module, role=role, rank=rank)
                tensors = {"rana_hf_A": basis.up[rows, :rank]}
                if role == MEMBER:
                    entry["owner"] = unit.names[0]
                else:
                    entry["mean_kept"] = rank_plan.mean_kept
                    tensors["rana_hf_B"] = basis.down[:rank]
                    tensors["rana_hf_threshold"] = torch.tensor(rank_plan.threshold, dtype=torch.float32)
                plan[name], fills[name] = entry, tensors
        elif option.kind in (NEURON, MAGNITUDE):
            mask_plan, norms = option.payload
            (name,), (module,) = unit.names, modules  # input masks are planned one linear at a time
            _neuron_entry(name, module, option.kind, mask_plan.threshold, mask_plan.keep_fraction, norms, plan, fills)
        elif option.kind == CATS:
            gate_name, up_name, down_name = unit.names
            gate, up, down = modules
            mask_plan = option.payload
            plan[gate_name] = _entry(
                GATED_ENTRY, gate, keep_fraction=mask_plan.keep_fraction, followers=[up_name, down_name]
            )
            plan[up_name] = _entry(FOLLOWER_ENTRY, up, leader=gate_name, axis="out")
            plan[down_name] = _entry(FOLLOWER_ENTRY, down, leader=gate_name, axis="in")
            fills[gate_name] = {"rana_hf_threshold": torch.tensor(mask_plan.threshold, dtype=torch.float32)}
        elif option.kind == PAPER_MLP:
            mlp_plan = option.payload
            for name, module, rank_plan in zip(unit.names[:2], modules[:2], (mlp_plan.gate, mlp_plan.up), strict=True):
                if rank_plan.dense:
                    plan[name] = _entry(DENSE_ENTRY, module)
                    continue
                basis = self.basis(unit, [name])
                plan[name] = _entry(RANK_ENTRY, module, role=OWN, rank=rank_plan.rank, mean_kept=rank_plan.mean_kept)
                fills[name] = {
                    "rana_hf_A": basis.up[:, : rank_plan.rank],
                    "rana_hf_B": basis.down[: rank_plan.rank],
                    "rana_hf_threshold": torch.tensor(rank_plan.threshold, dtype=torch.float32),
                }
            down = modules[2]
            norms = decomposition.column_norms(module_weight(down))
            tau, fraction = mlp_plan.down_threshold, mlp_plan.down_keep_fraction
            if tau <= 0:
                plan[unit.names[2]] = _entry(DENSE_ENTRY, down)
            else:
                _neuron_entry(unit.names[2], down, NEURON, tau, fraction, norms, plan, fills)
            info.update(split=list(mlp_plan.split), relative_error=mlp_plan.relative_error)
            info.pop("error")
        else:
            raise ValueError(f"unknown adapter kind {option.kind!r}")
        plan[unit.names[0]]["stats"] = info


def _entry(kind: str, module: nn.Linear, **extra) -> dict:
    return {"kind": kind, "in_features": module.in_features, "out_features": module.out_features, **extra}


def _neuron_entry(name, module, kind, tau, keep_fraction, norms, plan, fills) -> None:
    importance = "weighted" if kind == NEURON else "magnitude"
    plan[name] = _entry(NEURON_ENTRY, module, keep_fraction=keep_fraction, importance=importance)
    if importance == "weighted":
        thresholds = allocation.per_neuron_thresholds(tau, norms)
    else:
        thresholds = torch.full((module.in_features,), float(tau))
    fills[name] = {"rana_hf_threshold": thresholds.float()}


@dataclass
class PlanResult:
    """A materialized plan: JSON entries, tensors to fill, expected kept fraction, and its estimated loss increase
    per token (unscaled by `kind_scale`), per adapter kind."""

    plan: dict
    fills: dict
    expected_keep: float
    estimated_loss: dict[str, float]


def plan_units(planner: Planner, units: list[Unit], keep_fraction: float, mode: str) -> PlanResult:
    """Allocate and materialize the units at `keep_fraction` of their dense cost."""
    options = planner.allocate(units, keep_fraction, mode)
    plan, fills, estimated = {}, {}, {}
    for unit, option in zip(units, options, strict=True):
        planner.materialize(unit, option, plan, fills)
        estimated[option.kind] = estimated.get(option.kind, 0.0) + 0.5 * planner.unit_fisher(unit) * option.error
    total = sum(dense_macs(planner.modules, unit.names) for unit in units)
    expected = sum(option.macs for option in options) / total if total else 1.0
    return PlanResult(plan, fills, expected if math.isfinite(expected) else 1.0, estimated)


def restrict(units: list[Unit], kind: str) -> list[Unit]:
    """The units with only `kind` among their candidates (units without it keep theirs)."""
    return [Unit(u.names, u.stream, (kind,) if kind in u.kinds else u.kinds, u.loss_names) for u in units]

"""Planning: targets -> units -> each kind's options -> allocation -> a per-module plan (JSON) and its tensors.

One framework for every method. Targeted linears are grouped by the input they read (`group_targets`), and a method
(`adapters.METHODS`) turns the groups into *units* with candidate adapter *kinds* (`make_units`). Every kind turns a
budget (MACs per token) into an *option*: its measured cost and squared output error on the calibration sample
(`adapters.<kind>`). Uniform allocation gives every unit the same fraction of its dense cost (the paper); global
allocation weighs each unit's error by its output's loss gradient (`fisher`) and spends one budget on the lower convex
hulls of all units' error-vs-cost curves (`allocation.allocate_global`). The chosen options are then materialised by
their kinds. Nothing here branches on a kind's name.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from tqdm.auto import tqdm

from . import allocation, decomposition
from .adapters import DENSE, ENTRIES, KINDS, METHODS, SPLIT, Option, Unit, dense_macs, rotated
from .adapters.base import KEEP_GRID
from .calibration import StreamStats
from .config import DEFAULT_TARGET_MODULES, MLP_DOWN, MLP_GATE, MLP_UP, QKV_NAMES, SIZE_CAPS
from .offload import module_weight

logger = logging.getLogger(__name__)


# Groups of targeted linears, by the input they read.
QKV, MLP, LINEAR, LONE_DOWN = "qkv", "gated_mlp", "linear", "lone_down"


@dataclass
class Group:
    """Targeted linears that read one input: q/k/v (all three targeted, `fuse_qkv`), a gated MLP (gate, up and down
    targeted), a down projection whose gate/up are not targeted, or one other linear."""

    kind: str  # QKV, MLP, LONE_DOWN or LINEAR
    names: list[str]  # qkv: [q, k, v]; mlp: [gate, up, down]; otherwise [name]

    @property
    def stream(self) -> str:
        return self.names[0]


def resolve_targets(model: nn.Module, config) -> list[str]:
    """Names of the `nn.Linear` modules the config targets; a clear error if there are none."""
    target_modules = config.target_modules
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        target_modules = DEFAULT_TARGET_MODULES.get(model_type)
        if target_modules is None:
            raise ValueError(
                f"RaNA has no default target modules for model type {model_type!r}. Pass "
                "RaNAConfig(target_modules=[...]) with the names of the nn.Linear modules to adapt."
            )
    probe = copy.copy(config)
    probe.target_modules = target_modules
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and check_target_module_exists(probe, name)
    ]
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matches no nn.Linear in this model. Check the module names "
            "(e.g. `[n for n, m in model.named_modules()]`)."
        )
    if not isinstance(target_modules, str):  # a list: each entry must name something (a typo is not dropped)
        unmatched = []
        for key in target_modules:
            probe.target_modules = [key]
            if not any(check_target_module_exists(probe, name) for name in names):
                unmatched.append(key)
        if unmatched:
            raise ValueError(
                f"target_modules entries {unmatched} match no nn.Linear in this model (the others match "
                f"{len(names)} linears). Fix or remove them; module names: `[n for n, m in model.named_modules()]`."
            )
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [name for name in names if output is not None and model.get_submodule(name) is output]
    if heads:
        raise ValueError(
            f"target_modules={target_modules!r} includes the output head {heads[0]!r}: RaNA adapts the linears "
            "inside the decoder blocks, not the head that produces the logits. Leave it out (as a regex, e.g. "
            r"'.*\.(q|k|v|o|gate|up|down)_proj')."
        )
    return names


def group_targets(model: nn.Module, targets: list[str], fuse_qkv: bool) -> list[Group]:
    """Group targeted linears by the input they read (see `Group`)."""
    modules = dict(model.named_modules())
    target_set = set(targets)
    groups, done = [], set()
    for name in targets:
        if name in done:
            continue
        parent, _, leaf = name.rpartition(".")
        siblings = [f"{parent}.{n}" if parent else n for n in QKV_NAMES]
        mlp_names = [f"{parent}.{n}" if parent else n for n in (MLP_GATE, MLP_UP, MLP_DOWN)]
        activation = getattr(modules.get(parent), "act_fn", None)
        if fuse_qkv and leaf in QKV_NAMES and all(s in target_set for s in siblings):
            groups.append(Group(QKV, siblings))
            done.update(siblings)
        elif leaf in (MLP_GATE, MLP_UP, MLP_DOWN) and all(s in target_set for s in mlp_names) and callable(activation):
            groups.append(Group(MLP, mlp_names))
            done.update(mlp_names)
        elif leaf == MLP_DOWN and callable(activation):
            groups.append(Group(LONE_DOWN, [name]))
            done.add(name)
        else:
            groups.append(Group(LINEAR, [name]))
            done.add(name)
    return groups


def make_units(method_name: str, allocation_mode: str, groups: list[Group]) -> list[Unit]:
    """The planning units of a method and their candidate kinds (see `adapters.Method`)."""
    method = METHODS[method_name]

    def joint(names: list[str], stream: str, kinds: tuple[str, ...]) -> Unit:
        if not method.per_linear:
            return Unit(names, stream, kinds)
        return Unit(names, stream, (*kinds, SPLIT), split_kinds=method.per_linear)

    def single(name: str, stream: str, kinds: tuple[str, ...]) -> Unit:
        return Unit([name], stream, tuple(dict.fromkeys(kinds + method.per_linear)))

    units = []
    for group in groups:
        names = group.names
        if group.kind == QKV and method.joint_qkv:
            units.append(joint(list(names), group.stream, method.linear))
        elif group.kind in (QKV, LINEAR):
            units.extend(single(name, group.stream, method.linear) for name in names)
        elif group.kind == MLP:
            gate, up, down = names
            whole = method.whole_mlp.get(allocation_mode)
            if whole is not None:
                units.append(Unit(list(names), gate, (whole,), loss_names=[down]))
            elif method.joint_mlp_in:
                units += [joint([gate, up], gate, method.mlp_in), Unit([down], down, method.mlp_down)]
            else:
                units.extend([single(gate, gate, method.mlp_in), single(up, gate, method.mlp_in)])
                units.append(Unit([down], down, method.mlp_down))
        else:
            units.append(Unit(list(names), group.stream, method.mlp_down))
    return units


def streams_for(units: list[Unit], modules: dict[str, nn.Module]) -> dict[str, tuple[nn.Module, bool]]:
    """Input streams the units need: stream name -> (module to hook, whether its second moment is needed)."""
    streams: dict[str, tuple[nn.Module, bool]] = {}
    for unit in units:
        want = any(KINDS[kind].needs_covariance for kind in (*unit.kinds, *unit.split_kinds))
        _, previous = streams.get(unit.stream, (None, False))
        streams[unit.stream] = (modules[unit.stream], previous or want)
    return streams


class Planner:
    """Options and plans for units from one set of calibration statistics; bases and curves are cached, so several
    methods and budgets can be planned from one calibration pass. It is the `adapters.PlanContext` of the kinds.

    Args:
        modules: name -> module of the base model.
        stats: input statistics per stream.
        fisher: per-module mean squared loss gradient at the output (None: unweighted errors).
        balance_qkv: weigh the blocks of a shared q/k/v basis equally.
        size_cap: 'model' (see `plan_units`), 'layer' (every rank adapter's `A` and `B` no larger than the weight
            they replace) or 'none' (`RaNAConfig.size_cap`).
        cache: dict holding bases and curves, shared by planners built on the same statistics.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        stats: dict[str, StreamStats],
        fisher: dict[str, float] | None = None,
        balance_qkv: bool = False,
        size_cap: str = "none",
        cache: dict | None = None,
    ) -> None:
        self.modules = modules
        self.stats = stats
        self.fisher = fisher
        self.balance_qkv = balance_qkv
        if size_cap not in SIZE_CAPS:
            raise ValueError(f"size_cap must be one of {SIZE_CAPS}, got {size_cap!r}")
        self.size_cap = size_cap
        # Ranks at most this multiple of a layer's break-even rank mn/(m+n) (None: no cap); `plan_units` sets it
        # while it searches for the model's cap.
        self.rank_limit: float | None = 1.0 if size_cap == "layer" else None
        cache = {} if cache is None else cache  # shared between planners of one calibration
        self._bases: dict[tuple, decomposition.RankBasis | torch.Tensor] = cache.setdefault("bases", {})
        self._curves: dict[tuple, list[Option | None]] = cache.setdefault("curves", {})
        self._single: dict[tuple, list[Option | None]] = {}  # options at one budget (uniform allocation)
        # Loss per unit of estimated loss, by adapter kind, measured end to end (see `api._auto_plan`); 1 by default.
        self.kind_scale: dict[str, float] = {}

    # ----- what the kinds read (adapters.PlanContext)

    def weights(self, names: list[str]) -> list[torch.Tensor]:
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
            weights = self.weights(names)
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

    def principal_axes(self, unit: Unit) -> torch.Tensor:
        key = ("principal_axes", unit.stream)
        if key not in self._bases:
            covariance = self.stats[unit.stream].covariance
            if covariance is None:
                raise RuntimeError(f"internal: no second moment collected for {unit.stream!r}")
            device = module_weight(self.modules[unit.names[0]]).device  # on a GPU: seconds for a 7B-wide input
            self._bases[key] = rotated.principal_axes(covariance.to(device))[1].float()
        return self._bases[key]

    def activation(self, unit: Unit) -> Callable[[torch.Tensor], torch.Tensor]:
        parent = self.modules[unit.names[0].rpartition(".")[0]]
        activation = getattr(parent, "act_fn", None)
        if not callable(activation):
            raise ValueError(f"{unit.names[0]!r} has no gated-MLP parent with an `act_fn`")
        return activation

    def max_rank(self, in_features: int, out_features: int) -> int | None:
        if self.rank_limit is None:
            return None
        return max(1, int(self.rank_limit * in_features * out_features / (in_features + out_features)))

    def within_cap(self, unit: Unit, option: Option) -> bool:
        """The option's ranks are within `max_rank` (then it is also the capped search's option, or as good)."""
        return self.rank_limit is None or KINDS[option.kind].within_cap(self, unit, option)

    def _capped(self, cache: dict, key: tuple, unit: Unit, compute: Callable[[], list]) -> list[Option | None]:
        """`cache[(*key, rank_limit)]`, made by `compute` unless the uncapped options `cache[(*key, None)]` are all
        within the current cap (then they stand for the capped ones)."""
        capped = (*key, self.rank_limit)
        if capped not in cache:
            uncapped = cache.get((*key, None))
            if uncapped is not None and all(option is None or self.within_cap(unit, option) for option in uncapped):
                cache[capped] = uncapped
            else:
                cache[capped] = compute()
        return cache[capped]

    # ----- options and curves

    def loss_weight(self, names: list[str]) -> float:
        if self.fisher is None:
            return 1.0
        widths = [self.modules[n].out_features for n in names]
        return sum(self.fisher[n] * w for n, w in zip(names, widths, strict=True)) / sum(widths)

    def unit_fisher(self, unit: Unit) -> float:
        return self.loss_weight(unit.loss_names)

    def options(self, unit: Unit, kind: str, budgets: list[float]) -> list[Option | None]:
        """One option per budget (None where the kind cannot spend that budget)."""
        if kind not in KINDS:
            raise ValueError(f"unknown adapter kind {kind!r}")
        return KINDS[kind].options(self, unit, budgets)

    def curve(self, unit: Unit, kind: str) -> list[Option]:
        """Options of one kind over the budget grid `KEEP_GRID` (cached)."""

        def compute() -> list[Option | None]:
            dense = dense_macs(self.modules, unit.names)
            return self.options(unit, kind, [f * dense for f in KEEP_GRID])

        key = (tuple(unit.names), kind, self.balance_qkv, *KINDS[kind].cache_key(self, unit))
        options = self._capped(self._curves, key, unit, compute)
        return [option for option in options if option is not None]

    def estimated_loss(self, unit: Unit, option: Option) -> float:
        """`0.5 * fisher * error` per token, scaled by the kind's measured loss scale."""
        return 0.5 * self.unit_fisher(unit) * option.error * self.kind_scale.get(option.kind, 1.0)

    # ----- allocation

    def allocate(self, units: list[Unit], keep_fraction: float, mode: str) -> list[Option]:
        """Choose one option per unit so that the expected cost is `keep_fraction` of dense (uniform or global)."""
        dense = [dense_macs(self.modules, unit.names) for unit in units]
        total = sum(dense)
        if mode == "uniform":
            return self._allocate_uniform(units, dense, keep_fraction)
        options = []
        for unit, unit_dense in _progress(units, dense, "global"):
            unit_options = [Option(DENSE, unit_dense, 0.0)]
            for kind in unit.kinds:
                if not KINDS[kind].fixed_cost:
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

    def _budget_options(self, unit: Unit, kind: str, budget: float) -> list[Option | None]:
        """`options` at one budget, kept per rank cap; an uncapped option within the cap stands for the capped one."""
        key = (tuple(unit.names), kind, budget, self.balance_qkv, *KINDS[kind].cache_key(self, unit))
        return self._capped(self._single, key, unit, lambda: self.options(unit, kind, [budget]))

    def _allocate_uniform(self, units: list[Unit], dense: list[float], keep_fraction: float) -> list[Option]:
        """The same fraction of its dense cost for every unit; units that can only stay dense keep their cost and the
        others share what is left."""
        fractions = [keep_fraction] * len(units)
        fixed_units = [all(KINDS[kind].fixed_cost for kind in unit.kinds) for unit in units]
        if any(fixed_units):
            total = sum(dense)
            fixed = sum(d for d, is_fixed in zip(dense, fixed_units, strict=True) if is_fixed)
            flexible = [unit for unit, is_fixed in zip(units, fixed_units, strict=True) if not is_fixed]
            if total - fixed <= 0:
                raise ValueError(
                    "every targeted linear stays dense with this method's adapter kinds, so nothing can spend the "
                    "budget: a method that adapts gated MLPs only (cats) needs gate, up and down all targeted"
                )
            fraction = (keep_fraction * total - fixed) / (total - fixed)
            floor, reason = max(
                (min(KINDS[kind].min_keep for kind in unit.kinds), KINDS[unit.kinds[0]].floor_reason)
                for unit in flexible
            )
            if fraction <= floor:
                best = 1 - (fixed + (total - fixed) * floor) / total
                raise ValueError(
                    f"these adapter kinds cannot reach flop_reduction={1 - keep_fraction:.3f} on these targets: "
                    f"{reason or 'their cheapest plans'}, so at most {best:.3f} is reachable. Lower flop_reduction."
                )
            fractions = [1.0 if is_fixed else fraction for is_fixed in fixed_units]
        chosen = []
        for (unit, unit_dense), fraction in zip(_progress(units, dense, "uniform"), fractions, strict=True):
            candidates = [
                option
                for kind in unit.kinds
                for option in self._budget_options(unit, kind, fraction * unit_dense)
                if option is not None
            ]
            if not candidates:
                raise ValueError(
                    f"no adapter of kinds {unit.kinds} fits {fraction:.3f} of the cost of {unit.names[0]!r}"
                )
            chosen.append(min(candidates, key=lambda option: self.estimated_loss(unit, option)))
        return chosen

    # ----- plan entries

    def materialize(self, unit: Unit, option: Option, plan: dict, fills: dict) -> None:
        """Write the plan entries (JSON) of a unit's chosen option, and the tensors to copy into its layers."""
        kind = KINDS[option.kind]
        parts = kind.parts(unit, option)
        if parts is not None:  # an option made of its parts' options (`adapters.split`): each is a unit of its own
            for part_unit, part in parts:
                self.materialize(part_unit, part, plan, fills)
            return
        kind.materialize(self, unit, option, plan, fills)
        plan[unit.names[0]]["stats"] = kind.stats(option)


def _progress(units: list[Unit], dense: list[float], mode: str):
    """(unit, dense cost) pairs under a progress bar: the options of every unit are the costly part of planning."""
    return tqdm(list(zip(units, dense, strict=True)), desc=f"RaNA allocation ({mode})", unit="unit")


@dataclass
class PlanResult:
    """A materialized plan: JSON entries, tensors to fill, expected kept fraction, its estimated loss increase per
    token (unscaled by `kind_scale`) per adapter kind, the weight parameters its linears hold once prepared for
    decoding against their dense ones, and the rank limit it was planned under (`Planner.rank_limit`)."""

    plan: dict
    fills: dict
    expected_keep: float
    estimated_loss: dict[str, float]
    parameters: int = 0
    dense_parameters: int = 0
    rank_limit: float | None = None


# Steps of the search for the model's size cap (a bisection of the rank limit between 1 and the uncapped plan's
# largest ratio of a rank to its break-even rank): 2^-6 of that range.
MODEL_CAP_STEPS = 6


def plan_parameters(plan: dict) -> int:
    """Weight parameters the planned linears hold once prepared for decoding (`EntryKind.parameters`)."""
    return sum(ENTRIES[entry["kind"]].parameters(entry) for entry in plan.values())


def plan_units(planner: Planner, units: list[Unit], keep_fraction: float, mode: str) -> PlanResult:
    """Allocate and materialize the units at `keep_fraction` of their dense cost.

    With `planner.size_cap == "model"`, a plan whose linears would hold more parameters than dense (ranks chosen near
    the layers' widths, where `A` and `B` outweigh `W`) is planned again under a rank limit: every rank at most the
    same multiple (>= 1) of its layer's break-even rank `mn/(m+n)`, the largest multiple that keeps the whole plan
    within dense (found by bisection; at 1 every layer is within its own weight). A plan already within dense is
    kept as it is, and the allocation of FLOPs is the same in either case. So is a plan without a rank adapter above
    its break-even rank: what it holds beyond dense (a compensated layer's `A` and `B` beside its weight) is no rank
    adapter's doing, and no cap on ranks would shrink it."""
    result = _plan_units(planner, units, keep_fraction, mode)
    if planner.size_cap != "model" or result.parameters <= result.dense_parameters:
        return result
    ratios = [ENTRIES[entry["kind"]].rank_ratio(name, entry, result.plan) for name, entry in result.plan.items()]
    if max(ratios, default=0.0) <= 1.0:  # no rank adapter above its break-even rank: a cap cannot make it smaller
        return result
    low, high, best = 1.0, max(ratios), None
    try:
        for _ in range(MODEL_CAP_STEPS):
            planner.rank_limit = (low + high) / 2
            trial = _plan_units(planner, units, keep_fraction, mode)
            if trial.parameters <= trial.dense_parameters:
                best, low = trial, planner.rank_limit
            else:
                high = planner.rank_limit
        if best is None:
            planner.rank_limit = 1.0
            best = _plan_units(planner, units, keep_fraction, mode)
    finally:
        planner.rank_limit = None
    logger.info(
        "RaNA size cap: the uncapped plan holds %.4f of the dense parameters; ranks at most %.3fx their layers' "
        "break-even rank hold %.4f",
        result.parameters / result.dense_parameters,
        best.rank_limit,
        best.parameters / best.dense_parameters,
    )
    return best


def _plan_units(planner: Planner, units: list[Unit], keep_fraction: float, mode: str) -> PlanResult:
    options = planner.allocate(units, keep_fraction, mode)
    plan, fills, estimated = {}, {}, {}
    for unit, option in zip(units, options, strict=True):
        planner.materialize(unit, option, plan, fills)
        for part_unit, part in KINDS[option.kind].parts(unit, option) or [(unit, option)]:
            estimated[part.kind] = estimated.get(part.kind, 0.0) + 0.5 * planner.unit_fisher(part_unit) * part.error
    total = sum(dense_macs(planner.modules, unit.names) for unit in units)
    expected = sum(option.macs for option in options) / total if total else 1.0
    dense_parameters = int(dense_macs(planner.modules, [name for unit in units for name in unit.names]))
    return PlanResult(
        plan,
        fills,
        expected if math.isfinite(expected) else 1.0,
        estimated,
        plan_parameters(plan),
        dense_parameters,
        planner.rank_limit,
    )


def restrict(units: list[Unit], kind: str) -> list[Unit]:
    """The units with only `kind` among their candidates, as a whole and per linear (units without it keep theirs)."""
    restricted = []
    for unit in units:
        if not unit.offers(kind):
            restricted.append(unit)
            continue
        split = (kind,) if kind in unit.split_kinds else ()
        kinds = ((kind,) if kind in unit.kinds else ()) + ((SPLIT,) if split else ())
        restricted.append(Unit(unit.names, unit.stream, kinds, unit.loss_names, split))
    return restricted

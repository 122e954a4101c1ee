"""Each linear of a unit on its own: the unit's budget split between its linears, each taking the best option of the
unit's `split_kinds` for its share.

A unit of several linears that read one input (q/k/v, gate/up) is planned as one so that kinds that share work across
them can be offered (one rotation or one rank router for all): `split` is the alternative where nothing is shared. Each
budget is split where it lowers the unit's loss-weighted error most (`allocation.allocate_global` on the linears'
curves, every kind's points on one curve), exactly as if each linear were a unit of its own: with global allocation
this keeps every choice the linears had alone, and adds the shared ones. Each linear's error is weighted by its loss
gradient over the unit's (`PlanContext.loss_weight`) and by its kind's measured loss scale (`PlanContext.kind_scale`),
so the unit's estimated loss is the sum of its linears'.
"""

from __future__ import annotations

from .. import allocation
from .base import DENSE, AdapterKind, Option, PlanContext, Unit, dense_macs

NAME = "split"


class SplitKind(AdapterKind):
    name = NAME

    def _linears(self, unit: Unit) -> list[Unit]:
        return [Unit([name], unit.stream, unit.split_kinds) for name in unit.names]

    def options(self, ctx: PlanContext, unit: Unit, budgets: list[float]) -> list[Option | None]:
        if not unit.split_kinds:
            raise ValueError(f"internal: unit {unit.names} offers '{NAME}' without split_kinds")
        unit_weight = ctx.loss_weight(unit.loss_names)
        curves, choices = [], []
        for single in self._linears(unit):
            options = [Option(DENSE, dense_macs(ctx.modules, single.names), 0.0)]
            for kind in unit.split_kinds:
                options += ctx.curve(Unit(single.names, single.stream, (kind,)), kind)
            weight = ctx.loss_weight(single.names) / unit_weight if unit_weight > 0 else 1.0
            curves.append([(o.macs, o.error * weight * ctx.kind_scale.get(o.kind, 1.0)) for o in options])
            choices.append(options)
        cheapest = sum(min(cost for cost, _ in curve) for curve in curves)
        whole = dense_macs(ctx.modules, unit.names)
        result = []
        for budget in budgets:
            if budget >= whole:
                result.append(Option(DENSE, whole, 0.0))
                continue
            if budget < cheapest:
                result.append(None)
                continue
            picks = allocation.allocate_global(curves, budget)
            macs = sum(curve[pick][0] for curve, pick in zip(curves, picks, strict=True))
            error = sum(curve[pick][1] for curve, pick in zip(curves, picks, strict=True))
            parts = [options[pick] for options, pick in zip(choices, picks, strict=True)]
            result.append(Option(NAME, macs, error, parts))
        return result

    def parts(self, unit: Unit, option: Option) -> list[tuple[Unit, Option]]:
        return [
            (Unit(single.names, single.stream, (part.kind,)), part)
            for single, part in zip(self._linears(unit), option.payload, strict=True)
        ]

    def within_cap(self, ctx: PlanContext, unit: Unit, option: Option) -> bool:
        return all(ctx.within_cap(single, part) for single, part in self.parts(unit, option))

    def cache_key(self, ctx: PlanContext, unit: Unit) -> tuple:
        return (unit.split_kinds, tuple(ctx.kind_scale.get(kind, 1.0) for kind in unit.split_kinds))


KIND = SplitKind()

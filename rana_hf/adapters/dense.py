"""Dense: a targeted linear left as it is, at its full cost (the `dense` plan entry).

Any kind may answer a budget with a dense option when its best plan is no cheaper than the original linear; CATS-style
MLP adapters leave the attention projections dense. Dense linears are not replaced; their FLOPs are still counted.
"""

from __future__ import annotations

from .base import DENSE, AdapterKind, EntryKind, Option, PlanContext, Unit, dense_macs, entry

NAME = DENSE


class DenseKind(AdapterKind):
    name = NAME
    fixed_cost = True

    def options(self, ctx: PlanContext, unit: Unit, budgets: list[float]) -> list[Option | None]:
        dense = dense_macs(ctx.modules, unit.names)
        return [Option(NAME, dense, 0.0) for _ in budgets]

    def materialize(self, ctx: PlanContext, unit: Unit, option: Option, plan: dict, fills: dict) -> None:
        for name in unit.names:
            plan[name] = entry(NAME, ctx.modules[name])


class DenseEntry(EntryKind):
    name = NAME
    injected = False
    counted_dense = True


KIND = DenseKind()
ENTRIES = (DenseEntry(),)

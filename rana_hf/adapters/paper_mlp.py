"""The paper's gated MLP: rank adapters on gate and up, a neuron adapter on down, one budget split between them.

The split is grid-searched as in the paper (each part 3/18 ... 9/18 of the MLP's kept budget), keeping the one with the
smallest MLP output error on calibration tokens (`allocation.search_mlp_split`); down's threshold is fitted on the
approximated gated product it sees at inference. Used by `method="rana"` with uniform allocation; it writes rank,
neuron and dense entries.
"""

from __future__ import annotations

from .. import allocation
from .base import DENSE, AdapterKind, Option, PlanContext, Unit, dense_macs, entry
from .neuron import WEIGHTED, write_neuron_entry
from .rank import write_rank_entries


class PaperMLPKind(AdapterKind):
    """A whole gated MLP `[gate, up, down]` planned by the paper's split search."""

    name = "mlp"
    needs_covariance = True

    def options(self, ctx: PlanContext, unit: Unit, budgets: list[float]) -> list[Option | None]:
        gate, up, _ = (ctx.modules[n] for n in unit.names)
        gate_weight, up_weight, down_weight = ctx.weights(unit.names)
        dense = dense_macs(ctx.modules, unit.names)
        sample = ctx.sample(unit)
        result = []
        for budget in budgets:
            if budget >= dense:
                result.append(Option(DENSE, dense, 0.0))
                continue
            mlp_plan = allocation.search_mlp_split(
                sample.to(gate_weight.device),
                gate_weight,
                up_weight,
                down_weight,
                ctx.activation(unit),
                ctx.basis(unit, [unit.names[0]]),
                ctx.basis(unit, [unit.names[1]]),
                budget,
                max_rank=ctx.max_rank(gate.in_features, gate.out_features),
            )
            result.append(Option(self.name, mlp_plan.macs_per_token, mlp_plan.relative_error, mlp_plan))
        return result

    def materialize(self, ctx: PlanContext, unit: Unit, option: Option, plan: dict, fills: dict) -> None:
        mlp_plan: allocation.MLPPlan = option.payload
        for name, rank_plan in zip(unit.names[:2], (mlp_plan.gate, mlp_plan.up), strict=True):
            if rank_plan.dense:
                plan[name] = entry(DENSE, ctx.modules[name])
            else:
                basis = ctx.basis(unit, [name])
                write_rank_entries([name], [ctx.modules[name]], basis, rank_plan, plan, fills)
        down_name = unit.names[2]
        down = ctx.modules[down_name]
        if mlp_plan.down_threshold <= 0:
            plan[down_name] = entry(DENSE, down)
        else:
            norms = ctx.weights([down_name])[0].norm(dim=0)  # ||W_down[:, j]||
            tau, fraction = mlp_plan.down_threshold, mlp_plan.down_keep_fraction
            write_neuron_entry(down_name, down, WEIGHTED, tau, fraction, norms, plan, fills)

    def within_cap(self, ctx: PlanContext, unit: Unit, option: Option) -> bool:
        gate = ctx.modules[unit.names[0]]
        limit = ctx.max_rank(gate.in_features, gate.out_features)
        mlp_plan: allocation.MLPPlan = option.payload
        return limit is None or max(mlp_plan.gate.rank, mlp_plan.up.rank) <= limit

    def stats(self, option: Option) -> dict:
        mlp_plan: allocation.MLPPlan = option.payload
        return {
            "adapter": option.kind,
            "expected_macs": option.macs,
            "split": list(mlp_plan.split),
            "relative_error": mlp_plan.relative_error,
        }


KIND = PaperMLPKind()

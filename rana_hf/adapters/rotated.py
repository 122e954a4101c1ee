"""The rotated identity basis: a magnitude mask on the input in its principal axes, the rotation computed at run time,
`y = (W Q_r) (keep * Q_r^T x) + bias` with `keep_i = |(Q_r^T x)_i| >= threshold` (LaRoSA's idea, in our terms).

`Q` holds the eigenvectors of the unit's input second moment `X X^T` (the statistic calibration streams for rank
adapters), by decreasing eigenvalue; `Q_r` its first `r` columns. A unit's linears read one input (q, k and v; gate and
up), so they share the rotation: it is a rank adapter whose router is `B = Q_r^T` [r, n] (an orthogonal projection,
not the paper's output-space basis) and whose up-projection is `A = W Q_r` [m, r], written as `rank` plan entries:
the rank adapter's layers, decode kernels and checkpoint formats serve it as they are. The rotation costs `n r` MACs
per token, once for the unit, counted in every budget; `r < n` also drops the input's weakest principal directions
outright, which the size cap (`RaNAConfig.size_cap`) asks for when `A` and `B` would outweigh the dense weights.

Errors follow the input adapters' diagonal model: dropping component `i` of a token costs `z_i^2 ||A[:, i]||^2`
(`z = Q^T x`; in the principal axes the components are uncorrelated on the calibration tokens, so the cross terms
this leaves out average near zero). For each budget the kind tries the ranks in `RANK_SHARES` (and the cap), each
with the kept fraction the rest of the budget buys, and offers the one with the least error.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .. import allocation
from ..decomposition import RankBasis
from .base import DENSE, AdapterKind, Option, PlanContext, Unit, dense_macs
from .rank import write_rank_entries

NAME = "rotated"
# candidate ranks, as shares of the input width
RANK_SHARES = (1.0, 0.75, 0.5, 0.25)


def principal_axes(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending [n], eigenvectors as columns [n, n]) of a symmetric second moment, in float64."""
    values, vectors = torch.linalg.eigh(covariance.double())
    return values.flip(0), vectors.flip(1)


class RotatedKind(AdapterKind):
    """Magnitude masks in the principal axes of the unit's input, the rotation shared by the unit's linears."""

    name = NAME
    needs_covariance = True

    def _ranks(self, in_features: int, limit: int | None) -> list[int]:
        ranks = {max(1, round(share * in_features)) for share in RANK_SHARES}
        if limit is not None:
            ranks = {r for r in ranks if r <= limit} | {min(limit, in_features)}
        return sorted(ranks, reverse=True)

    def _rotated(self, ctx: PlanContext, unit: Unit) -> tuple[torch.Tensor, torch.Tensor]:
        """(`Q` [n, n], `A = W Q` [m, n]) of the unit, float32 on the sample's device."""
        device = ctx.sample(unit).device
        axes = ctx.principal_axes(unit).to(device=device, dtype=torch.float32)
        weight = torch.cat(ctx.weights(unit.names), dim=0).to(device)  # [m, n]
        return axes, weight @ axes

    def options(self, ctx: PlanContext, unit: Unit, budgets: list[float]) -> list[Option | None]:
        in_features = ctx.modules[unit.names[0]].in_features
        out_features = sum(ctx.modules[n].out_features for n in unit.names)
        dense = dense_macs(ctx.modules, unit.names)
        axes, up = self._rotated(ctx, unit)
        codes = ctx.sample(unit) @ axes  # [N, n]: the sample in the principal axes
        energy = codes.pow(2) * up.pow(2).sum(dim=0)  # [N, n]: the error of dropping component i of a token
        tokens = codes.shape[0]
        total = float(energy.double().sum())
        fractions_by_rank = {}
        for rank in self._ranks(in_features, ctx.max_rank(in_features, out_features)):
            fractions = [(budget - in_features * rank) / (out_features * rank) for budget in budgets]
            wanted = sorted({min(f, 1.0) for f in fractions if f > 0})
            plans = allocation.mask_plans(codes[:, :rank].abs(), energy[:, :rank], wanted)
            fractions_by_rank[rank] = (fractions, dict(zip(wanted, plans, strict=True)))
        result = []
        for index, budget in enumerate(budgets):
            if budget >= dense:
                result.append(Option(DENSE, dense, 0.0))
                continue
            best = None
            for rank, (fractions, plans) in fractions_by_rank.items():
                fraction = fractions[index]
                if fraction <= 0:
                    continue
                plan = plans[min(fraction, 1.0)]
                if plan.keep_fraction <= 0:
                    continue
                error = max(total - plan.kept_energy, 0.0) / tokens
                macs = in_features * rank + out_features * rank * plan.keep_fraction
                if best is None or error < best.error:
                    best = Option(self.name, macs, error, (rank, plan, total))
            result.append(best)
        return result

    def within_cap(self, ctx: PlanContext, unit: Unit, option: Option) -> bool:
        in_features = ctx.modules[unit.names[0]].in_features
        limit = ctx.max_rank(in_features, sum(ctx.modules[n].out_features for n in unit.names))
        return limit is None or option.payload[0] <= limit

    def materialize(self, ctx: PlanContext, unit: Unit, option: Option, plan: dict, fills: dict) -> None:
        rank, mask_plan, total = option.payload
        axes, up = self._rotated(ctx, unit)
        basis = RankBasis(up=up[:, :rank].cpu(), down=axes[:, :rank].T.contiguous().cpu(), energy=torch.zeros(rank))
        rank_plan = allocation.RankPlan(
            rank=rank,
            threshold=mask_plan.threshold,
            mean_kept=mask_plan.keep_fraction * rank,
            macs_per_token=option.macs,
            kept_energy=mask_plan.kept_energy,
            total_energy=total,
        )
        write_rank_entries(unit.names, [ctx.modules[n] for n in unit.names], basis, rank_plan, plan, fills)

    def stats(self, option: Option) -> dict:
        return {**super().stats(option), "rank": option.payload[0]}


@contextlib.contextmanager
def forced():
    """Method `rotated` with the rotation as the only candidate of the units that can take one (q/k/v, gate/up; no
    end-to-end trials), for speed benchmarks and tests on random weights: their inputs have no principal axes worth a
    rotation's cost, so the allocator would choose the plain masks everywhere."""
    from . import METHODS

    previous = METHODS[NAME]
    METHODS[NAME] = dataclasses.replace(previous, linear=(NAME,), mlp_in=(NAME,), per_linear=(), trials=())
    try:
        yield
    finally:
        METHODS[NAME] = previous


KIND = RotatedKind()

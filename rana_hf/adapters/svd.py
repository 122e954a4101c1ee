"""Static SVD: the rank adapter's data-aware basis at a fixed rank, every component kept (no mask, no router cost
beyond `B x`). A comparison point; it writes ordinary rank entries (threshold 0)."""

from __future__ import annotations

from .. import allocation
from .rank import RankKind


class SVDKind(RankKind):
    """The largest rank `r` with `(n + m) * r` within the budget (`allocation.static_rank_plans`)."""

    name = "svd"

    def search(self, codes, in_features, out_features, budgets, max_rank) -> list[allocation.RankPlan]:
        return allocation.static_rank_plans(codes, in_features, out_features, budgets, max_rank=max_rank)


KIND = SVDKind()

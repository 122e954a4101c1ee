"""FLOP model and budget allocation: calibration statistics in, plans out. Pure functions, no models.

Units: costs are multiply-accumulates (MACs) per token; FLOPs are twice that. A dense `[m, n]` linear costs `m * n`.
A rank adapter with `rank` rows of `B` keeping `k(x)` components costs `n * rank + m * k(x)`; a neuron adapter keeping
`k(h)` input neurons of a `[m, n]` down projection costs `m * k(h)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .decomposition import RankBasis

# The paper's MLP split grid: each of gate, up and down gets 3/18 ... 9/18 of the MLP's kept budget.
MLP_SPLIT_UNITS = 18
MLP_SPLIT_RANGE = range(3, 10)


@dataclass
class RankPlan:
    """How one rank adapter spends its budget.

    Attributes:
        rank: rows of `B` kept (static truncation); 0 keeps nothing (the output is the bias).
        threshold: magnitude threshold; component `i` is kept when `|(B x)_i| >= threshold`.
        mean_kept: expected kept components per token on the calibration sample.
        macs_per_token: expected cost, `n * rank + m * mean_kept`.
        kept_energy: `sum (B x)_i^2` over kept components and sample tokens; the squared error is the total minus this.
        total_energy: `sum ||W x||^2` over the sample tokens.
        dense: the best plan is no cheaper than dense; keep the original linear.
    """

    rank: int
    threshold: float
    mean_kept: float
    macs_per_token: float
    kept_energy: float
    total_energy: float
    dense: bool = False

    @property
    def relative_error(self) -> float:
        if self.dense or self.total_energy <= 0:
            return 0.0
        return max(self.total_energy - self.kept_energy, 0.0) / self.total_energy

    def to_dict(self) -> dict:
        return asdict(self)


def dense_plan(out_features: int, in_features: int, total_energy: float = 0.0) -> RankPlan:
    return RankPlan(
        rank=0,
        threshold=0.0,
        mean_kept=0.0,
        macs_per_token=float(out_features * in_features),
        kept_energy=total_energy,
        total_energy=total_energy,
        dense=True,
    )


def candidate_ranks(max_rank: int, max_candidates: int = 64) -> list[int]:
    """Ranks tried by the search: multiples of 8 (kernel friendly), at most about `max_candidates` of them."""
    step = max(8, math.ceil(max_rank / max_candidates / 8) * 8)
    ranks = list(range(step, max_rank + 1, step))
    if not ranks or ranks[-1] != max_rank:
        ranks.append(max_rank)
    return ranks


def rank_plans(
    codes: torch.Tensor,
    in_features: int,
    out_features: int,
    budgets: Sequence[float],
    max_rank: int | None = None,
    max_candidates: int = 64,
) -> list[RankPlan]:
    """The paper's search over `(rank, threshold)` for each budget: keep the plan that keeps the most energy.

    For a candidate `rank` the budget fixes the mean number of kept components `(budget - n * rank) / m`; the threshold
    is the matching quantile of the pooled `(B x)_i^2`, `i < rank`, over the sample tokens. Because `A` is orthonormal,
    the squared output error is exactly the dropped energy.

    Args:
        codes: `B x` on sample tokens, [N, r], components ordered by decreasing calibration energy.
        in_features: `n`.
        out_features: `m` (of the whole group when q/k/v share one adapter).
        budgets: MACs per token allowed, one plan per budget.
        max_rank: largest rank tried (e.g. to keep `A` and `B` no larger than `W`); default all of `codes`.
        max_candidates: about how many candidate ranks to try (multiples of 8).

    Returns:
        One `RankPlan` per budget; a budget no smaller than dense (`m * n`) gives a dense plan.
    """
    num_tokens = codes.shape[0]
    if max_rank is not None:
        codes = codes[:, : max(1, min(max_rank, codes.shape[1]))]
    max_rank = codes.shape[1]
    squares = codes.detach().float().pow(2)
    total_energy = float(squares.sum(dtype=torch.float64))
    dense_macs = float(out_features * in_features)
    best = [None] * len(budgets)
    for index, budget in enumerate(budgets):
        if budget < 0:
            raise ValueError(f"budget must be >= 0 MACs per token, got {budget}")
        if budget >= dense_macs:
            best[index] = dense_plan(out_features, in_features, total_energy)
        else:
            # Nothing kept: the output is the bias. Any plan that keeps energy beats it.
            best[index] = RankPlan(0, math.inf, 0.0, 0.0, 0.0, total_energy)
    if all(plan.dense for plan in best):
        return best

    values, order = squares.flatten().sort(descending=True)  # [N * r]
    columns = order % max_rank
    values64 = values.double()
    # The static-SVD rank of each budget is a candidate too, so the search contains static SVD as a special case.
    static = {min(max_rank, int(b // (in_features + out_features))) for b in budgets if b < dense_macs}
    ranks = sorted(set(candidate_ranks(max_rank, max_candidates)) | {r for r in static if r > 0})
    for rank in ranks:
        eligible = columns < rank
        kept_count = eligible.cumsum(0)
        kept_energy = torch.where(eligible, values64, 0.0).cumsum(0)
        for index, budget in enumerate(budgets):
            if best[index].dense:
                continue
            mean_kept = (budget - in_features * rank) / out_features
            if mean_kept <= 0:
                continue
            if mean_kept >= rank:  # every component of the truncated basis fits in the budget
                num_kept, threshold, energy = num_tokens * rank, 0.0, float(kept_energy[-1])
            else:
                num_kept = int(mean_kept * num_tokens)
                if num_kept == 0:
                    continue
                position = int(torch.searchsorted(kept_count, num_kept))
                energy = float(kept_energy[position])
                threshold = math.sqrt(float(values[position]))
                if threshold == 0.0:
                    threshold = torch.finfo(torch.float32).tiny  # never keep exact zeros at a zero quantile
            if energy > best[index].kept_energy:
                kept = num_kept / num_tokens
                best[index] = RankPlan(
                    rank=rank,
                    threshold=threshold,
                    mean_kept=kept,
                    macs_per_token=in_features * rank + out_features * kept,
                    kept_energy=energy,
                    total_energy=total_energy,
                )
    return best


def apply_rank_plan(codes: torch.Tensor, basis_up: torch.Tensor, plan: RankPlan) -> torch.Tensor:
    """Output of a rank adapter on sample tokens: `A[:, :rank] (mask * codes[:, :rank])`, [N, m]."""
    truncated = codes[:, : plan.rank]
    masked = truncated * (truncated.abs() >= plan.threshold)
    return masked @ basis_up[:, : plan.rank].T


def neuron_threshold(importance: torch.Tensor, keep_fraction: float) -> float:
    """Importance threshold that keeps `keep_fraction` of the pooled (token, neuron) importances.

    Args:
        importance: `|h_j| * ||W[:, j]||` on sample tokens, [N, h].
        keep_fraction: fraction of neurons to keep on average, in [0, 1].

    Returns:
        `tau`; neuron `j` of a token is kept when its importance is `>= tau` (0 keeps everything).
    """
    if keep_fraction >= 1.0:
        return 0.0
    flat = importance.detach().float().flatten()
    num_kept = int(keep_fraction * flat.numel())
    if num_kept <= 0:
        return math.inf
    if flat.is_cuda:  # the same value; CUDA kthvalue over one long row is slow (38 ms a call on an H200, 5.6M values)
        tau = float(flat.sort(descending=True).values[num_kept - 1])
    else:
        tau = float(flat.kthvalue(flat.numel() - num_kept + 1).values)
    return tau if tau > 0 else torch.finfo(torch.float32).tiny


def sorted_threshold(descending: torch.Tensor, fraction: float) -> float:
    """`neuron_threshold` read from importances already sorted in descending order (`descending`, flat): for the many
    fractions of one curve, which then sort once. `fraction` < 1."""
    count = int(fraction * descending.numel())
    if count <= 0:
        return math.inf
    value = float(descending[min(count, descending.numel()) - 1])
    return value if value > 0 else torch.finfo(torch.float32).tiny


def per_neuron_thresholds(tau: float, column_norm: torch.Tensor) -> torch.Tensor:
    """Per-input-neuron magnitude thresholds from an importance threshold: keep `j` when `|h_j| >= tau / ||W[:, j]||`.

    Neurons whose weight column is zero are never kept (their threshold is inf). Returns float32 [n].
    """
    column_norm = column_norm.float()
    return torch.where(column_norm > 0, tau / column_norm.clamp_min(1e-30), torch.full_like(column_norm, float("inf")))


@dataclass
class MLPPlan:
    """Plan of a gated MLP: rank adapters on gate and up, a neuron adapter on down.

    Attributes:
        gate: plan of the gate projection.
        up: plan of the up projection.
        down_threshold: importance threshold `tau_down` of the neuron adapter (0 keeps all: dense).
        down_keep_fraction: expected fraction of down's input neurons kept.
        split: budget units (out of 18) of gate, up and down.
        relative_error: `||y - y_hat||^2 / ||y||^2` of the MLP output on the sample tokens.
        macs_per_token: expected cost of the three projections.
    """

    gate: RankPlan
    up: RankPlan
    down_threshold: float
    down_keep_fraction: float
    split: tuple[int, int, int]
    relative_error: float
    macs_per_token: float


def mlp_splits() -> list[tuple[int, int, int]]:
    """All (gate, up, down) splits of the paper's grid that use the whole budget."""
    return [
        (gate, up, MLP_SPLIT_UNITS - gate - up)
        for gate in MLP_SPLIT_RANGE
        for up in MLP_SPLIT_RANGE
        if MLP_SPLIT_UNITS - gate - up in MLP_SPLIT_RANGE
    ]


def search_mlp_split(
    inputs: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gate_basis: RankBasis,
    up_basis: RankBasis,
    budget: float,
    search_tokens: int = 512,
    max_rank: int | None = None,
) -> MLPPlan:
    """The paper's MLP split search: try every split of the grid, keep the one with the smallest MLP output error.

    The neuron threshold of down is fitted on the *approximated* gated product, the input down sees at inference, and
    down also gets the budget that gate and up leave unspent.

    Args:
        inputs: sample MLP inputs `x`, [N, d].
        gate_weight: [h, d]. up_weight: [h, d]. down_weight: [d, h].
        activation: the MLP's activation (e.g. SiLU, tanh-GELU).
        gate_basis, up_basis: data-aware bases of gate and up on the MLP input.
        budget: MACs per token for the three projections together.
        search_tokens: tokens of the sample used to compare splits; the chosen split's down threshold is then
            fitted on the whole sample.
        max_rank: largest rank of gate and up (e.g. to keep their `A` and `B` no larger than `W`).

    Returns:
        The best `MLPPlan`.
    """
    inputs = inputs.float()
    gate_weight, up_weight, down_weight = gate_weight.float(), up_weight.float(), down_weight.float()
    hidden, model_dim = gate_weight.shape
    dense_each = float(hidden * model_dim)
    column_norm = down_weight.norm(dim=0)  # [h]

    fractions = sorted({units for split in mlp_splits() for units in split[:2]})
    budgets = [budget * units / MLP_SPLIT_UNITS for units in fractions]
    gate_codes = inputs @ gate_basis.down.T
    up_codes = inputs @ up_basis.down.T
    gate_plans = rank_plans(gate_codes, model_dim, hidden, budgets, max_rank=max_rank)
    up_plans = rank_plans(up_codes, model_dim, hidden, budgets, max_rank=max_rank)
    gate_plans = dict(zip(fractions, gate_plans, strict=True))
    up_plans = dict(zip(fractions, up_plans, strict=True))

    def output(plan, codes, basis, weight, rows):
        return inputs[rows] @ weight.T if plan.dense else apply_rank_plan(codes[rows], basis.up, plan)

    def down_fit(gated, split):
        # Down takes its share of the grid plus whatever gate and up leave unspent (a plan capped at dense, or one
        # whose best point costs less than its share): the MLP's budget is one budget.
        unspent = sum(
            budget * units / MLP_SPLIT_UNITS - plans[units].macs_per_token
            for units, plans in ((split[0], gate_plans), (split[1], up_plans))
        )
        keep_fraction = min(1.0, (budget * split[2] / MLP_SPLIT_UNITS + max(unspent, 0.0)) / dense_each)
        importance = gated.abs() * column_norm
        tau = neuron_threshold(importance, keep_fraction)
        return tau, importance >= tau

    # Compare splits on a subset of the sample tokens (the search is the costly part of calibration).
    search = slice(0, None, max(1, inputs.shape[0] // search_tokens))
    reference = (activation(inputs[search] @ gate_weight.T) * (inputs[search] @ up_weight.T)) @ down_weight.T
    reference_energy = max(float(reference.pow(2).sum(dtype=torch.float64)), 1e-30)
    gate_out = {u: output(p, gate_codes, gate_basis, gate_weight, search) for u, p in gate_plans.items()}
    up_out = {u: output(p, up_codes, up_basis, up_weight, search) for u, p in up_plans.items()}
    best_split, best_error = None, math.inf
    for split in mlp_splits():
        gated = activation(gate_out[split[0]]) * up_out[split[1]]  # [N, h]
        _, kept = down_fit(gated, split)
        error = float(((gated * kept) @ down_weight.T - reference).pow(2).sum(dtype=torch.float64)) / reference_energy
        if error < best_error:
            best_split, best_error = split, error

    # Fit the chosen split's down threshold on the whole sample, on the gated product down will see.
    everything = slice(None)
    gate_plan, up_plan = gate_plans[best_split[0]], up_plans[best_split[1]]
    gated = activation(output(gate_plan, gate_codes, gate_basis, gate_weight, everything)) * output(
        up_plan, up_codes, up_basis, up_weight, everything
    )
    tau, kept = down_fit(gated, best_split)
    keep_fraction = float(kept.float().mean())
    return MLPPlan(
        gate=gate_plan,
        up=up_plan,
        down_threshold=tau,
        down_keep_fraction=keep_fraction,
        split=best_split,
        relative_error=best_error,
        macs_per_token=gate_plan.macs_per_token + up_plan.macs_per_token + keep_fraction * dense_each,
    )


def static_rank_plans(
    codes: torch.Tensor, in_features: int, out_features: int, budgets: Sequence[float], max_rank: int | None = None
) -> list[RankPlan]:
    """Static (SVD-style) plans: the largest rank `r` with `(n + m) * r <= budget`, every component kept (no mask).

    Args and returns as `rank_plans`; `threshold` is 0 and `mean_kept == rank`.
    """
    squares = codes.detach().float().pow(2).sum(0, dtype=torch.float64)  # [r]
    energy = torch.cat([squares.new_zeros(1), squares.cumsum(0)])  # energy[r]: kept energy at rank r
    total_energy = float(squares.sum())
    limit = codes.shape[1] if max_rank is None else min(max_rank, codes.shape[1])
    plans = []
    for budget in budgets:
        if budget >= out_features * in_features:
            plans.append(dense_plan(out_features, in_features, total_energy))
            continue
        rank = min(limit, int(budget // (in_features + out_features)))
        plans.append(
            RankPlan(
                rank=rank,
                threshold=0.0 if rank else math.inf,
                mean_kept=float(rank),
                macs_per_token=float((in_features + out_features) * rank),
                kept_energy=float(energy[rank]),
                total_energy=total_energy,
            )
        )
    return plans


@dataclass
class MaskPlan:
    """A magnitude mask over input neurons (identity basis), or over MLP hidden neurons (CATS-style).

    Attributes:
        threshold: score threshold; a neuron is kept when its score is `>= threshold` (0 keeps all, inf none).
        keep_fraction: fraction of (token, neuron) pairs kept on the sample.
        kept_energy: error energy kept, summed over sample tokens (`total_energy - kept_energy` is the error).
        total_energy: total error energy of dropping everything, summed over sample tokens.
    """

    threshold: float
    keep_fraction: float
    kept_energy: float
    total_energy: float


def mask_plans(score: torch.Tensor, energy: torch.Tensor, keep_fractions: Sequence[float]) -> list[MaskPlan]:
    """Thresholds on `score` that keep the given fractions of (token, neuron) pairs, and the energy they keep.

    The error of dropping neuron `j` of a token is modelled by `energy[t, j]` (e.g. `x_j^2 ||W[:, j]||^2` for an input
    mask: cross terms between dropped neurons are ignored), so the same code serves weighted (`score = sqrt(energy)`),
    magnitude (`score = |x|`, TEAL-style) and gate (`score = |act(gate x)|`, CATS-style) masks.

    Args:
        score: [N, h] per (token, neuron) score; higher is kept first.
        energy: [N, h] error energy of dropping each (token, neuron).
        keep_fractions: fractions in [0, 1] to plan for.

    Returns:
        One `MaskPlan` per fraction.
    """
    flat_score = score.detach().float().flatten()
    flat_energy = energy.detach().double().flatten()
    total_energy = float(flat_energy.sum())
    values, order = flat_score.sort(descending=True)
    kept_energy = flat_energy[order].cumsum(0)
    plans = []
    for fraction in keep_fractions:
        num_kept = int(min(max(fraction, 0.0), 1.0) * flat_score.numel())
        if fraction >= 1.0:
            plans.append(MaskPlan(0.0, 1.0, total_energy, total_energy))
        elif num_kept <= 0:
            plans.append(MaskPlan(math.inf, 0.0, 0.0, total_energy))
        else:
            threshold = float(values[num_kept - 1])
            threshold = threshold if threshold > 0 else torch.finfo(torch.float32).tiny
            plans.append(
                MaskPlan(threshold, num_kept / flat_score.numel(), float(kept_energy[num_kept - 1]), total_energy)
            )
    return plans


def lower_convex_hull(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points `(cost, loss)` on the lower convex hull, by increasing cost and decreasing loss.

    Points that cost more without losing less are dropped, then the points below the chord of their neighbours.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    pareto = []
    for index in order:
        if not pareto or points[index][1] < points[pareto[-1]][1]:
            if pareto and points[index][0] == points[pareto[-1]][0]:
                pareto.pop()
            pareto.append(index)
    hull: list[int] = []
    for index in pareto:
        while len(hull) >= 2:
            (c0, l0), (c1, l1), (c2, l2) = points[hull[-2]], points[hull[-1]], points[index]
            # drop the middle point when it lies on or above the chord from hull[-2] to index
            if (l1 - l0) * (c2 - c0) >= (l2 - l0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(index)
    return hull


def allocate_global(curves: Sequence[Sequence[tuple[float, float]]], budget: float) -> list[int]:
    """Spend one budget over many units: minimise the summed loss with the summed cost within `budget`.

    Greedy on the lower convex hull of each unit's `(cost, loss)` curve: every unit starts at its cheapest hull point,
    then the upgrades (hull segments) are bought in order of loss reduction per unit of cost while they fit. This is
    the Lagrangian solution on the hulls (exact up to the last, partially affordable segment).

    Args:
        curves: per unit, its options as `(cost, loss)`.
        budget: total cost allowed.

    Returns:
        The chosen option index of each unit.

    Raises:
        ValueError: when even the cheapest option of every unit exceeds the budget.
    """
    hulls = [lower_convex_hull(curve) for curve in curves]
    if any(not hull for hull in hulls):
        raise ValueError("every unit needs at least one option")
    chosen = [hull[0] for hull in hulls]
    spent = sum(curve[index][0] for curve, index in zip(curves, chosen, strict=True))
    if spent > budget * (1 + 1e-9):
        raise ValueError(f"the cheapest options cost {spent:.4g}, more than the budget {budget:.4g}")
    segments = []
    for unit, (curve, hull) in enumerate(zip(curves, hulls, strict=True)):
        for step, (a, b) in enumerate(zip(hull[:-1], hull[1:], strict=True)):
            cost, gain = curve[b][0] - curve[a][0], curve[a][1] - curve[b][1]
            segments.append((gain / cost if cost > 0 else math.inf, unit, step, b, cost))
    segments.sort(key=lambda s: -s[0])
    next_step = [0] * len(curves)
    blocked = [False] * len(curves)
    for _, unit, step, target, cost in segments:
        if blocked[unit] or step != next_step[unit]:
            continue
        if spent + cost > budget * (1 + 1e-9):
            blocked[unit] = True  # its later segments are worth less per cost; other units may still fit
            continue
        spent += cost
        chosen[unit] = target
        next_step[unit] += 1
    return chosen

"""Sparse plus low-rank compensation: a TEAL-style input mask and a small data-aware low-rank term for what it drops,
`y = W (keep * x) + U V ((1 - keep) * x) + bias` with `keep_j = |x_j| >= threshold` (R-Sparse's idea, in our terms).

For the dropped parts `D` of the calibration tokens (one row a token), the rank-`r` map `M` that minimises
`E ||W d - M d||^2` is `M = P P^T W`, `P` the top `r` right singular vectors of `D W^T` (output space): the error left
is the energy of `D W^T` beyond its `r` largest singular values. The layer stores `U = P` [m, r] and `V = P^T W`
[r, n] beside the original weight. The term costs `r (n + m)` MACs per token (`V` counted as a dense read), paid for
by keeping fewer inputs at the same budget.

For each budget the kind tries ranks 0, 8, 16, 32 and 64 (at most a quarter of the layer's smaller side), each with
the kept fraction the rest of the budget buys, and offers the one with the least error: the allocator, choosing the
budget, chooses the rank. A linear that ends at rank 0 is written as a plain magnitude input adapter (a `neuron` entry
with `importance: "magnitude"`, the `teal` layer), which decodes with the input-masked kernel; one with a rank decodes
its masked product with the same kernel (stacked with its siblings' products, as `teal`'s are) and adds its term
(`inference.prepare_for_decode`).
"""

from __future__ import annotations

import bisect
import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from .. import allocation, decomposition
from ..layers import RaNALayer, active_counter, keep_mask, tally
from ..offload import execution_device
from .base import DENSE, KEEP_GRID, AdapterKind, EntryKind, Option, PlanContext, Unit, entry
from .neuron import MAGNITUDE, write_neuron_entry

NAME = "compensated"
RANKS = (8, 16, 32, 64)  # candidate ranks of the compensation (with 0: none)
# a curve's budgets screen the ranks on KEEP_GRID, then measure this many candidates exactly (all when few)
EXACT_CANDIDATES = 2
_OVERSAMPLE, _POWER_ITERATIONS = 8, 2


class RaNACompensatedLinear(nn.Module, RaNALayer):
    """`y = W (keep * x) + A (B ((1 - keep) * x)) + bias`, `keep_j = |x_j| >= rana_hf_threshold[j]` (per input)."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, rank: int) -> None:
        super().__init__()
        RaNALayer.__init__(self, base_layer)
        device = execution_device(base_layer)
        factory = {"device": device, "dtype": base_layer.weight.dtype}
        # NaN until calibration or loading fills them (`check_filled`)
        self.rana_hf_threshold[adapter_name] = torch.full((self.in_features,), float("nan"), device=device)
        self.rana_hf_A[adapter_name] = nn.Parameter(torch.full((self.out_features, rank), float("nan"), **factory))
        self.rana_hf_B[adapter_name] = nn.Parameter(torch.full((rank, self.in_features), float("nan"), **factory))
        self.set_adapter(adapter_name)

    @property
    def rank(self) -> int:
        return next(iter(self.rana_hf_A.values())).shape[1]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x: [..., n] -> [..., m]
        if self._decode is not None and self._decode.runs(self, x):  # a prepared layer: decode step or prefill
            return self._decode.forward(self, x)
        adapter_name = self._active()
        if adapter_name is None:
            return self.dense_forward(x, *args, **kwargs)
        self.check_filled(adapter_name)
        with torch.no_grad():
            keep = keep_mask(x.abs(), self.rana_hf_threshold[adapter_name], self.top_k)
        kept = x * keep
        up, down = self.rana_hf_A[adapter_name], self.rana_hf_B[adapter_name]
        correction = F.linear(F.linear((x - kept).to(down.dtype), down), up)
        result = self.base_layer(kept) + correction.to(x.dtype)
        counter = active_counter()
        if counter is not None:
            tokens, kept_count = tally(counter, keep)
            dense = tokens * self.in_features * self.out_features
            rank = down.shape[0]
            counter.add(
                self.module_name,
                tokens,
                dense,
                kept_count * self.out_features + tokens * rank * (self.in_features + self.out_features),
            )
        return result

    def refit_threshold(self, sample: torch.Tensor, entry: dict, adapter_name: str) -> float:
        tau = allocation.neuron_threshold(sample.abs(), entry["keep_fraction"])
        container = self.rana_hf_threshold[adapter_name]
        container.fill_(tau)
        return tau

    def __repr__(self) -> str:
        return f"rana.{super().__repr__()}"

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class CompensatedEntry(EntryKind):
    """`{"kind": "compensated", "keep_fraction", "rank"}`: a magnitude mask plus a rank-`rank` compensation."""

    name = NAME

    def check(self, name: str, entry: dict, plan: dict) -> None:
        if not isinstance(entry.get("rank"), int) or isinstance(entry["rank"], bool) or entry["rank"] < 1:
            raise ValueError(f"plan entry {name!r} needs a rank >= 1 (a plain mask is a 'neuron' entry)")
        fraction = entry.get("keep_fraction")
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"plan entry {name!r} needs a keep_fraction in (0, 1], got {fraction!r}")

    def build(self, plan: dict, name: str, target: nn.Linear, parent: nn.Module, adapter_name: str) -> RaNALayer:
        return RaNACompensatedLinear(target, adapter_name, plan[name]["rank"])

    def top_k(self, entry: dict) -> int | None:
        return max(1, round(entry["keep_fraction"] * entry["in_features"]))

    def parameters(self, entry: dict) -> int:
        """The weight, kept as it is, plus `A` and `B`."""
        n, m = entry["in_features"], entry["out_features"]
        return n * m + entry["rank"] * (n + m)


def _top_energies(product: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared singular values, right singular vectors [m, rank]) of the `rank` largest of `product` [N, m], by a
    seeded randomized range finder with power iterations (deterministic; accurate for the leading values)."""
    columns = min(rank + _OVERSAMPLE, *product.shape)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(product.shape[1], columns, generator=generator).to(product)
    basis = torch.linalg.qr(product @ probe).Q  # [N, q]
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(product @ torch.linalg.qr(product.T @ basis).Q).Q
    _, values, right = torch.linalg.svd(basis.T @ product, full_matrices=False)  # [q, m]
    return values[:rank].pow(2), right[:rank].T


class CompensatedKind(AdapterKind):
    """Magnitude masks with a low-rank compensation of the dropped inputs, its rank chosen per budget."""

    name = NAME

    offered: tuple[int, ...] | None = None  # `offered_ranks`: these ranks only

    def _ranks(self, module: nn.Linear) -> list[int]:
        if self.offered is not None:
            return list(self.offered)
        return [0] + [r for r in RANKS if r <= min(module.in_features, module.out_features) // 4]

    def options(self, ctx: PlanContext, unit: Unit, budgets: list[float]) -> list[Option | None]:
        (name,) = unit.names  # planned one linear at a time
        module = ctx.modules[name]
        m, n = module.out_features, module.in_features
        dense = float(m * n)
        sample = ctx.sample(unit)
        (weight,) = ctx.weights(unit.names)
        weight = weight.to(sample.device)
        magnitudes = sample.abs()
        order = magnitudes.flatten().sort(descending=True).values
        ranks = self._ranks(module)
        top_rank = max(ranks)
        measured: dict[float, list[float]] = {}

        def errors(fraction: float) -> list[float]:
            """Squared output error per token at each rank, keeping `fraction` of the inputs (memoised)."""
            if fraction >= 1.0:
                return [0.0] * len(ranks)
            if fraction not in measured:
                dropped = magnitudes < allocation.sorted_threshold(order, fraction)
                product = (sample * dropped) @ weight.T  # [N, m]: W d per token
                total = float(product.pow(2).sum())
                energies = _top_energies(product, top_rank)[0] if top_rank else torch.zeros(0)
                captured = [0.0, *torch.cumsum(energies.double(), 0).tolist()]
                measured[fraction] = [max(total - captured[r], 0.0) / sample.shape[0] for r in ranks]
            return measured[fraction]

        def screened(fraction: float, position: int) -> float:
            """The error at `fraction`, linear between the neighbouring fractions of `KEEP_GRID`."""
            grid = [*KEEP_GRID, 1.0]
            above = bisect.bisect_left(grid, fraction)
            if above == 0 or grid[above] == fraction:
                return errors(grid[above])[position]
            low, high = grid[above - 1], grid[above]
            share = (fraction - low) / (high - low)
            return (1 - share) * errors(low)[position] + share * errors(high)[position]

        exact_all = len(budgets) * len(ranks) <= 2 * EXACT_CANDIDATES
        result = []
        for budget in budgets:
            if budget >= dense:
                result.append(Option(DENSE, dense, 0.0))
                continue
            candidates = []  # (fraction, rank position) that this budget affords
            for position, rank in enumerate(ranks):
                fraction = (budget - rank * (n + m)) / dense
                if fraction >= KEEP_GRID[0]:
                    candidates.append((fraction, position))
            if not exact_all:  # a curve: screen on the grid, then measure the most promising exactly
                candidates = sorted(candidates, key=lambda c: screened(*c))[:EXACT_CANDIDATES]
            best = None
            for fraction, position in candidates:
                error = errors(fraction)[position]
                if best is None or error < best.error:
                    best = Option(self.name, budget, error, (fraction, ranks[position]))
            result.append(best)
        return result

    def stats(self, option: Option) -> dict:
        return {**super().stats(option), "rank": option.payload[1]}

    def materialize(self, ctx: PlanContext, unit: Unit, option: Option, plan: dict, fills: dict) -> None:
        fraction, rank = option.payload
        (name,) = unit.names
        module = ctx.modules[name]
        sample = ctx.sample(unit)
        magnitudes = sample.abs()
        threshold = allocation.neuron_threshold(magnitudes, fraction)  # = `options`' sorted_threshold at this fraction
        (weight,) = ctx.weights(unit.names)
        if rank == 0:  # no compensation: the plain magnitude adapter (and its decode kernel)
            norms = decomposition.column_norms(weight)
            write_neuron_entry(name, module, MAGNITUDE, threshold, fraction, norms, plan, fills)
            return
        weight = weight.to(sample.device)
        product = (sample * (magnitudes < threshold)) @ weight.T
        _, directions = _top_energies(product, rank)  # [m, r]
        plan[name] = entry(NAME, module, keep_fraction=fraction, rank=rank)
        fills[name] = {
            "rana_hf_threshold": torch.full((module.in_features,), threshold, dtype=torch.float32),
            "rana_hf_A": directions.cpu(),
            "rana_hf_B": (directions.T @ weight).cpu(),
        }


@contextlib.contextmanager
def offered_ranks(ranks: tuple[int, ...]):
    """Offer every linear planned in the block only `ranks` (0: no term), whatever the calibration data would choose:
    for speed benchmarks on random weights, which leave nothing for a term to capture (their plans all end at rank 0,
    the plain mask), where the cost of a given rank is the question."""
    if not ranks or any(not isinstance(r, int) or r < 0 for r in ranks):
        raise ValueError(f"offered_ranks needs ranks >= 0, got {ranks!r}")
    previous = KIND.offered
    KIND.offered = tuple(ranks)
    try:
        yield
    finally:
        KIND.offered = previous


KIND = CompensatedKind()
ENTRIES = (CompensatedEntry(),)

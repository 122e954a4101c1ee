"""The rank adapter (the paper's): `y = A[:, :r] (mask * B[:r] x) + bias`, with `mask_i = |(B x)_i| >= threshold`.

`B` is the data-aware basis of the layer's output on calibration inputs (`decomposition.data_aware_basis`),
truncated to `rank` rows; the `(rank, threshold)` search (`allocation.rank_plans`) keeps the most output energy at
each budget, the router cost `n * rank` counted. Linears that read one input (q, k and v) can share one router: the
*owner* holds `B` and the threshold and computes the masked codes once; *members* hold only their rows of `A` and
reuse the owner's codes for the same input tensor.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from .. import allocation
from ..layers import RaNALayer, active_counter, keep_mask, tally
from ..offload import execution_device, module_weight
from .base import DENSE, AdapterKind, EntryKind, Option, PlanContext, Unit, dense_macs, entry

NAME = "rank"

# Roles of a rank adapter.
OWN = "own"  # computes its own codes from its own B
OWNER = "owner"  # computes the codes of a shared router and caches them for its members
MEMBER = "member"  # reuses the owner's codes


class RaNALinear(nn.Module, RaNALayer):
    """Rank adapter `y = A[:, :r] (mask * B[:r] x) + bias`, optionally sharing its router with sibling linears."""

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str,
        rank: int,
        role: str = OWN,
    ) -> None:
        super().__init__()
        RaNALayer.__init__(self, base_layer)
        if role not in (OWN, OWNER, MEMBER):
            raise ValueError(f"role must be one of {(OWN, OWNER, MEMBER)}, got {role!r}")
        self.role = role
        self._owner: list[RaNALinear] = []  # plain list: the owner must not be registered twice in the state dict
        self.num_members = 0  # owner only: members that will read each cached code tensor
        self._cache: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._cache_reads_left = 0
        weight = base_layer.weight
        device = execution_device(base_layer)  # not meta when accelerate offloaded the base layer
        factory = {"device": device, "dtype": weight.dtype}
        # NaN until calibration or loading fills them: a checkpoint missing a tensor fails at the first forward
        # (check_filled) instead of computing with zeros
        self.rana_hf_A[adapter_name] = nn.Parameter(torch.full((self.out_features, rank), float("nan"), **factory))
        if role != MEMBER:
            self.rana_hf_B[adapter_name] = nn.Parameter(torch.full((rank, self.in_features), float("nan"), **factory))
            self.rana_hf_threshold[adapter_name] = torch.full((), float("nan"), device=device)
        self.set_adapter(adapter_name)

    replaces_weight = True

    @property
    def rank(self) -> int:
        return next(iter(self.rana_hf_A.values())).shape[1]

    def attach_owner(self, owner: RaNALinear) -> None:
        if self.role != MEMBER or owner.role != OWNER:
            raise ValueError("only a member can be attached, and only to an owner")
        self._owner[:] = [owner]
        owner.num_members += 1

    def _router(self) -> RaNALinear:
        if self.role != MEMBER:
            return self
        if not self._owner:
            raise RuntimeError(f"RaNA member {self.module_name!r} is not attached to its router owner")
        return self._owner[0]

    def masked_codes(self, x: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mask * B x, mask)` for `x` [..., n] -> [..., r]; the owner caches them for its members (same input)."""
        router = self._router()
        cache = router._cache
        compiling = torch.compiler.is_compiling()  # tensor identity and versions cannot be traced: no sharing then
        if not compiling and self.role == MEMBER and cache is not None and cache[0] is x and cache[1] == x._version:
            router._cache_reads_left -= 1
            if router._cache_reads_left <= 0:  # last reader: do not keep the activation (and its graph) alive
                router._cache = None
            return cache[2], cache[3]
        router.check_filled(adapter_name)
        down = router.rana_hf_B[adapter_name]
        codes = F.linear(x.to(down.dtype), down)  # [..., r]
        with torch.no_grad():
            keep = keep_mask(codes.abs(), router.rana_hf_threshold[adapter_name], router.top_k)
        codes = codes * keep
        counter = active_counter()
        if counter is not None:  # the router's cost, paid once per token whichever module computes it
            tokens, _ = tally(counter, keep)
            counter.add(router.module_name, 0, 0, tokens * self.in_features * down.shape[0])
        if not compiling and router.role == OWNER and self.role == OWNER and router.num_members:
            router._cache = (x, x._version, codes, keep)
            router._cache_reads_left = router.num_members
        return codes, keep

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x: [..., n] -> [..., m]
        state = self._decode
        if state is not None and state.runs(self, x):  # a prepared layer (`inference.prepare_for_decode`)
            return state.forward(self, x)
        adapter_name = self._active()
        if adapter_name is None:
            return self.dense_forward(x, *args, **kwargs)
        codes, keep = self.masked_codes(x, adapter_name)
        if self.role == MEMBER:
            self.check_filled(adapter_name)  # its A (the owner checked the router)
        up = self.rana_hf_A[adapter_name]
        bias = module_weight(self.base_layer, "bias")
        result = F.linear(codes, up, bias.to(device=up.device, dtype=up.dtype) if bias is not None else None)
        counter = active_counter()
        if counter is not None:
            tokens, kept = tally(counter, keep)
            dense = tokens * self.in_features * self.out_features
            counter.add(self.module_name, tokens, dense, kept * self.out_features)
        return result.to(x.dtype)

    @property
    def fits_threshold(self) -> bool:
        return self.role != MEMBER

    def refit_threshold(self, sample: torch.Tensor, entry: dict, adapter_name: str) -> float:
        down = self.rana_hf_B[adapter_name]
        codes = sample.to(down.device) @ down.float().T  # [S, r]
        tau = allocation.neuron_threshold(codes.abs(), entry["mean_kept"] / max(down.shape[0], 1))
        container = self.rana_hf_threshold[adapter_name]
        container.copy_(torch.tensor(tau).to(device=container.device, dtype=container.dtype))
        return tau

    def __repr__(self) -> str:
        return f"rana.{super().__repr__()}"

    def extra_repr(self) -> str:
        return f"role={self.role}, rank={self.rank}"


class RankEntry(EntryKind):
    """`{"kind": "rank", "role", "rank", "mean_kept" (not for members), "owner" (members)}`."""

    name = NAME

    def check(self, name: str, entry: dict, plan: dict) -> None:
        if entry.get("role") not in (OWN, OWNER, MEMBER):
            raise ValueError(f"plan entry {name!r} has unknown role {entry.get('role')!r}")
        if not isinstance(entry.get("rank"), int) or entry["rank"] < 0:
            raise ValueError(f"plan entry {name!r} needs a rank >= 0")
        if entry["role"] == MEMBER and plan.get(entry.get("owner"), {}).get("role") != OWNER:
            raise ValueError(f"plan entry {name!r} names owner {entry.get('owner')!r}, which is not an owner")

    def build(self, plan: dict, name: str, target: nn.Linear, parent: nn.Module, adapter_name: str) -> RaNALinear:
        entry = plan[name]
        return RaNALinear(target, adapter_name, rank=entry["rank"], role=entry["role"])

    def top_k(self, entry: dict) -> int | None:
        return None if entry["role"] == MEMBER else max(1, round(entry["mean_kept"]))

    def link(self, name: str, entry: dict, layers: dict[str, RaNALayer]) -> None:
        if entry["role"] == MEMBER:
            layers[name].attach_owner(layers[entry["owner"]])

    def rank_ratio(self, name: str, entry: dict, plan: dict) -> float:
        if entry["role"] == MEMBER:
            return 0.0  # its owner's counts the group
        n = entry["in_features"]
        m = sum(e["out_features"] for key, e in plan.items() if key == name or e.get("owner") == name)
        return entry["rank"] * (n + m) / (n * m)

    def parameters(self, entry: dict) -> int:
        """`A` (its rows of the group's) and, unless a member (which shares its owner's), the router `B`; the dense
        weight is freed when prepared for decoding."""
        rows = entry["out_features"] + (0 if entry["role"] == MEMBER else entry["in_features"])
        return entry["rank"] * rows


def write_rank_entries(
    names: list[str], modules: list[nn.Linear], basis, rank_plan: allocation.RankPlan, plan: dict, fills: dict
) -> None:
    """Plan entries and tensors of rank adapters on `names` sharing one router (one name: a router of its own).

    `basis` is the data-aware basis of the stacked weights of `names`; each linear takes its rows of `A`."""
    rank, offset = rank_plan.rank, 0
    for index, (name, module) in enumerate(zip(names, modules, strict=True)):
        rows = slice(offset, offset + module.out_features)
        offset += module.out_features
        role = OWN if len(names) == 1 else (OWNER if index == 0 else MEMBER)
        written = entry(NAME, module, role=role, rank=rank)
        tensors = {"rana_hf_A": basis.up[rows, :rank]}
        if role == MEMBER:
            written["owner"] = names[0]
        else:
            written["mean_kept"] = rank_plan.mean_kept
            tensors["rana_hf_B"] = basis.down[:rank]
            tensors["rana_hf_threshold"] = torch.tensor(rank_plan.threshold, dtype=torch.float32)
        plan[name], fills[name] = written, tensors


class RankKind(AdapterKind):
    """The data-aware basis with a per-token magnitude mask; q/k/v in one unit share one router."""

    name = NAME
    needs_covariance = True

    def search(self, codes, in_features, out_features, budgets, max_rank) -> list[allocation.RankPlan]:
        """The `(rank, threshold)` plan of each budget from the codes `B x` of the sample tokens."""
        search = allocation.rank_plans
        if len(budgets) > 1:  # a curve: 32 candidate ranks are plenty and twice as fast
            search = functools.partial(allocation.rank_plans, max_candidates=32)
        return search(codes, in_features, out_features, budgets, max_rank=max_rank)

    def options(self, ctx: PlanContext, unit: Unit, budgets: list[float]) -> list[Option | None]:
        out_features = sum(ctx.modules[n].out_features for n in unit.names)
        in_features = ctx.modules[unit.names[0]].in_features
        dense = dense_macs(ctx.modules, unit.names)
        basis = ctx.basis(unit)
        sample = ctx.sample(unit)
        codes = sample.to(basis.down.device) @ basis.down.T  # [N, r]
        plans = self.search(codes, in_features, out_features, budgets, ctx.max_rank(in_features, out_features))
        result = []
        for plan in plans:
            if plan.dense:
                result.append(Option(DENSE, dense, 0.0))
            elif plan.rank == 0 or plan.mean_kept <= 0:
                result.append(None)
            else:
                error = max(plan.total_energy - plan.kept_energy, 0.0) / codes.shape[0]
                result.append(Option(self.name, plan.macs_per_token, error, plan))
        return result

    def within_cap(self, ctx: PlanContext, unit: Unit, option: Option) -> bool:
        out_features = sum(ctx.modules[n].out_features for n in unit.names)
        limit = ctx.max_rank(ctx.modules[unit.names[0]].in_features, out_features)
        return limit is None or option.payload.rank <= limit

    def materialize(self, ctx: PlanContext, unit: Unit, option: Option, plan: dict, fills: dict) -> None:
        modules = [ctx.modules[n] for n in unit.names]
        write_rank_entries(unit.names, modules, ctx.basis(unit), option.payload, plan, fills)


KIND = RankKind()
ENTRIES = (RankEntry(),)

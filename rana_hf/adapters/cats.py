"""CATS-style gated MLPs: hidden neuron `j` of `down(act(gate x) * up x)` is dropped where `|act(gate x)_j|` is small.

The gate projection becomes a `RaNAGatedLinear` (`"gated"` entry) that zeroes the dropped gate outputs; up and down
stay plain linears (`"follower"` entries): a kernel skips the dropped rows of up and columns of down, and the reference
path counts that kept work for them. Attention stays dense, so the whole budget is spent in the MLPs, whose gate
projections are always computed: a unit costs at least a third of its dense FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import allocation
from ..layers import RaNALayer, active_counter, keep_mask, tally
from ..offload import execution_device, module_weight
from .base import DENSE, AdapterKind, EntryKind, Option, PlanContext, Unit, dense_macs, entry

NAME = "cats"
GATED, FOLLOWER = "gated", "follower"  # plan entry kinds


class RaNAGatedLinear(nn.Module, RaNALayer):
    """CATS-style gate projection: `g = W x + bias`, with `g_j` zeroed where `|act(g_j)| < threshold`.

    The MLP computes `down(act(g) * up(x))`; as `act(0) = 0`, a zeroed `g_j` drops hidden neuron `j`, so a kernel can
    skip row `j` of up and column `j` of down. The reference path computes them and counts the kept work for the
    *followers* (up and down), which stay plain linears.
    """

    adapter_layer_names = ()

    def __init__(self, base_layer: nn.Linear, adapter_name: str, activation, followers: list[tuple[str, int, int]]):
        super().__init__()
        RaNALayer.__init__(self, base_layer)
        if not callable(activation) or float(activation(torch.zeros(1, device="cpu")).abs()) != 0.0:
            raise ValueError("a CATS-style gate needs an MLP activation with act(0) == 0 (SiLU, GELU, ReLU)")
        self._activation = [activation]  # plain list: the parent owns the activation module
        self.followers = followers  # (module name, dense MACs per token, MACs per kept hidden neuron)
        self.rana_hf_threshold[adapter_name] = torch.full((), float("nan"), device=execution_device(base_layer))
        self.set_adapter(adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x: [..., d] -> [..., h]
        result = self.base_layer(x, *args, **kwargs)
        adapter_name = self._active()
        if adapter_name is None:
            return result
        self.check_filled(adapter_name)
        with torch.no_grad():
            score = self._activation[0](result).abs()
            keep = keep_mask(score, self.rana_hf_threshold[adapter_name], self.top_k)
        counter = active_counter()
        if counter is not None:
            tokens, kept = tally(counter, keep)
            dense = tokens * self.in_features * self.out_features
            counter.add(self.module_name, tokens, dense, dense)
            for name, dense_per_token, per_kept in self.followers:
                counter.add(name, tokens, tokens * dense_per_token, kept * per_kept)
        return result * keep

    def refit_threshold(self, sample: torch.Tensor, entry: dict, adapter_name: str) -> float:
        weight = module_weight(self.base_layer)
        gate = self._activation[0](sample.to(weight.device, weight.dtype) @ weight.T).float()
        tau = allocation.neuron_threshold(gate.abs(), entry["keep_fraction"])
        container = self.rana_hf_threshold[adapter_name]
        container.copy_(torch.tensor(tau).to(device=container.device, dtype=container.dtype))
        return tau

    def __repr__(self) -> str:
        return f"rana.{super().__repr__()}"


class GatedEntry(EntryKind):
    """`{"kind": "gated", "keep_fraction", "followers": [up, down]}`."""

    name = GATED

    def check(self, name: str, entry: dict, plan: dict) -> None:
        followers = entry.get("followers")
        if not isinstance(followers, list) or any(plan.get(f, {}).get("kind") != FOLLOWER for f in followers):
            raise ValueError(f"plan entry {name!r} (gated) needs followers that are follower entries")

    def build(self, plan: dict, name: str, target: nn.Linear, parent: nn.Module, adapter_name: str) -> RaNALayer:
        followers = []
        for follower in plan[name]["followers"]:
            spec = plan[follower]
            dense = spec["in_features"] * spec["out_features"]
            per_kept = spec["in_features"] if spec.get("axis", "out") == "out" else spec["out_features"]
            followers.append((follower, dense, per_kept))
        return RaNAGatedLinear(target, adapter_name, getattr(parent, "act_fn", None), followers)

    def top_k(self, entry: dict) -> int | None:
        return max(1, round(entry["keep_fraction"] * entry["out_features"]))


class FollowerEntry(EntryKind):
    """`{"kind": "follower", "leader": gate, "axis": "out" | "in"}`: up (rows) or down (columns) of a gated MLP."""

    name = FOLLOWER
    injected = False

    def check(self, name: str, entry: dict, plan: dict) -> None:
        if plan.get(entry.get("leader"), {}).get("kind") != GATED:
            raise ValueError(f"plan entry {name!r} names leader {entry.get('leader')!r}, which is not a gated entry")


class CatsKind(AdapterKind):
    """A whole gated MLP `[gate, up, down]`: cost `h * d * (1 + 2 * keep)`, error `sum_j h_j^2 ||W_down[:, j]||^2`
    over the dropped hidden neurons."""

    name = NAME
    min_keep = 1 / 3
    floor_reason = "the gate projections stay dense"

    def options(self, ctx: PlanContext, unit: Unit, budgets: list[float]) -> list[Option | None]:
        dense = dense_macs(ctx.modules, unit.names)
        gate, up, down = ctx.weights(unit.names)
        sample = ctx.sample(unit)
        gated = ctx.activation(unit)(sample @ gate.T)  # [N, h]
        product = gated * (sample @ up.T)
        energy = product.pow(2) * down.norm(dim=0).pow(2)
        hidden, model_dim = gate.shape
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
                error = (plan.total_energy - plan.kept_energy) / sample.shape[0]
                result.append(Option(NAME, macs, error, plan))
        return result

    def materialize(self, ctx: PlanContext, unit: Unit, option: Option, plan: dict, fills: dict) -> None:
        gate_name, up_name, down_name = unit.names
        gate, up, down = (ctx.modules[n] for n in unit.names)
        mask_plan = option.payload
        plan[gate_name] = entry(GATED, gate, keep_fraction=mask_plan.keep_fraction, followers=[up_name, down_name])
        plan[up_name] = entry(FOLLOWER, up, leader=gate_name, axis="out")
        plan[down_name] = entry(FOLLOWER, down, leader=gate_name, axis="in")
        fills[gate_name] = {"rana_hf_threshold": torch.tensor(mask_plan.threshold, dtype=torch.float32)}


KIND = CatsKind()
ENTRIES = (GatedEntry(), FollowerEntry())

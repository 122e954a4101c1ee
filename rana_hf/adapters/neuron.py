"""The neuron adapter (identity basis): `y = W (keep * x) + bias`, `keep_j = |x_j| >= threshold[j]`, no router.

Input neuron `j` of a token is kept when its importance passes a threshold `tau`: `|x_j| * ||W[:, j]||` (`"weighted"`,
the paper's down-projection adapter, this kind) or `|x_j|` alone (`"magnitude"`, TEAL-style: `adapters.magnitude`).
Either way the layer stores one magnitude threshold per input neuron (`tau / ||W[:, j]||` or `tau`) and computes with
the original weight, so an input adapter costs `m * k(x)` MACs for `k(x)` kept inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import allocation, decomposition
from ..layers import RaNALayer, active_counter, keep_mask, tally
from ..offload import execution_device, module_weight
from .base import DENSE, AdapterKind, EntryKind, Option, PlanContext, Unit, dense_macs, entry

NAME = "neuron"
# How an entry scores input neurons (`entry["importance"]`).
WEIGHTED, MAGNITUDE = "weighted", "magnitude"


class RaNANeuronLinear(nn.Module, RaNALayer):
    """Neuron adapter: `y = W (keep * h) + bias` with `keep_j = |h_j| >= rana_hf_threshold[j]` (per input neuron)."""

    adapter_layer_names = ()

    def __init__(self, base_layer: nn.Linear, adapter_name: str) -> None:
        super().__init__()
        RaNALayer.__init__(self, base_layer)
        device = execution_device(base_layer)
        self.rana_hf_threshold[adapter_name] = torch.full((self.in_features,), float("nan"), device=device)
        self.set_adapter(adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # x: [..., n] (the gated product act(gate) * up) -> [..., m]
        if self._decode is not None and self._decode.runs(self, x):  # a prepared layer: decode step or prefill
            return self._decode.forward(self, x)
        adapter_name = self._active()
        if adapter_name is None:
            return self.dense_forward(x, *args, **kwargs)
        self.check_filled(adapter_name)
        threshold = self.rana_hf_threshold[adapter_name]
        with torch.no_grad():
            keep = keep_mask(x.abs(), threshold, self.top_k)
        result = self.base_layer(x * keep)
        counter = active_counter()
        if counter is not None:
            tokens, kept = tally(counter, keep)
            dense = tokens * self.in_features * self.out_features
            counter.add(self.module_name, tokens, dense, kept * self.out_features)
        return result

    def refit_threshold(self, sample: torch.Tensor, entry: dict, adapter_name: str) -> float:
        norms = decomposition.column_norms(module_weight(self.base_layer)).to(sample.device)
        if entry.get("importance", WEIGHTED) == WEIGHTED:
            tau = allocation.neuron_threshold(sample.abs() * norms, entry["keep_fraction"])
            new = allocation.per_neuron_thresholds(tau, norms)
        else:
            tau = allocation.neuron_threshold(sample.abs(), entry["keep_fraction"])
            new = torch.full_like(norms, tau)
        container = self.rana_hf_threshold[adapter_name]
        container.copy_(new.to(device=container.device, dtype=container.dtype))
        return tau

    def __repr__(self) -> str:
        return f"rana.{super().__repr__()}"


class NeuronEntry(EntryKind):
    """`{"kind": "neuron", "keep_fraction", "importance": "weighted" | "magnitude"}`."""

    name = NAME

    def check(self, name: str, entry: dict, plan: dict) -> None:
        if entry.get("importance", WEIGHTED) not in (WEIGHTED, MAGNITUDE):
            raise ValueError(f"plan entry {name!r} has unknown importance {entry.get('importance')!r}")

    def build(self, plan: dict, name: str, target: nn.Linear, parent: nn.Module, adapter_name: str) -> RaNALayer:
        return RaNANeuronLinear(target, adapter_name)

    def top_k(self, entry: dict) -> int | None:
        return max(1, round(entry["keep_fraction"] * entry["in_features"]))


def write_neuron_entry(
    name: str,
    module: nn.Linear,
    importance: str,
    tau: float,
    keep_fraction: float,
    norms: torch.Tensor,
    plan: dict,
    fills: dict,
) -> None:
    """The plan entry and per-neuron thresholds of an input adapter with importance threshold `tau`.

    Args:
        norms: `||W[:, j]||` per input neuron (the importance weights of `"weighted"`).
    """
    plan[name] = entry(NAME, module, keep_fraction=keep_fraction, importance=importance)
    if importance == WEIGHTED:
        thresholds = allocation.per_neuron_thresholds(tau, norms)
    else:
        thresholds = torch.full((module.in_features,), float(tau))
    fills[name] = {"rana_hf_threshold": thresholds.float()}


class NeuronKind(AdapterKind):
    """Input neurons kept by `|x_i| * ||W[:, i]||` (planned one linear at a time)."""

    name = NAME
    importance = WEIGHTED

    def score(self, sample: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """Per (token, input) score, kept from the highest: here the error of dropping it, `|x_i| ||W[:, i]||`."""
        return energy.sqrt()

    def options(self, ctx: PlanContext, unit: Unit, budgets: list[float]) -> list[Option | None]:
        if len(unit.names) > 1:
            raise ValueError(
                f"internal: the {self.name} kind plans one linear at a time, got {unit.names}; offer it per linear "
                "(`Method.per_linear`)"
            )
        dense = dense_macs(ctx.modules, unit.names)
        sample = ctx.sample(unit)
        norms = torch.cat(ctx.weights(unit.names), dim=0).norm(dim=0).to(sample.device)  # [n]
        energy = sample.pow(2) * norms.pow(2)  # [N, n]: x_i^2 ||W[:, i]||^2, the error of dropping input i
        fractions = [budget / dense for budget in budgets]
        plans = allocation.mask_plans(self.score(sample, energy), energy, fractions)
        result = []
        for fraction, plan in zip(fractions, plans, strict=True):
            if fraction >= 1.0:
                result.append(Option(DENSE, dense, 0.0))
            elif plan.keep_fraction <= 0:
                result.append(None)
            else:
                error = (plan.total_energy - plan.kept_energy) / sample.shape[0]
                result.append(Option(self.name, dense * plan.keep_fraction, error, (plan, norms)))
        return result

    def materialize(self, ctx: PlanContext, unit: Unit, option: Option, plan: dict, fills: dict) -> None:
        mask_plan, norms = option.payload
        (name,) = unit.names
        write_neuron_entry(
            name, ctx.modules[name], self.importance, mask_plan.threshold, mask_plan.keep_fraction, norms, plan, fills
        )


KIND = NeuronKind()
ENTRIES = (NeuronEntry(),)

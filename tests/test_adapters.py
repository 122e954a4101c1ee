"""The adapter-kind registry: every registered kind and entry is complete, and a new kind plugs in as one module plus
its registry line (here: a kind defined in this file and registered for the test), with no change elsewhere."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_CONFIGS
from transformers import AutoModelForCausalLM

import rana_hf
from rana_hf import adapters, allocation
from rana_hf.adapters import ENTRIES, KINDS, METHODS, AdapterKind, Method, Option, RaNANeuronLinear, dense_macs
from rana_hf.adapters.neuron import MAGNITUDE, write_neuron_entry


def test_registry_is_consistent():
    for name, kind in KINDS.items():
        assert kind.name == name and isinstance(kind, AdapterKind)
        assert type(kind).options is not AdapterKind.options, f"{name} plans nothing"
        materializes = (
            type(kind).materialize is not AdapterKind.materialize or type(kind).parts is not AdapterKind.parts
        )
        assert materializes, f"{name} materialises nothing (nor names the parts that do)"
    for name, entry in ENTRIES.items():
        assert entry.name == name
    for method in METHODS.values():
        assert method.kinds() <= set(KINDS)
    assert tuple(METHODS) == rana_hf.config.METHODS


class StaticChannelKind(AdapterKind):
    """A kind as a new module would define it: static channel pruning, the same inputs dropped for every token (the
    inputs with the least mean energy), written as neuron entries whose thresholds are 0 (kept) or inf (dropped)."""

    name = "static_channels"

    def options(self, ctx, unit, budgets):
        dense = dense_macs(ctx.modules, unit.names)
        sample = ctx.sample(unit)  # [N, n]
        norms = torch.cat(ctx.weights(unit.names)).norm(dim=0).to(sample.device)
        energy = (sample.pow(2) * norms.pow(2)).mean(0, keepdim=True)  # [1, n]: one score per input, for all tokens
        plans = allocation.mask_plans(energy, energy, [budget / dense for budget in budgets])
        return [
            Option(self.name, dense * plan.keep_fraction, plan.total_energy - plan.kept_energy, (plan, norms))
            if 0 < plan.keep_fraction < 1
            else None
            for plan in plans
        ]

    def materialize(self, ctx, unit, option, plan, fills):
        mask_plan, norms = option.payload
        (name,) = unit.names
        module = ctx.modules[name]
        write_neuron_entry(name, module, MAGNITUDE, 0.0, mask_plan.keep_fraction, norms, plan, fills)
        score = (ctx.sample(unit).pow(2) * norms.pow(2)).mean(0)
        kept = score >= mask_plan.threshold
        fills[name]["rana_hf_threshold"] = torch.where(kept, 0.0, float("inf")).float().cpu()


@pytest.fixture
def registered(monkeypatch):
    kind = StaticChannelKind()
    monkeypatch.setitem(adapters.KINDS, kind.name, kind)  # the registry line
    method = Method("static", (kind.name,), (kind.name,), (kind.name,), joint_qkv=False)
    monkeypatch.setitem(adapters.METHODS, method.name, method)
    return kind


def test_a_new_kind_plugs_in_through_the_registry(registered, calibration_ids, heldout_ids):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).eval()
    for allocation_mode in ("uniform", "global"):
        config = rana_hf.RaNAConfig(
            method="static",
            allocation=allocation_mode,
            flop_reduction=0.3,
            calibration_seq_len=64,
            calibration_tokens=1024,
            threshold_sample_tokens=512,
            refit_passes=0,  # the thresholds are the plan: nothing to refit
        )
        adapted = rana_hf.compress(model, config, calibration_ids)
        plan = adapted.peft_config["default"].plan
        assert {entry["stats"]["adapter"] for entry in plan.values() if "stats" in entry} <= {
            "static_channels",
            "dense",
        }
        layers = [m for m in adapted.modules() if isinstance(m, RaNANeuronLinear)]
        assert layers and all(
            bool(torch.isin(m.rana_hf_threshold["default"], torch.tensor([0.0, torch.inf])).all()) for m in layers
        )
        report = rana_hf.measure_flops(adapted, heldout_ids)
        assert report["reduction"] == pytest.approx(0.3, abs=0.05)  # static masks spend exactly what they planned
        model = adapted.unload()

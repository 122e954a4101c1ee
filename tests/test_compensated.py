"""Sparse plus low-rank compensation (`adapters.compensated`): the kind's maths, its layer, and the pipeline."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tiny_models import SMALL_CALIBRATION, assert_reloads_the_same, load_tiny
from torch import nn

from rana_hf import RaNAConfig, compress, measure_flops
from rana_hf.adapters import ENTRIES, RaNACompensatedLinear, RaNANeuronLinear, Unit, compensated
from rana_hf.api import _fill, parameter_counts
from rana_hf.config import PAPER_TARGETS
from rana_hf.layers import FlopCounter, RaNALayer, counting
from rana_hf.planning import plan_parameters
from rana_hf.training import make_trainable


class _Context:
    """What the kind reads of a planner, for one linear and a fixed sample."""

    def __init__(self, linear: nn.Linear, sample: torch.Tensor) -> None:
        self.modules = {"lin": linear}
        self._sample = sample

    def weights(self, names):
        return [self.modules[n].weight.detach().float() for n in names]

    def sample(self, unit):
        return self._sample


def _low_rank_tail(tokens: int = 2048, n: int = 64, m: int = 64, rank: int = 4, seed: int = 0):
    """A linear whose inputs have large entries in the first half (always kept) and small ones in the second half
    (always dropped) that lie in a `rank`-dimensional subspace: the dropped part is exactly low-rank."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(m, n, generator=generator) / n**0.5)
    big = 10 + torch.rand(tokens, n // 2, generator=generator)
    big = big * torch.randint(0, 2, big.shape, generator=generator).mul(2).sub(1)  # |x| in [10, 11)
    directions = torch.linalg.qr(torch.randn(n // 2, rank, generator=generator)).Q
    small = (torch.randn(tokens, rank, generator=generator) @ directions.T) * 0.5
    return linear, torch.cat([big, small], dim=1)


def _layer_from(linear: nn.Linear, plan: dict, fills: dict) -> nn.Module:
    (name,) = plan
    layer = ENTRIES[plan[name]["kind"]].build(plan, name, linear, None, "default")
    _fill(nn.ModuleDict({"lin": layer}), {"lin": fills[name]}, "default")
    return layer


def test_compensation_recovers_a_low_rank_dropped_part():
    linear, sample = _low_rank_tail()
    m, n = linear.out_features, linear.in_features
    unit = Unit(["lin"], "lin", ("compensated",))
    ctx = _Context(linear, sample)
    budget = 0.5 * m * n + 8 * (n + m)  # the big half kept plus a rank-8 term, or 0.75 of the inputs and no term
    (option,) = compensated.KIND.options(ctx, unit, [budget])
    fraction, rank = option.payload
    assert rank == 8 and fraction == pytest.approx(0.5)
    assert option.macs == budget
    plan, fills = {}, {}
    compensated.KIND.materialize(ctx, unit, option, plan, fills)
    assert plan["lin"]["kind"] == "compensated" and plan["lin"]["rank"] == 8
    layer = _layer_from(linear, plan, fills)
    with torch.no_grad():
        exact = linear(sample)
        error = (layer(sample) - exact).pow(2).sum(-1).mean()
        plain = (linear(sample * (sample.abs() >= 10)) - exact).pow(2).sum(-1).mean()
    assert plain > 0.1  # dropping the small half costs something ...
    assert error < 1e-6 * plain  # ... and the rank-8 term gives it back (the dropped part has rank 4)
    assert option.error == pytest.approx(float(error), abs=1e-5 * float(plain))  # the estimate is the measured error
    # without a low-rank structure to exploit, the kind falls back to the plain mask (rank 0, the teal layer)
    noise = torch.randn(2048, n, generator=torch.Generator().manual_seed(1))
    ctx = _Context(linear, noise)
    options = compensated.KIND.options(ctx, unit, [0.5 * m * n, 0.9 * m * n, 1.0 * m * n])
    assert [option.payload[1] for option in options[:2]] == [0, 0] and options[2].kind == "dense"
    plan, fills = {}, {}
    compensated.KIND.materialize(ctx, unit, options[0], plan, fills)
    assert plan["lin"]["kind"] == "neuron" and plan["lin"]["importance"] == "magnitude"
    assert isinstance(_layer_from(linear, plan, fills), RaNANeuronLinear)


def test_compensated_layer_output_and_counted_cost():
    linear = nn.Linear(16, 8)
    plan = {"lin": {"kind": "compensated", "in_features": 16, "out_features": 8, "keep_fraction": 0.5, "rank": 2}}
    up, down = torch.randn(8, 2), torch.randn(2, 16)
    fills = {"lin": {"rana_hf_threshold": torch.full((16,), 0.7), "rana_hf_A": up, "rana_hf_B": down}}
    layer = _layer_from(linear, plan, fills)
    layer.module_name = "lin"
    x = torch.randn(3, 5, 16)
    keep = x.abs() >= 0.7
    with torch.no_grad(), counting(FlopCounter()) as counter:
        out = layer(x)
    expected = linear(x * keep) + (x * ~keep) @ down.T @ up.T
    torch.testing.assert_close(out, expected)
    count = counter.modules["lin"]
    assert count.tokens == 15 and count.dense_macs == 15 * 16 * 8
    assert count.actual_macs == int(keep.sum()) * 8 + 15 * 2 * (16 + 8)
    assert ENTRIES["compensated"].parameters(plan["lin"]) == 16 * 8 + 2 * 24


@pytest.mark.parametrize(
    "bad, match",
    [({"rank": 0}, "rank >= 1"), ({"rank": 2.0}, "rank >= 1"), ({"keep_fraction": 1.5}, "keep_fraction")],
)
def test_compensated_entry_is_checked(bad, match):
    entry = {"kind": "compensated", "in_features": 16, "out_features": 8, "keep_fraction": 0.5, "rank": 2} | bad
    with pytest.raises(ValueError, match=match):
        ENTRIES["compensated"].check("lin", entry, {"lin": entry})


def _config(allocation_mode: str) -> RaNAConfig:
    return RaNAConfig(
        method="compensated",
        allocation=allocation_mode,
        flop_reduction=0.3,
        target_modules=list(PAPER_TARGETS),
        **SMALL_CALIBRATION,
    )


@pytest.mark.parametrize("allocation_mode", ["uniform", "global"])
def test_compensated_method_meets_the_target_saves_loads_and_trains(
    tiny_base_dirs, calibration_ids, heldout_ids, tmp_path, monkeypatch, allocation_mode
):
    # tiny widths (32-128) make every rank too dear, so the kind would choose the plain mask everywhere: offer rank 2
    # alone to exercise the compensated layer end to end
    monkeypatch.setattr(compensated.CompensatedKind, "_ranks", lambda self, module: [2])
    adapted = compress(load_tiny(tiny_base_dirs["llama"]), _config(allocation_mode), calibration_ids)
    plan = adapted.peft_config["default"].plan
    layers = [m for m in adapted.modules() if isinstance(m, RaNACompensatedLinear)]
    assert layers and all(layer.rank == 2 for layer in layers)
    assert {entry["kind"] for entry in plan.values()} <= {"compensated", "dense"}
    assert abs(measure_flops(adapted, calibration_ids)["reduction"] - 0.3) < 0.03
    counts = parameter_counts(adapted)
    extra = sum(2 * (layer.in_features + layer.out_features) for layer in layers)
    assert counts["adapted"] - counts["dense"] == extra
    assert plan_parameters(plan) == sum(e["in_features"] * e["out_features"] for e in plan.values()) + extra

    assert_reloads_the_same(adapted, tiny_base_dirs["llama"], tmp_path, heldout_ids)

    trained = PeftModel.from_pretrained(load_tiny(tiny_base_dirs["llama"]), tmp_path)
    assert make_trainable(trained) == sum(2 * (layer.in_features + layer.out_features) for layer in layers)
    trained(heldout_ids[:2], labels=heldout_ids[:2]).loss.backward()
    grads = [m.rana_hf_A["default"].grad for m in trained.modules() if isinstance(m, RaNACompensatedLinear)]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    adapted.unload()
    assert not any(isinstance(m, RaNALayer) for m in adapted.modules())


def test_compensated_layers_decode_and_compile_in_a_prepared_model(tiny_base_dirs, calibration_ids, monkeypatch):
    """`prepare_for_decode` gives compensated layers the masked-GEMV path (their products stacked with their siblings')
    plus their term: the same tokens as the reference forward, eager and compiled as one graph."""
    from tiny_models import token_batch
    from transformers import CompileConfig

    from rana_hf.inference import prepare_for_decode

    # a mix: rank 2 offered to the square linears (q_proj), the plain mask (rank 0) to the others
    ranks = lambda self, module: [2] if module.in_features == module.out_features else [0]  # noqa: E731
    monkeypatch.setattr(compensated.CompensatedKind, "_ranks", ranks)
    adapted = compress(load_tiny(tiny_base_dirs["llama"]), _config("uniform"), calibration_ids)
    kinds = {entry["kind"] for entry in adapted.peft_config["default"].plan.values()}
    assert kinds == {"compensated", "neuron"}
    base = adapted.base_model.model
    ids = token_batch(1, 10, seed=8)
    settings = dict(max_new_tokens=5, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        reference = base.generate(ids, **settings, disable_compile=True)
        prepare_for_decode(adapted)
        layers = [m for m in adapted.modules() if isinstance(m, RaNACompensatedLinear)]
        assert layers and all(m._decode is not None and m._decode.compensation is not None for m in layers)
        assert any(m._decode.group is not None for m in layers)  # q stacked with its k and v siblings
        x = torch.randn(2, 3, layers[0].in_features)
        prepared = layers[0](x)  # a prefill-sized input: the stacked path's longer-input form
        layers[0]._decode = None
        torch.testing.assert_close(prepared, layers[0](x))  # the reference forward on the same tensors
        prepare_for_decode(adapted)  # prepares what is not prepared: the layer again
        eager = base.generate(ids, **settings, disable_compile=True)
        compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
        compile_config._compile_all_devices = True  # transformers compiles the decode step on CUDA only by default
        torch._dynamo.reset()
        compiled = base.generate(ids, **settings, compile_config=compile_config)
    assert torch.equal(eager, reference) and torch.equal(compiled, eager)


def test_compensated_topk_keeps_each_tokens_count(tiny_base_dirs, calibration_ids, heldout_ids, monkeypatch):
    monkeypatch.setattr(compensated.CompensatedKind, "_ranks", lambda self, module: [2])
    config = _config("uniform")
    config.budget_mode = "topk"
    adapted = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration_ids)
    plan = adapted.peft_config["default"].plan
    layers = [m for m in adapted.modules() if isinstance(m, RaNACompensatedLinear)]
    assert layers
    for layer in layers:  # the kept share is 0.7 less the rank's cost
        entry = plan[layer.module_name]
        fraction = 0.7 - 2 * (layer.in_features + layer.out_features) / (layer.in_features * layer.out_features)
        assert entry["keep_fraction"] == pytest.approx(fraction, abs=0.01)
        assert layer.top_k == round(entry["keep_fraction"] * layer.in_features)
    assert abs(measure_flops(adapted, heldout_ids)["reduction"] - 0.3) < 0.02

"""The rotated identity basis (`adapters.rotated`): the kind's maths, and the method end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tiny_models import (
    SMALL_CALIBRATION,
    assert_reloads_the_same,
    generate_before_and_after_prepare,
    load_tiny,
    token_batch,
)
from torch import nn

from rana_hf import RaNAConfig, allocation, compress, measure_flops
from rana_hf.adapters import ENTRIES, KINDS, METHODS, Option, RaNALinear, Unit, dense_macs, magnitude, rotated, split
from rana_hf.adapters.base import KEEP_GRID
from rana_hf.api import _fill
from rana_hf.config import PAPER_TARGETS
from rana_hf.layers import FlopCounter, counting
from rana_hf.training import make_trainable


class _Context:
    """What the kind reads of a planner, for the linears `modules` (one input) and a fixed sample."""

    def __init__(self, modules: dict[str, nn.Linear], sample: torch.Tensor, max_rank: int | None = None) -> None:
        self.modules = modules
        self._sample = sample
        self._max_rank = max_rank
        self.kind_scale = {}

    def weights(self, names):
        return [self.modules[n].weight.detach().float() for n in names]

    def sample(self, unit):
        return self._sample

    def principal_axes(self, unit):
        return rotated.principal_axes(self._sample.double().T @ self._sample.double())[1].float()

    def max_rank(self, in_features, out_features):
        return self._max_rank

    def loss_weight(self, names):
        return 1.0

    def curve(self, unit, kind):
        dense = dense_macs(self.modules, unit.names)
        return [o for o in KINDS[kind].options(self, unit, [f * dense for f in KEEP_GRID]) if o is not None]

    def within_cap(self, unit, option):
        return KINDS[option.kind].within_cap(self, unit, option)


def _rotated_inputs(tokens: int = 2048, n: int = 32, seed: int = 0) -> torch.Tensor:
    """Inputs whose energy lies mostly in 4 directions that are spread over every coordinate (a random rotation of
    a few large components): a magnitude mask on the coordinates finds nothing to drop, the principal axes do."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.cat([torch.full((4,), 10.0), torch.full((n - 4,), 0.1)])
    rotation = torch.linalg.qr(torch.randn(n, n, generator=generator)).Q
    return (torch.randn(tokens, n, generator=generator) * scales) @ rotation.T


def _linears(n: int = 32, widths=(32, 16), seed: int = 0) -> dict[str, nn.Linear]:
    torch.manual_seed(seed)
    return {f"lin{i}": nn.Linear(n, m, bias=i == 0) for i, m in enumerate(widths)}


def test_principal_axes_are_orthonormal_and_sorted():
    sample = _rotated_inputs()
    values, vectors = rotated.principal_axes(sample.double().T @ sample.double())
    assert torch.all(values[:-1] >= values[1:])
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(32, dtype=torch.float64))


def test_rotation_beats_the_magnitude_mask_where_the_energy_hides_in_a_few_directions():
    modules = _linears()
    sample = _rotated_inputs()
    unit = Unit(list(modules), "lin0", ("rotated",))
    ctx = _Context(modules, sample)
    dense = 32 * (32 + 16)
    budget = 0.6 * dense
    (turned,) = rotated.KIND.options(ctx, unit, [budget])
    (masked,) = split.KIND.options(ctx, Unit(list(modules), "lin0", ("split",), split_kinds=("magnitude",)), [budget])
    assert turned.kind == "rotated" and turned.macs == pytest.approx(budget, rel=0.02)
    assert turned.error < 0.1 * masked.error
    rank = turned.payload[0]
    assert rank in rotated.KIND._ranks(32, None)

    plan, fills = {}, {}
    rotated.KIND.materialize(ctx, unit, turned, plan, fills)
    assert plan["lin0"]["kind"] == "rank" and plan["lin0"]["role"] == "owner" and plan["lin1"]["role"] == "member"
    assert plan["lin0"]["rank"] == plan["lin1"]["rank"] == rank
    layers = {name: ENTRIES["rank"].build(plan, name, modules[name], None, "default") for name in plan}
    for name, layer in layers.items():
        layer.module_name = name
    ENTRIES["rank"].link("lin1", plan["lin1"], layers)
    _fill(nn.ModuleDict(layers), fills, "default")
    x = sample[:512]
    with torch.no_grad():
        exact = [modules[name](x) for name in plan]
        with counting(FlopCounter()) as counter:
            got = [layers[name](x) for name in plan]
    error = sum(float((g - e).pow(2).sum()) for g, e in zip(got, exact, strict=True)) / x.shape[0]
    assert error == pytest.approx(turned.error, rel=0.5)  # the diagonal model, measured on other tokens
    # the rotation (n r, once for both linears) and the kept components' columns of A
    actual = sum(count.actual_macs for count in counter.modules.values()) / x.shape[0]
    assert actual == pytest.approx(turned.macs, rel=0.05)


def test_a_unit_of_several_linears_splits_its_budget_between_them():
    """q/k/v planned as one unit for the rotation's sake: the `split` alternative still gives each linear its own
    share of the budget (here the larger weight keeps more), at the cost and error of the linears planned alone."""
    modules = _linears(widths=(32, 32))
    with torch.no_grad():
        modules["lin0"].weight.mul_(4.0)
    sample = torch.randn(1024, 32)
    ctx = _Context(modules, sample)
    budget = 0.5 * 32 * 64
    unit = Unit(list(modules), "lin0", ("split",), split_kinds=("magnitude",))
    (joint,) = split.KIND.options(ctx, unit, [budget])
    assert joint.macs <= budget * (1 + 1e-9) and joint.macs >= 0.95 * budget
    parts = joint.payload
    assert joint.error == pytest.approx(sum(part.error for part in parts))
    plan, fills = {}, {}
    for single, part in split.KIND.parts(unit, joint):
        KINDS[part.kind].materialize(ctx, single, part, plan, fills)
    assert plan["lin0"]["keep_fraction"] > plan["lin1"]["keep_fraction"]
    assert {entry["kind"] for entry in plan.values()} == {"neuron"}
    # the shared split costs no more error than one mask at the same fraction for both
    shared = [magnitude.KIND.options(ctx, Unit([name], "lin0", ("magnitude",)), [0.5 * 32 * 32])[0] for name in plan]
    assert joint.error <= sum(option.error for option in shared) * (1 + 1e-6)


def test_full_rank_keeping_everything_is_the_dense_map():
    modules = _linears()
    sample = _rotated_inputs()
    unit = Unit(list(modules), "lin0", ("rotated",))
    ctx = _Context(modules, sample)
    keep_all = allocation.MaskPlan(0.0, 1.0, 1.0, 1.0)  # every component of a full-rank rotation
    option = Option("rotated", 32.0 * (32 + 48), 0.0, (32, keep_all, 1.0))
    plan, fills = {}, {}
    rotated.KIND.materialize(ctx, unit, option, plan, fills)
    assert plan["lin0"]["rank"] == 32 and plan["lin0"]["mean_kept"] == 32
    assert float(fills["lin0"]["rana_hf_threshold"]) == 0
    for name in plan:
        up = fills[name]["rana_hf_A"]
        torch.testing.assert_close(up @ fills["lin0"]["rana_hf_B"], modules[name].weight.detach(), atol=1e-5, rtol=0)


def test_ranks_respect_the_size_cap():
    modules = _linears()
    ctx = _Context(modules, _rotated_inputs(), max_rank=10)
    unit = Unit(list(modules), "lin0", ("rotated",))
    options = rotated.KIND.options(ctx, unit, [f * 32 * 48 for f in (0.3, 0.6, 0.9)])
    assert all(option.payload[0] <= 10 for option in options if option is not None and option.kind == "rotated")
    assert all(rotated.KIND.within_cap(ctx, unit, option) for option in options if option.kind == "rotated")


@pytest.fixture
def rotated_only():
    """Tiny random models' inputs have no principal axes worth their rotation: force it."""
    with rotated.forced():
        yield
    assert METHODS["rotated"].per_linear == ("magnitude",) and METHODS["rotated"].trials  # restored


def _config(allocation_mode: str, **extra) -> RaNAConfig:
    return RaNAConfig(
        method="rotated",
        allocation=allocation_mode,
        flop_reduction=0.3,
        target_modules=list(PAPER_TARGETS),
        **SMALL_CALIBRATION,
        **extra,
    )


def test_rotated_method_plans_one_rotation_per_input(tiny_base_dirs, calibration_ids):
    """Without forcing, the method plans q/k/v and gate/up as units of their own (one rotation each), down alone, and
    chooses per unit between the rotation and plain masks, one per linear."""
    adapted = compress(load_tiny(tiny_base_dirs["llama"]), _config("global"), calibration_ids)
    plan = adapted.peft_config["default"].plan
    assert {entry["kind"] for entry in plan.values()} <= {"rank", "neuron", "dense"}
    adapters = {entry["stats"]["adapter"] for entry in plan.values() if "stats" in entry}
    assert adapters <= {"rotated", "magnitude", "dense"}
    for name, entry in plan.items():
        for first, *rest in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if name.endswith(first):
                siblings = [name[: -len(first)] + leaf for leaf in rest]
                if entry["stats"]["adapter"] == "rotated":  # one unit: the stats are the first linear's
                    assert all("stats" not in plan[s] and plan[s]["owner"] == name for s in siblings)
                else:  # split: each linear its own plain mask (or dense)
                    assert all(plan[s]["stats"]["adapter"] in ("magnitude", "dense") for s in siblings)


@pytest.mark.parametrize("allocation_mode", ["uniform", "global"])
def test_rotated_method_meets_the_target_saves_loads_and_trains(
    tiny_base_dirs, calibration_ids, heldout_ids, tmp_path, rotated_only, allocation_mode
):
    adapted = compress(load_tiny(tiny_base_dirs["llama"]), _config(allocation_mode), calibration_ids)
    plan = adapted.peft_config["default"].plan
    owners = [name for name, entry in plan.items() if entry["kind"] == "rank" and entry["role"] == "owner"]
    assert owners and all(name.endswith(("q_proj", "gate_proj")) for name in owners)
    for name in owners:
        members = [key for key, entry in plan.items() if entry.get("owner") == name]
        assert len(members) == (2 if name.endswith("q_proj") else 1)
    assert abs(measure_flops(adapted, calibration_ids)["reduction"] - 0.3) < 0.03

    assert_reloads_the_same(adapted, tiny_base_dirs["llama"], tmp_path, heldout_ids)

    trained = PeftModel.from_pretrained(load_tiny(tiny_base_dirs["llama"]), tmp_path)
    assert make_trainable(trained) > 0
    trained(heldout_ids[:2], labels=heldout_ids[:2]).loss.backward()
    grads = [m.rana_hf_A["default"].grad for m in trained.modules() if isinstance(m, RaNALinear)]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_rotated_layers_decode_in_a_prepared_model(tiny_base_dirs, calibration_ids, rotated_only):
    """`prepare_for_decode` lays a rotation out as a shared router (gate and up: one router, one launch of both
    `A`s): the same tokens as the reference forward."""
    adapted = compress(load_tiny(tiny_base_dirs["llama"]), _config("uniform"), calibration_ids)
    reference, prepared = generate_before_and_after_prepare(adapted, token_batch(1, 10, seed=8))
    layers = [m for m in adapted.modules() if isinstance(m, RaNALinear)]
    assert layers and all(m._decode is not None for m in layers)
    assert torch.equal(prepared, reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotated_decode_kernels_against_the_same_mask(tiny_base_dirs, dtype, tokens):
    """Prepared rotations (router `Q^T x`, then the masked product of the group's `A`s; 1 token: the kernels, 8: the
    longer-input path), each linear alone on its input, against a float32 product of `A` with the mask taken from the
    codes as the prepared path rounds them (a half-precision code next to the threshold would otherwise flip, and a
    flipped component moves every output): the outputs agree to the output dtype's rounding."""
    pytest.importorskip("triton")
    from torch.nn import functional as F

    from rana_hf.inference import prepare_for_decode
    from rana_hf.kernels.ops import MAX_KERNEL_TOKENS, masked_gemv

    base = load_tiny(tiny_base_dirs["llama"], dtype=dtype).cuda()
    with rotated.forced():
        model = compress(base, _config("uniform"), token_batch(16, 64, seed=1))
    layers = [m for m in model.modules() if isinstance(m, RaNALinear)]
    assert {layer.role for layer in layers} == {"owner", "member"}
    ups = {layer: layer.rana_hf_A["default"].detach().float() for layer in layers}  # before preparing
    prepare_for_decode(model)
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            state = layer._decode
            x = torch.randn(tokens, layer.in_features, device="cuda", generator=generator).to(dtype)
            if tokens <= MAX_KERNEL_TOKENS and state.routers is not None:  # the owner's router launch
                stacked, zeros = state.routers
                codes = masked_gemv(x, stacked, zeros)[:, state.router_columns[0] : state.router_columns[1]]
            else:  # a member alone, or the longer-input path
                codes = F.linear(x, state.router)
            keep = codes.float().abs() >= state.threshold.float()
            expected = (codes.float() * keep) @ ups[layer].T
            got = layer(x)
            assert got.dtype == dtype
            scale = float(expected.abs().max())
            torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-3 * scale)


def test_rotated_topk_keeps_each_tokens_count(tiny_base_dirs, calibration_ids, heldout_ids, rotated_only):
    adapted = compress(load_tiny(tiny_base_dirs["llama"]), _config("global", budget_mode="topk"), calibration_ids)
    plan = adapted.peft_config["default"].plan
    routers = [m for m in adapted.modules() if isinstance(m, RaNALinear) and m.role == "owner"]
    assert routers
    for layer in routers:
        assert layer.top_k == max(1, round(plan[layer.module_name]["mean_kept"]))
    assert abs(measure_flops(adapted, heldout_ids)["reduction"] - 0.3) < 0.02

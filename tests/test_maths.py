"""Pure maths: the data-aware basis, the (rank, threshold) search, neuron thresholds, the MLP split search."""

from __future__ import annotations

import math

import pytest
import torch

from rana_hf import allocation, decomposition


def correlated_inputs(num_tokens: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) * torch.logspace(0, -2, width)
    return torch.randn(num_tokens, width, generator=generator) @ mixing.T  # [N, n], anisotropic like activations


def test_basis_is_the_svd_of_the_output():
    torch.manual_seed(0)
    x = correlated_inputs(500, 24, seed=1).double()  # [N, n]
    weight = torch.randn(40, 24, dtype=torch.float64)
    basis = decomposition.data_aware_basis(weight, x.T @ x)
    up, down = basis.up.double(), basis.down.double()
    torch.testing.assert_close(up.T @ up, torch.eye(24, dtype=torch.float64), atol=1e-5, rtol=0)
    output = weight @ x.T  # [m, N]
    singular = torch.linalg.svdvals(output)[:24]  # W X has rank <= n = 24
    torch.testing.assert_close(basis.energy.double(), singular**2, rtol=1e-4, atol=1e-6)
    for rank in (1, 5, 12):  # Eckart-Young on the data: A_k B_k X is the best rank-k approximation of W X
        approx = up[:, :rank] @ down[:rank] @ x.T
        error = (output - approx).norm() ** 2
        torch.testing.assert_close(error, (singular[rank:] ** 2).sum(), rtol=1e-4, atol=1e-6)


def test_basis_with_singular_covariance():
    x = correlated_inputs(10, 32, seed=2)  # fewer tokens than features
    weight = torch.randn(16, 32)
    basis = decomposition.data_aware_basis(weight, x.T @ x)
    assert torch.isfinite(basis.up).all() and torch.isfinite(basis.down).all()
    approx = basis.up[:, :10] @ basis.down[:10] @ x.T  # rank of W X is at most 10: exact
    torch.testing.assert_close(approx, weight @ x.T, atol=1e-3, rtol=1e-3)


def _direct_energy(codes, rank, threshold):
    kept = codes[:, :rank].abs() >= threshold
    return float((codes[:, :rank] ** 2 * kept).sum()), float(kept.sum(-1).float().mean())


def test_rank_plans_meet_the_budget_and_keep_the_most_energy():
    x = correlated_inputs(1000, 64, seed=3)
    weight = torch.randn(96, 64)
    basis = decomposition.data_aware_basis(weight, x.T @ x)
    codes = x @ basis.down.T  # [N, r]
    dense = 96 * 64
    budgets = [0.3 * dense, 0.56 * dense, 0.9 * dense, 1.2 * dense]
    plans = allocation.rank_plans(codes, 64, 96, budgets)
    assert plans[-1].dense and not any(p.dense for p in plans[:-1])
    for plan, budget in zip(plans[:-1], budgets[:-1], strict=True):
        assert plan.macs_per_token <= budget + 1e-6
        energy, mean_kept = _direct_energy(codes, plan.rank, plan.threshold)
        assert math.isclose(energy, plan.kept_energy, rel_tol=1e-4)
        assert abs(mean_kept - plan.mean_kept) < 0.05
        for rank in allocation.candidate_ranks(64):  # no other rank with a budget-meeting threshold keeps more
            mean_allowed = (budget - 64 * rank) / 96
            if mean_allowed <= 0:
                continue
            kept_per_token = min(mean_allowed, rank)
            values = (codes[:, :rank] ** 2).flatten().sort(descending=True).values
            best_here = float(values[: int(kept_per_token * codes.shape[0])].sum())
            assert plan.kept_energy >= best_here * (1 - 1e-5)
    # more budget, less error
    errors = [p.relative_error for p in plans[:-1]]
    assert errors == sorted(errors, reverse=True)


def test_neuron_threshold_keep_fraction():
    importance = torch.rand(400, 50)
    for fraction in (0.1, 0.5, 0.9):
        tau = allocation.neuron_threshold(importance, fraction)
        assert abs(float((importance >= tau).float().mean()) - fraction) < 0.01
    assert allocation.neuron_threshold(importance, 1.0) == 0.0


@pytest.mark.parametrize("splits_units", [allocation.MLP_SPLIT_UNITS])
def test_mlp_split_search(splits_units):
    torch.manual_seed(0)
    x = correlated_inputs(512, 32, seed=4)
    gate, up, down = torch.randn(64, 32) / 6, torch.randn(64, 32) / 6, torch.randn(32, 64) / 8
    cov = x.T @ x
    gate_basis = decomposition.data_aware_basis(gate, cov)
    up_basis = decomposition.data_aware_basis(up, cov)
    budget = 0.56 * 3 * 64 * 32
    plan = allocation.search_mlp_split(x, gate, up, down, torch.nn.functional.silu, gate_basis, up_basis, budget)
    assert sum(plan.split) == splits_units and all(3 <= units <= 9 for units in plan.split)
    assert 0 <= plan.relative_error < 1
    assert plan.macs_per_token <= budget * 1.02
    assert all(split in allocation.mlp_splits() for split in [plan.split])


def test_block_output_scales():
    x = correlated_inputs(300, 16, seed=5)
    blocks = [torch.randn(8, 16) * 10, torch.randn(4, 16) * 0.1]
    scales = decomposition.block_output_scales(blocks, x.T @ x)
    for block, scale in zip(blocks, scales, strict=True):
        rms = (x @ block.T).pow(2).sum().div(block.shape[0]).sqrt()
        assert abs(float(scale) / float(rms) - 1) < 1e-4

"""Pure maths of the rank adapter: input second moments -> data-aware basis `(A, B)`.

Nothing here knows about models; every function takes and returns tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RankBasis:
    """A data-aware basis of a linear map `W` ([m, n]) on calibration inputs.

    Attributes:
        up: `A`, [m, r] with orthonormal columns (left singular vectors of `W X`).
        down: `B = A^T W`, [r, n]; `A B X` is the best rank-k approximation of `W X` for every k <= r when truncated.
        energy: [r], squared singular values of `W X` (summed `(B x)_i^2` over the calibration tokens), descending.
    """

    up: torch.Tensor
    down: torch.Tensor
    energy: torch.Tensor

    @property
    def rank(self) -> int:
        return self.up.shape[1]


def input_cholesky_factor(input_cov: torch.Tensor, rel_eps: float = 1e-10) -> torch.Tensor:
    """A factor `L` with `L L^T = C` for a symmetric positive semi-definite second moment `C = X X^T` ([n, n]).

    Uses an eigendecomposition rather than a Cholesky factorisation, so that a singular `C` (fewer calibration tokens
    than features, dead features) is handled exactly; eigenvalues below `rel_eps * max` are treated as zero.

    Returns:
        `L`, [n, n], float64.
    """
    cov = input_cov.to(torch.float64)
    cov = 0.5 * (cov + cov.T)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals = eigvals.clamp_min(eigvals.max().clamp_min(0) * rel_eps)
    return eigvecs * eigvals.sqrt()


def data_aware_basis(weight: torch.Tensor, input_cov: torch.Tensor) -> RankBasis:
    """Basis of the rank adapter from the weight and the input second moment (docs/method.md).

    The left singular vectors and squared singular values of the output `W X`, without forming `X`: with
    `C = X X^T = L L^T`, `W L` has the same ones. Computed in float64 whatever the weight dtype, as an
    eigendecomposition of a small Gram matrix rather than an SVD: for `m > n`, a QR factorisation `W L = Q R` first
    and the eigenvectors `U_R` of `R R^T` ([n, n]), so `U = Q U_R`; else the eigenvectors of `W L (W L)^T` ([m, m]).
    The columns of `U` are orthonormal to rounding either way (nothing is divided by small singular values), and the
    squared singular values are the eigenvalues. `torch.linalg.svd` of a 12288x4096 float64 matrix took 1.6 s on an
    H200, most of `compress`'s time on 7B-shaped models.

    Args:
        weight: `W`, [m, n] (out, in).
        input_cov: `C = X X^T`, [n, n], accumulated over calibration tokens.

    Returns:
        The basis with `r = min(m, n)` components in decreasing energy, float32.
    """
    out_features, in_features = weight.shape
    if input_cov.shape != (in_features, in_features):
        raise ValueError(f"input_cov must be [{in_features}, {in_features}] for a weight {tuple(weight.shape)}")
    weight64 = weight.detach().to(torch.float64)
    weighted = weight64 @ input_cholesky_factor(input_cov.to(weight64.device))  # W L, [m, n]
    if out_features > in_features:
        orthonormal, small = torch.linalg.qr(weighted)  # [m, n], [n, n]
    else:
        orthonormal, small = None, weighted
    gram = small @ small.T
    eigvals, eigvecs = torch.linalg.eigh(0.5 * (gram + gram.T))  # ascending
    energy, up = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
    if orthonormal is not None:
        up = orthonormal @ up  # [m, n]
    down = up.T @ weight64  # [r, n]
    return RankBasis(up=up.float(), down=down.float(), energy=energy.float())


def stack_weights(weights: list[torch.Tensor]) -> torch.Tensor:
    """Stack weights that read the same input (e.g. q, k, v) into one [sum(m_i), n] map."""
    in_features = {w.shape[1] for w in weights}
    if len(in_features) != 1:
        raise ValueError(f"weights to stack must share in_features, got {sorted(in_features)}")
    return torch.cat([w.detach() for w in weights], dim=0)


def block_output_scales(weights: list[torch.Tensor], input_cov: torch.Tensor) -> torch.Tensor:
    """RMS output per row of each block, `sqrt(trace(W_i C W_i^T) / m_i)`, for blocks that read one input.

    Dividing each block by its scale before a joint decomposition weighs the blocks equally instead of by raw output
    energy (q and k of models with q/k norms are rescaled after the projection, so their raw energy says little).

    Returns:
        float64 [num_blocks].
    """
    cov = input_cov.to(torch.float64)
    scales = []
    for weight in weights:
        weight64 = weight.detach().to(device=cov.device, dtype=torch.float64)
        energy = torch.einsum("mi,ij,mj->", weight64, cov, weight64)
        scales.append((energy / weight.shape[0]).clamp_min(1e-30).sqrt())
    return torch.stack(scales)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """`||W[:, j]||_2` for each input neuron `j` of a [m, n] weight, float32 [n]."""
    return weight.detach().float().norm(dim=0)

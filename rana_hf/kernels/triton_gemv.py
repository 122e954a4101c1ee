"""The Triton input-masked GEMV kernel (imported only when Triton is installed; see `rana_hf.kernels.ops`)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOKENS_PAD = 16  # tokens padded to one tensor-core tile; rows past the real count are masked off


@triton.jit
def _activation(g, ACT: tl.constexpr):
    if ACT == 1:  # SiLU
        return g / (1.0 + tl.exp(-g))
    if ACT == 2:  # GELU, tanh approximation: tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * (1.0 - 1.0 / (1.0 + tl.exp(2.0 * z)))
    return g


@triton.jit
def _masked_gemv_kernel(
    x_ptr,  # [T, K] input; with GLU the `up` half of the product
    gate_ptr,  # [T, K] gate pre-activation (GLU only)
    wt_ptr,  # [K, N] transposed weight: row i is column i of W, contiguous
    threshold_ptr,  # [K] float32: input i of a token is kept when |x| >= threshold[i]
    out_ptr,  # [T, N] float32, zeroed: programs over K add their partial sums
    T,
    K,
    N,
    stride_x,
    stride_gate,
    stride_wt,
    stride_out,
    K_PER_PROGRAM: tl.constexpr,  # a multiple of BLOCK_K; constexpr: a static trip count (one build per shape)
    GLU: tl.constexpr,
    ACT: tl.constexpr,
    TP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_t = tl.arange(0, TP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N
    k_start = pid_k * K_PER_PROGRAM
    acc = tl.zeros((TP, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_PER_PROGRAM, BLOCK_K):
        offs_k = k_start + step + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        tk_mask = t_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=tk_mask, other=0.0)
        if GLU:
            gate = tl.load(gate_ptr + offs_t[:, None] * stride_gate + offs_k[None, :], mask=tk_mask, other=0.0)
            # as the model computes it: act(gate) rounded to the dtype, times up, rounded to the dtype
            activated = _activation(gate.to(tl.float32), ACT).to(x.dtype)
            x = (activated.to(tl.float32) * x.to(tl.float32)).to(x.dtype)
        threshold = tl.load(threshold_ptr + offs_k, mask=k_mask, other=float("inf"))
        keep = (tl.abs(x.to(tl.float32)) >= threshold[None, :]) & tk_mask  # [TP, BLOCK_K]
        row_kept = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]: some token needs row i
        w = tl.load(
            wt_ptr + offs_k[:, None] * stride_wt + offs_n[None, :],
            mask=row_kept[:, None] & n_mask[None, :],
            other=0.0,
        )  # only kept rows are read
        x = tl.where(keep, x, 0.0).to(w.dtype)
        if UPCAST:  # Triton's CPU interpreter multiplies bfloat16 wrongly; float32 operands are exact there
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    tl.atomic_add(
        out_ptr + offs_t[:, None] * stride_out + offs_n[None, :],
        acc,
        mask=t_mask[:, None] & n_mask[None, :],
        sem="relaxed",
    )


def _blocks(K: int, N: int, num_sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, programs over K): ~4 programs per multiprocessor, each reading whole 256-byte rows."""
    block_n = 128 if N >= 128 else max(16, triton.next_power_of_2(N))
    block_k = 64
    tiles_n = triton.cdiv(N, block_n)
    split = max(1, min(triton.cdiv(4 * num_sms, tiles_n), triton.cdiv(K, block_k)))
    k_per_program = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    return block_n, block_k, k_per_program


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def masked_gemv_triton(
    x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor, gate: torch.Tensor | None, act: int
) -> torch.Tensor:
    """Launch the kernel: x [T, K] (T <= 16), wt [K, N], threshold [K] float32 -> [T, N] in x's dtype."""
    T, K = x.shape
    N = wt.shape[1]
    out = torch.zeros((T, N), device=x.device, dtype=torch.float32)
    block_n, block_k, k_per_program = _blocks(K, N, _num_sms(x.device))
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, k_per_program))
    _masked_gemv_kernel[grid](
        x,
        gate if gate is not None else x,
        wt,
        threshold,
        out,
        T,
        K,
        N,
        x.stride(0),
        gate.stride(0) if gate is not None else 0,
        wt.stride(0),
        out.stride(0),
        K_PER_PROGRAM=k_per_program,
        GLU=gate is not None,
        ACT=act,
        TP=TOKENS_PAD,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        UPCAST=_INTERPRETED,
        num_warps=4,
    )
    return out.to(x.dtype)

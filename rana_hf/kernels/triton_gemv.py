"""The Triton input-masked GEMV kernel (imported only when Triton is installed; see `rana_hf.kernels.ops`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


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
    threshold_ptr,  # [S, K] float32: input i of a token is kept for segment s when |x| >= threshold[s, i]
    out_ptr,  # [T, N] in x's dtype
    sum_ptr,  # [T, N] float32 workspace, zero between calls (SPLIT > 1)
    counter_ptr,  # [tiles over N] int32, zero between calls (SPLIT > 1)
    T,
    K,
    N,
    stride_x,
    stride_gate,
    stride_wt,
    stride_out,
    stride_threshold,  # between the threshold rows of consecutive segments
    start_1,  # first column of segment 1 (N when there is one segment)
    start_2,  # first column of segment 2 (N when there are fewer than three)
    K_PER_PROGRAM: tl.constexpr,  # a multiple of BLOCK_K; constexpr: a static trip count (one build per shape)
    SPLIT: tl.constexpr,
    GLU: tl.constexpr,
    ACT: tl.constexpr,
    TP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_t = tl.arange(0, TP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N
    k_start = pid_k * K_PER_PROGRAM
    # column segments (q, k and v, or gate and up, side by side) each have their own thresholds; BLOCK_N divides the
    # segment starts, so a program's columns lie in one segment
    column = pid_n * BLOCK_N
    segment = (column >= start_1).to(tl.int32) + (column >= start_2).to(tl.int32)
    threshold_ptr += segment * stride_threshold
    acc = tl.zeros((TP, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_PER_PROGRAM, BLOCK_K):
        offs_k = k_start + step + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        tk_mask = t_mask[:, None] & k_mask[None, :]
        # inputs are read by every column block: keep them in L2; weight rows are read once: stream them
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=tk_mask, other=0.0, eviction_policy="evict_last"
        )
        if GLU:
            gate = tl.load(
                gate_ptr + offs_t[:, None] * stride_gate + offs_k[None, :],
                mask=tk_mask,
                other=0.0,
                eviction_policy="evict_last",
            )
            # as the model computes it: act(gate) rounded to the dtype, times up, rounded to the dtype
            activated = _activation(gate.to(tl.float32), ACT).to(x.dtype)
            x = (activated.to(tl.float32) * x.to(tl.float32)).to(x.dtype)
        threshold = tl.load(threshold_ptr + offs_k, mask=k_mask, other=float("inf"), eviction_policy="evict_last")
        keep = (tl.abs(x.to(tl.float32)) >= threshold[None, :]) & tk_mask  # [TP, BLOCK_K]
        row_kept = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]: some token needs row i
        w = tl.load(
            wt_ptr + offs_k[:, None] * stride_wt + offs_n[None, :],
            mask=row_kept[:, None] & n_mask[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )  # only kept rows are read
        if USE_DOT:
            x = tl.where(keep, x, 0.0).to(w.dtype)
            if UPCAST:  # Triton's CPU interpreter multiplies bfloat16 wrongly; float32 operands are exact there
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        else:
            xf = tl.where(keep, x.to(tl.float32), 0.0)
            acc += tl.sum(xf[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    out_ptrs = out_ptr + offs_t[:, None] * stride_out + offs_n[None, :]
    out_mask = t_mask[:, None] & n_mask[None, :]
    if SPLIT == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # One launch, no buffer zeroed by the host: each program adds its partial sums into the float32 workspace
        # (atomics resolved in L2, nothing waits on them); the last program of this column block to arrive (counted
        # with an acq_rel atomic after a barrier, which orders every thread's additions before it) reads the sums,
        # writes the output in the model's dtype and leaves the workspace and the counter at zero for the next call.
        sum_ptrs = sum_ptr + offs_t[:, None] * N + offs_n[None, :]
        tl.atomic_add(sum_ptrs, acc, mask=out_mask, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.load(sum_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.store(sum_ptrs, tl.zeros((TP, BLOCK_N), dtype=tl.float32), mask=out_mask, cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + pid_n, 0)


@dataclass(frozen=True)
class GemvConfig:
    """Launch configuration: output columns per program, rows per step, programs over K, warps, pipeline stages."""

    block_n: int = 256
    block_k: int = 16
    split: int = 0  # programs over K; 0: `per_sm` programs per multiprocessor in all
    use_dot: bool = False  # True: tensor-core dot with the tokens padded to 16; False: float32 FMA in registers
    num_warps: int = 2
    num_stages: int = 3
    per_sm: int = 8


# The fastest (geometric mean) of 54 configurations swept on an H200 (`rana-hf bench --sweep`, float16, one token,
# 4096x4096, 4096x11008, 11008x4096 at 44% of rows kept): 9.7, 20.0 and 19.9 us; register FMA beat the tensor-core
# dot at every shape, and the best configurations were within 5% of each other.


DEFAULT_CONFIG = GemvConfig()

_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def masked_gemv_triton(
    x: torch.Tensor,
    wt: torch.Tensor,
    threshold: torch.Tensor,
    gate: torch.Tensor | None,
    act: int,
    config: GemvConfig | None = None,
    widths: tuple[int, ...] = (),
) -> torch.Tensor:
    """Launch the kernel: x [T, K] (T <= 16), wt [K, N], threshold [K] (or [S, K] with `widths`, S <= 3 column
    segments of wt with their own thresholds, as many columns as `widths` says) float32 -> [T, N] in x's dtype."""
    config = config or DEFAULT_CONFIG
    T, K = x.shape
    N = wt.shape[1]
    starts = _segment_starts(widths, N)
    block_n, tiles_n, split, k_per_program = _grid(config, T, K, N, x.device, starts)
    if block_n < _MIN_BLOCK_N:  # segment starts not aligned to a usable block: one launch per segment
        outs, start = [], 0
        for s, width in enumerate(widths):
            part = wt[:, start : start + width]
            outs.append(masked_gemv_triton(x, part, threshold[s], gate, act, config))
            start += width
        return torch.cat(outs, dim=1)
    out = torch.empty((T, N), device=x.device, dtype=x.dtype)
    sums, counter = _workspace(x.device, T, N, split, tiles_n)
    tokens_pad = 16 if config.use_dot else max(1, triton.next_power_of_2(T))
    _masked_gemv_kernel[(tiles_n, split)](
        x,
        gate if gate is not None else x,
        wt,
        threshold,
        out,
        sums,
        counter,
        T,
        K,
        N,
        x.stride(0),
        gate.stride(0) if gate is not None else 0,
        wt.stride(0),
        out.stride(0),
        threshold.stride(0) if widths else 0,
        starts[0],
        starts[1],
        K_PER_PROGRAM=k_per_program,
        SPLIT=split,
        GLU=gate is not None,
        ACT=act,
        TP=tokens_pad,
        BLOCK_K=config.block_k,
        BLOCK_N=block_n,
        USE_DOT=config.use_dot,
        UPCAST=_INTERPRETED,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


_MIN_BLOCK_N = 16


def _segment_starts(widths: tuple[int, ...], N: int) -> tuple[int, int]:
    """First columns of segments 1 and 2 (N for a segment that does not exist)."""
    if not widths:
        return N, N
    if len(widths) > 3 or sum(widths) != N:
        raise ValueError(f"column segments {widths} must be at most 3 and add up to the {N} columns of wt")
    starts = [sum(widths[: i + 1]) for i in range(len(widths) - 1)]
    return (*starts, N, N)[:2]


def _grid(
    config: GemvConfig, T: int, K: int, N: int, device: torch.device, starts: tuple[int, int] | None = None
) -> tuple[int, int, int, int]:
    """(columns per program, programs over N, programs over K, rows per program) of a launch; with segment `starts`
    the columns per program divide them (a result below `_MIN_BLOCK_N` means: launch per segment)."""
    block_n = min(config.block_n, max(16, triton.next_power_of_2(N)))
    for start in starts or ():
        if start < N:
            block_n = min(block_n, start & -start)  # the largest power of two dividing the start
    tiles_n = triton.cdiv(N, block_n)
    split = config.split or max(1, triton.cdiv(config.per_sm * _num_sms(device), tiles_n))
    split = max(1, min(split, triton.cdiv(K, config.block_k)))
    k_per_program = triton.cdiv(triton.cdiv(K, split), config.block_k) * config.block_k
    return block_n, tiles_n, triton.cdiv(K, k_per_program), k_per_program


def reserve_workspace(
    device: torch.device,
    K: int,
    N: int,
    max_tokens: int,
    config: GemvConfig | None = None,
    widths: tuple[int, ...] = (),
) -> None:
    """Make the workspaces of every launch of a [K, N] weight at 1..max_tokens tokens now, outside any CUDA graph:
    a workspace first made while `torch.compile`'s CUDA graphs warm up would live in their memory pool."""
    config = config or DEFAULT_CONFIG
    starts = _segment_starts(widths, N)
    for T in range(1, max_tokens + 1):
        block_n, tiles_n, split, _ = _grid(config, T, K, N, device, starts)
        if block_n < _MIN_BLOCK_N:
            for width in widths:
                reserve_workspace(device, K, width, max_tokens, config)
            return
        _workspace(device, T, N, split, tiles_n)


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, T: int, N: int, split: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 sums and arrival counters of split-K launches, made once per shape and reused: a call captured in a
    CUDA graph keeps their addresses (the first call of a shape, which makes them, must come before any capture; the
    decode step's warm-up runs do that). Calls run in stream order, and each leaves them at zero."""
    if split == 1:
        return torch.empty(0, device=device), torch.empty(0, device=device, dtype=torch.int32)
    key = (device, T, N, tiles)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (
            torch.zeros((T, N), device=device, dtype=torch.float32),
            torch.zeros(tiles, device=device, dtype=torch.int32),
        )
    return _WORKSPACES[key]

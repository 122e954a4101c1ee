"""The Triton input-masked GEMV kernel (imported only when Triton is installed; see `rana_hf.kernels.ops`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .ops import ACT_NONE


@triton.jit
def _activation(g, ACT: tl.constexpr):
    if ACT == 1:  # SiLU
        return g / (1.0 + tl.exp(-g))
    if ACT == 2:  # GELU, tanh approximation: tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * (1.0 - 1.0 / (1.0 + tl.exp(2.0 * z)))
    return g


@triton.jit
def _token_input(x_ptr, gate_ptr, t, T, stride_x, stride_gate, offs_k, k_mask, threshold, GLU: tl.constexpr, ACT):
    """Token t's kept inputs over the rows offs_k in float32 (zero where not kept), and which it keeps."""
    valid = k_mask & ((offs_k * 0 + t) < T)  # a tensor compare: Triton 3.9's interpreter refuses a scalar in a mask
    # inputs are read by every column block: keep them in L2
    x = tl.load(x_ptr + t * stride_x + offs_k, mask=valid, other=0.0, eviction_policy="evict_last")
    if GLU:
        gate = tl.load(gate_ptr + t * stride_gate + offs_k, mask=valid, other=0.0, eviction_policy="evict_last")
        # as the model computes it: act(gate) rounded to the dtype, times up, rounded to the dtype
        activated = _activation(gate.to(tl.float32), ACT).to(x.dtype)
        x = (activated.to(tl.float32) * x.to(tl.float32)).to(x.dtype)
    xf = x.to(tl.float32)
    keep = (tl.abs(xf) >= threshold) & valid
    return tl.where(keep, xf, 0.0), keep


@triton.jit
def _finish_token(acc, t, T, N, offs_n, n_mask, out_ptr, stride_out, sum_ptr, SPLIT: tl.constexpr):
    mask = n_mask & ((offs_n * 0 + t) < T)
    if SPLIT == 1:
        tl.store(out_ptr + t * stride_out + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(sum_ptr + t * N + offs_n, acc, mask=mask, sem="relaxed")


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
    rows_1,  # ROWS: segment 1's first input (of x and of the thresholds); segment 0 takes inputs 0..K-1
    K_1,  # ROWS: segment 1's number of inputs
    wt_offset_1,  # ROWS: where segment 1's weight [K_1, its columns] starts in wt (elements)
    stride_wt_1,  # ROWS: between the rows of segment 1's weight
    K_PER_PROGRAM: tl.constexpr,  # a multiple of BLOCK_K; constexpr: a static trip count (one build per shape)
    SPLIT: tl.constexpr,
    GLU: tl.constexpr,
    ACT: tl.constexpr,
    TP: tl.constexpr,  # 1, 2 or 4: tokens the build handles (T <= TP)
    ROWS: tl.constexpr,  # two segments with inputs and weights of their own (see `masked_gemv_triton`'s `rows`)
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent launch (`PDL`): wait for the previous kernel first
):
    if PDL:  # everything below may read what the previous kernel wrote
        tl.extra.cuda.gdc_wait()
    # Every tensor here is the weight tile [BLOCK_K, BLOCK_N] or one of its rows or columns, so the compiler keeps
    # them all in the tile's register layout: the inputs of a row block are loaded whole by each thread (an L1
    # broadcast) instead of being moved between layouts through shared memory, and with the warps side by side along
    # N (BLOCK_N >= 256 x warps) the sum over the rows stays inside each thread. Measured on an H200, this is what
    # took the kernel from ~2.0 to ~3.0 TB/s (the earlier [tokens, rows, columns] product went through shared memory
    # and a barrier every step).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = pid_k * K_PER_PROGRAM
    # column segments (q, k and v, or gate and up, side by side) each have their own thresholds; BLOCK_N divides the
    # segment starts, so a program's columns lie in one segment
    column = pid_n * BLOCK_N
    segment = (column >= start_1).to(tl.int32) + (column >= start_2).to(tl.int32)
    threshold_ptr += segment * stride_threshold
    if ROWS:  # segment 1 reads its own inputs (a later part of x and of the thresholds) and its own weight
        x_ptr += segment * rows_1
        threshold_ptr += segment * rows_1
        wt_ptr += segment * wt_offset_1
        K += segment * (K_1 - K)
        stride_wt += segment * (stride_wt_1 - stride_wt)
        first_column = segment * start_1  # the weight's columns count from the segment's first
    else:
        first_column = 0
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for step in range(0, K_PER_PROGRAM, BLOCK_K):
        offs_k = k_start + step + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        threshold = tl.load(threshold_ptr + offs_k, mask=k_mask, other=float("inf"), eviction_policy="evict_last")
        x0, rows = _token_input(x_ptr, gate_ptr, 0, T, stride_x, stride_gate, offs_k, k_mask, threshold, GLU, ACT)
        if TP > 1:
            x1, keep = _token_input(x_ptr, gate_ptr, 1, T, stride_x, stride_gate, offs_k, k_mask, threshold, GLU, ACT)
            rows = rows | keep
        if TP > 2:
            x2, keep = _token_input(x_ptr, gate_ptr, 2, T, stride_x, stride_gate, offs_k, k_mask, threshold, GLU, ACT)
            rows = rows | keep
            x3, keep = _token_input(x_ptr, gate_ptr, 3, T, stride_x, stride_gate, offs_k, k_mask, threshold, GLU, ACT)
            rows = rows | keep
        # only rows some token keeps are read; weight rows are read once: stream them
        w = tl.load(
            wt_ptr + offs_k[:, None] * stride_wt + (offs_n - first_column)[None, :],
            mask=rows[:, None] & n_mask[None, :],
            other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)
        acc0 += tl.sum(x0[:, None] * w, axis=0)
        if TP > 1:
            acc1 += tl.sum(x1[:, None] * w, axis=0)
        if TP > 2:
            acc2 += tl.sum(x2[:, None] * w, axis=0)
            acc3 += tl.sum(x3[:, None] * w, axis=0)
    if PDL:  # the next kernel may be launched now; it waits for this one's writes in its own `gdc_wait`
        tl.extra.cuda.gdc_launch_dependents()
    # SPLIT == 1: each token's row of the output. SPLIT > 1: one launch, no buffer zeroed by the host. Each program
    # adds its partial sums into the float32 workspace (atomics resolved in L2, nothing waits on them); the last
    # program of this column block to arrive (counted with an acq_rel atomic after a barrier, which orders every
    # thread's additions before it) reads the sums, writes the output in the model's dtype and leaves the workspace
    # and the counter at zero for the next call.
    _finish_token(acc0, 0, T, N, offs_n, n_mask, out_ptr, stride_out, sum_ptr, SPLIT)
    if TP > 1:
        _finish_token(acc1, 1, T, N, offs_n, n_mask, out_ptr, stride_out, sum_ptr, SPLIT)
    if TP > 2:
        _finish_token(acc2, 2, T, N, offs_n, n_mask, out_ptr, stride_out, sum_ptr, SPLIT)
        _finish_token(acc3, 3, T, N, offs_n, n_mask, out_ptr, stride_out, sum_ptr, SPLIT)
    if SPLIT > 1:
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            for t in tl.static_range(TP):
                sums = sum_ptr + t * N + offs_n
                mask = n_mask & ((offs_n * 0 + t) < T)
                total = tl.load(sums, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + t * stride_out + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(sums, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=mask, cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + pid_n, 0)


@dataclass(frozen=True)
class GemvConfig:
    """Launch configuration: output columns per program, rows per step, programs over K, warps."""

    block_n: int = 256
    block_k: int = 32
    split: int = 0  # programs over K; 0: `per_sm` (one token) or `per_sm_multi` programs per multiprocessor in all
    num_warps: int = 1
    per_sm: int = 8
    per_sm_multi: int = 8
    block_k_multi: int = 0  # rows per step at 2+ tokens; 0: block_k
    max_rows_multi: int = 192  # at 2+ tokens a program reads at most this many rows (0: no cap)

    def rows_per_step(self, tokens: int) -> int:
        """Rows of the weight tile per step for a launch of `tokens` tokens."""
        return self.block_k_multi if tokens > 1 and self.block_k_multi else self.block_k

    def __post_init__(self):
        if self.num_warps not in (1, 2):
            # 4 warps with 1024 columns per program gave wrong sums on the H200 (Triton 3.6), for reasons not found;
            # 1 and 2 warps matched the reference at every shape tried
            raise ValueError(f"num_warps must be 1 or 2, not {self.num_warps}")


# Swept on an H200 (26 configurations, float16, 56% of rows kept; `rana-hf bench --sweep` repeats such a sweep): one
# warp, 256 columns and 32 rows per step had the best geometric mean at one token with 8 programs per multiprocessor
# (4096x4096, 4096x11008, 11008x4096 and the stacked 4096x12288 and 4096x22016: 8.9, 17.4, 17.7, 18.5 and 29.4 us,
# 2.1-3.5 TB/s on the rows read, against 12.6, 25.8, 26.9, 27.3 and 46.6 us for cuBLAS's dense product), and at two
# tokens with 16 (12.6, 23.8, 24.2, 25.8, 42.1 us: 81% of rows read, near cuBLAS). Timed again on 2026-11-29 at 2
# tokens (4096x4096 and 4096x11008 as column slices of the stacked weights, 11008x4096; rotating weights in one CUDA
# graph): 8 programs per multiprocessor gave 11.9, 23.1 and 23.1 us, 16 gave 13.0, 24.0 and 24.3, and cuBLAS 12.7,
# 24.8 and 26.9; 16 rows per step were slower at both depths (12.8-36.5 us), 64 much slower (23.7-77.9 us). At 3 and 4
# tokens the best tile (16 rows, 8 per multiprocessor: 15.3-16.0, 32.5-33.6, 33.0-33.6 us) stays 1.2-1.35x behind
# cuBLAS (12.7, 24.5-25.0, 26.9-27.4 us): 92-96% of rows are read there, so `DECODE_KERNEL_TOKENS` stays 2.
# The launches as the model makes them, timed on 2026-11-29 at 2 tokens (81% of rows read): the stacked q/k/v
# (4096x12288, 3 segments) and the down projection (11008x4096, act(gate)*up fused) are best at 8 per multiprocessor,
# 192 rows per program (24.2 and 23.4 us; cuBLAS 26.9 and 26.1), but the stacked gate/up (4096x22016), whose 86
# column tiles leave 13 programs over K of 320 rows at that depth, took 53.8 us against cuBLAS's 46.6; with at most
# 192 rows per program (22 over K) it took 41.9 us, and 41.0 at 24 per multiprocessor. Hence `max_rows_multi`. At one
# token 320 rows stay the better (29.1 against 33.3 us at 192).


# Register use per thread for sm_90 (`rana-hf bench --registers`: compiled on the CPU, read from the cubin; Triton 3.6,
# 1 warp, 256 columns): 32 rows per step use all 255 registers and spill to a 216-byte stack at 1 token, 488 at 2 and
# 872 at 4; 16 rows use 188 and 241 registers at 1 and 2 tokens without spilling, and a 24-byte stack at 4. The
# 32-row tile is still the faster at 1 and 2 tokens on the H200 (above), spills and all; 16 rows win only at 3-4
# tokens, which take cuBLAS anyway. `rana-hf bench --sweep --sweep-tokens 1,2,4` times both and sets `block_k_multi`.
DEFAULT_CONFIG = GemvConfig()
# Row-segmented launches (gate and up rank adapters, `masked_gemv_triton`'s `rows`), timed on an H200 at the Llama-2-7B
# shape at 0.44 (ranks 2624 of 4096, 11008 columns each, half the codes kept; float16, rotating weights, CUDA graphs):
# at one token the default took 20.1 us against 25.2 for the two layers' launches; at two tokens it took 35.0 against
# 31.7 (its 86 column tiles at 192 rows per program leave 14 programs over K), and with 16 programs per multiprocessor
# (21 over K, 128 rows each: the depth of each layer's own launch) 28.4.
ROWS_CONFIG = GemvConfig(per_sm_multi=16)

# Launch the kernel as a programmatic dependent launch (Hopper and newer): its programs may be scheduled while the
# previous kernel of the stream finishes, and wait for its writes (`gdc_wait`) before reading anything; a decode step
# is a chain of dependent launches (router codes, then the masked read of `A`), each a few microseconds long. False:
# plain launches (read at each launch; a CUDA graph keeps the launches it captured).
PDL = True

_PROPERTIES: dict[int, object] = {}  # CUDA device index: its properties, read once


def _properties(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROPERTIES:
        _PROPERTIES[index] = torch.cuda.get_device_properties(index)
    return _PROPERTIES[index]


def _pdl_capable(device: torch.device) -> bool:
    return device.type == "cuda" and _properties(device).major >= 9


def _num_sms(device: torch.device) -> int:
    return _properties(device).multi_processor_count if device.type == "cuda" else 4


def masked_gemv_triton(
    x: torch.Tensor,
    wt: torch.Tensor,
    threshold: torch.Tensor,
    gate: torch.Tensor | None,
    act: int,
    config: GemvConfig | None = None,
    widths: tuple[int, ...] = (),
    rows: tuple[int, ...] = (),
) -> torch.Tensor:
    """Launch the kernel: x [T, K] (T <= 4), wt [K, N], threshold [K] (or [S, K] with `widths`, S <= 3 column
    segments of wt with their own thresholds, as many columns as `widths` says) float32 -> [T, N] in x's dtype.

    With `rows` (two segments, `(K_0, K_1)`): each segment has inputs and a weight of its own, as two rank adapters
    with routers of their own (gate and up) have: x [T, K_0 + K_1] (segment 0's inputs, then segment 1's), threshold
    [K_0 + K_1], wt the two weights `[K_s, widths[s]]` one after the other, flat -> [T, widths[0] + widths[1]]."""
    if rows:
        return _masked_gemv_rows(x, wt, threshold, config or ROWS_CONFIG, widths, rows)
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
    return _launch(x, gate, act, wt, threshold, config, (N, block_n, tiles_n, split, k_per_program), starts, widths)


def _masked_gemv_rows(
    x: torch.Tensor,
    wt: torch.Tensor,
    threshold: torch.Tensor,
    config: GemvConfig,
    widths: tuple[int, ...],
    rows: tuple[int, ...],
) -> torch.Tensor:
    """`masked_gemv_triton` with `rows`: two segments with inputs and weights of their own, in one launch."""
    if len(rows) != 2 or len(widths) != 2:
        raise ValueError(f"row segments take two segments, with widths and rows each: {widths}, {rows}")
    elements = rows[0] * widths[0] + rows[1] * widths[1]
    if x.shape[1] != sum(rows) or threshold.shape != (sum(rows),) or wt.shape != (elements,):
        raise ValueError(
            f"row segments {rows} by {widths}: x [T, {sum(rows)}], threshold [{sum(rows)}] and a flat wt of "
            f"{elements} elements; got {tuple(x.shape)}, {tuple(threshold.shape)}, "
            f"{tuple(wt.shape)}"
        )
    T = x.shape[0]
    N = sum(widths)
    starts = _segment_starts(widths, N)
    block_n, tiles_n, split, k_per_program = _grid(config, T, max(rows), N, x.device, starts)
    weights = (wt[: rows[0] * widths[0]].view(rows[0], widths[0]), wt[rows[0] * widths[0] :].view(rows[1], widths[1]))
    if block_n < _MIN_BLOCK_N:  # one launch per segment
        parts = (x[:, : rows[0]], x[:, rows[0] :])
        limits = (threshold[: rows[0]], threshold[rows[0] :])
        return torch.cat(
            [
                masked_gemv_triton(*operands, None, ACT_NONE, config)
                for operands in zip(parts, weights, limits, strict=True)
            ],
            dim=1,
        )
    segment_1 = (rows[0], rows[1], rows[0] * widths[0], widths[1])
    return _launch(
        x,
        None,
        ACT_NONE,
        weights[0],
        threshold,
        config,
        (N, block_n, tiles_n, split, k_per_program),
        starts,
        (),
        segment_1,
    )


def _launch(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    act: int,
    wt: torch.Tensor,
    threshold: torch.Tensor,
    config: GemvConfig,
    grid: tuple[int, int, int, int, int],
    starts: tuple[int, int],
    widths: tuple[int, ...],
    segment_1: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """One launch of the kernel over `grid` (columns, columns per program, programs over N and over K, rows per
    program); `segment_1`: (first input, inputs, weight offset, weight row stride) of a row-segmented launch's second
    segment, `wt` its first segment's weight."""
    N, block_n, tiles_n, split, k_per_program = grid
    T, K = x.shape[0], wt.shape[0]
    if T > 4:
        raise ValueError(f"the kernel takes at most 4 tokens, not {T}")
    out = torch.empty((T, N), device=x.device, dtype=x.dtype)
    sums, counter = _workspace(x.device, T, N, split, tiles_n)
    pdl = PDL and _pdl_capable(x.device)
    rows_1, K_1, wt_offset_1, stride_wt_1 = segment_1 or (0, 0, 0, 0)
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
        rows_1,
        K_1,
        wt_offset_1,
        stride_wt_1,
        K_PER_PROGRAM=k_per_program,
        SPLIT=split,
        GLU=gate is not None,
        ACT=act,
        TP=triton.next_power_of_2(T),
        ROWS=segment_1 is not None,
        BLOCK_K=config.rows_per_step(T),
        BLOCK_N=block_n,
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=1,
        launch_pdl=pdl,
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
    if config.split:  # an explicit split rules
        split = config.split
    else:
        per_sm = config.per_sm if T == 1 else config.per_sm_multi
        split = max(1, triton.cdiv(per_sm * _num_sms(device), tiles_n))
        if T > 1 and config.max_rows_multi:
            split = max(split, triton.cdiv(K, config.max_rows_multi))
    block_k = config.rows_per_step(T)
    split = max(1, min(split, triton.cdiv(K, block_k)))
    k_per_program = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
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


@triton.jit
def _masked_inputs_kernel(
    x_ptr,  # [M, K]
    threshold_ptr,  # [S, K] float32
    out_ptr,  # [S, M, K] in x's dtype
    M,
    K,
    stride_x,
    stride_threshold,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    segment = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    mask = (offs_m < M)[:, None] & k_mask[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0)
    threshold = tl.load(threshold_ptr + segment * stride_threshold + offs_k, mask=k_mask, other=float("inf"))
    keep = tl.abs(x.to(tl.float32)) >= threshold[None, :]
    out = tl.where(keep, x, tl.zeros_like(x))
    tl.store(out_ptr + segment * M * K + offs_m[:, None] * K + offs_k[None, :], out, mask=mask)


def masked_inputs_triton(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """One launch: x [M, K] (unit stride along K), threshold [S, K] float32 -> [S, M, K], input i of row m kept for
    segment s when |x[m, i]| >= threshold[s, i], else zero."""
    M, K = x.shape
    S = threshold.shape[0]
    out = torch.empty((S, M, K), device=x.device, dtype=x.dtype)
    block_m, block_k = 16, 256
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k), S)
    _masked_inputs_kernel[grid](
        x, threshold, out, M, K, x.stride(0), threshold.stride(0), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4
    )
    return out


def resource_usage(config: GemvConfig, tokens: int, glu: bool = False, arch: int = 90) -> dict[str, int]:
    """Registers per thread and stack bytes per thread (where the registers spill) of the masked GEMV built for
    `tokens` tokens (float16) on an sm_`arch` GPU. Compiled on this machine; no GPU needed. The counts come from
    the cuobjdump bundled with Triton, read from the compiled cubin."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(_masked_gemv_kernel, triton.runtime.JITFunction):
        raise RuntimeError("the kernel was imported under TRITON_INTERPRET=1 (the interpreter): unset it to compile")
    pointers = dict(x_ptr="*fp16", gate_ptr="*fp16", wt_ptr="*fp16", threshold_ptr="*fp32", out_ptr="*fp16")
    pointers |= dict(sum_ptr="*fp32", counter_ptr="*i32")
    integers = ("T", "K", "N", "stride_x", "stride_gate", "stride_wt", "stride_out", "stride_threshold")
    integers += ("start_1", "start_2", "rows_1", "K_1", "wt_offset_1", "stride_wt_1")
    block_k = config.rows_per_step(tokens)
    constants = dict(K_PER_PROGRAM=8 * block_k, SPLIT=8, GLU=glu, ACT=1 if glu else 0)
    constants |= dict(TP=triton.next_power_of_2(tokens), ROWS=False, BLOCK_K=block_k, BLOCK_N=config.block_n)
    constants |= dict(PDL=False)  # the launch attribute only: registers and stack are those of a plain launch
    signature = pointers | dict.fromkeys(integers, "i32") | dict.fromkeys(constants, "constexpr")
    source = ASTSource(fn=_masked_gemv_kernel, signature=signature, constexprs=constants)
    options = {"num_warps": config.num_warps, "num_stages": 1}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        report = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    found = re.search(r"REG:(\d+) STACK:(\d+)", report.stdout)
    if found is None:
        raise RuntimeError(f"no resource line in cuobjdump's output: {report.stdout[-300:]!r}")
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))}

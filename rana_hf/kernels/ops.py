"""`torch.library` custom ops over the Triton kernels, their fake (meta) implementations and the torch reference.

`torch.compile(fullgraph=True)` traces `rana_hf::masked_gemv` as one opaque op through its fake implementation, and
the op launches nothing that synchronises with the host, so it can be captured in a CUDA graph. The kernel has no
autotuning: its launch configuration is a pure function of the shapes (nothing is tuned during a capture).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import torch
from torch.nn import functional as F

MAX_KERNEL_TOKENS = 4  # the kernel takes at most this many tokens; prefill takes the torch path
# Decode steps of up to this many tokens take the kernel in `prepare_for_decode`'s layers; larger batches take the
# torch path (input mask, then cuBLAS), which `torch.compile` fuses. Measured on an H200 (`rana-hf bench`, 7B shapes,
# 56% of each token's inputs kept, 2026-11-29): the kernel is 1.43-1.55x cuBLAS at 1 token, 1.07-1.16x at 2 (8
# programs per multiprocessor; 0.96-1.09x with 16), 0.75-0.83x at 3-4 with its best tile, because the rows some token
# keeps grow with the batch (55%, 81%, 92%, 96%) while cuBLAS reads every row at a higher rate.
DECODE_KERNEL_TOKENS = 2
ACT_NONE, ACT_SILU, ACT_GELU_TANH = 0, 1, 2
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def kernels_available() -> bool:
    """True when Triton is installed and a CUDA device is visible (the kernel path can run)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def kernel_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes these operands: CUDA, float16/bfloat16 alike, at most `MAX_KERNEL_TOKENS` rows."""
    return (
        x.is_cuda
        and x.dtype in KERNEL_DTYPES
        and weight.dtype == x.dtype
        and x.dim() == 2
        and x.shape[0] <= MAX_KERNEL_TOKENS
        and kernels_available()
    )


def activation_code(activation) -> int | None:
    """The kernel's code for an MLP activation module (SiLU, GELU-tanh), or None if the kernel has no fused form."""
    name = type(activation).__name__
    if name in ("SiLU", "SiLUActivation"):
        return ACT_SILU
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh"):
        return ACT_GELU_TANH
    if isinstance(activation, torch.nn.GELU) and activation.approximate == "tanh":
        return ACT_GELU_TANH
    return None


def glu_input(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    """`act(gate) * up` as a gated MLP computes it in the operands' dtype."""
    if act == ACT_SILU:
        activated = F.silu(gate)
    elif act == ACT_GELU_TANH:
        activated = F.gelu(gate, approximate="tanh")
    else:
        raise ValueError(f"unknown activation code {act}")
    return activated * up


def masked_gemv_reference(
    x: torch.Tensor,
    wt: torch.Tensor,
    threshold: torch.Tensor,
    gate: torch.Tensor | None = None,
    act: int = ACT_NONE,
    widths: Sequence[int] = (),
    rows: Sequence[int] = (),
) -> torch.Tensor:
    """The op in plain torch: x [T, K] (with `gate`, the `up` of `act(gate) * up`), wt [K, N], threshold [K] -> [T, N].

    Input `i` of token `t` contributes when `|x[t, i]| >= threshold[i]` (float32 compare). With `widths`, the columns
    of `wt` are that many segments side by side, and segment `s` uses the thresholds `threshold[s]` ([S, K]). With
    `rows` as well, segment `s` has inputs and a weight of its own: its `rows[s]` inputs of x (and thresholds) follow
    the earlier segments', and `wt` holds the segments' weights [rows[s], widths[s]] one after the other, flat.
    """
    if rows:
        outs, first, offset = [], 0, 0
        for count, width in zip(rows, widths, strict=True):
            part = wt[offset : offset + count * width].view(count, width)
            outs.append(masked_gemv_reference(x[..., first : first + count], part, threshold[first : first + count]))
            first, offset = first + count, offset + count * width
        return torch.cat(outs, dim=-1)
    if gate is not None:
        x = glu_input(gate, x, act)
    if widths:
        outs, start = [], 0
        for s, width in enumerate(widths):
            outs.append(masked_gemv_reference(x, wt[:, start : start + width], threshold[s]))
            start += width
        return torch.cat(outs, dim=-1)
    return masked_inputs_reference(x, threshold.reshape(1, -1))[0] @ wt


def masked_inputs_reference(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """x [..., K], threshold [S, K] -> [S, ..., K]: input i kept for segment s when `|x_i| >= threshold[s, i]` (float32
    compare), else zero."""
    shape = (threshold.shape[0],) + (1,) * (x.dim() - 1) + (x.shape[-1],)
    keep = x.float().abs().unsqueeze(0) >= threshold.float().reshape(shape)
    return x.unsqueeze(0) * keep.to(x.dtype)


def reserve_workspace(wt: torch.Tensor, max_tokens: int, widths: Sequence[int] = (), rows: Sequence[int] = ()) -> None:
    """Allocate the kernel's workspaces for a [K, N] weight (with `rows`: the flat weights of row segments) at up to
    `max_tokens` tokens (when the kernel can run on it): done when a model is prepared, so that none is first made
    inside a CUDA graph or its warm-up."""
    if wt.is_cuda and wt.dtype in KERNEL_DTYPES and max_tokens > 0 and kernels_available():
        from .triton_gemv import ROWS_CONFIG
        from .triton_gemv import reserve_workspace as reserve

        K, N = (max(rows), sum(widths)) if rows else wt.shape
        config = ROWS_CONFIG if rows else None
        reserve(wt.device, K, N, min(max_tokens, MAX_KERNEL_TOKENS), config, widths=tuple(widths))


def _direct(x: torch.Tensor) -> bool:
    """Call an op's implementation without the custom op around it: outside `torch.compile` (which needs the op's fake
    implementation) and outside autograd (the ops have no backward; through the op, backward raises). The dispatch of
    a custom op costs tens of microseconds of host time per call in eager mode (measured on the CPU: about 40 µs per
    call, half of what a 32-layer prefill through input adapters added to the dense model's host time)."""
    return not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad)


def _masked_gemv_impl(
    x: torch.Tensor,
    wt: torch.Tensor,
    threshold: torch.Tensor,
    gate: torch.Tensor | None,
    act: int,
    widths: list[int],
    rows: list[int],
) -> torch.Tensor:
    if kernel_supports(x, wt):
        from .triton_gemv import masked_gemv_triton

        return masked_gemv_triton(x, wt, threshold, gate, act, widths=tuple(widths), rows=tuple(rows))
    return masked_gemv_reference(x, wt, threshold, gate, act, widths, rows)


_masked_gemv_op = torch.library.custom_op("rana_hf::masked_gemv", mutates_args=())(_masked_gemv_impl)


@_masked_gemv_op.register_fake
def _(x, wt, threshold, gate, act, widths, rows):
    return x.new_empty((x.shape[0], sum(widths) if rows else wt.shape[1]))


def _masked_inputs_impl(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and x.dtype in KERNEL_DTYPES and x.stride(-1) == 1 and kernels_available():
        from .triton_gemv import masked_inputs_triton

        return masked_inputs_triton(x, threshold)
    return masked_inputs_reference(x, threshold)


_masked_inputs_op = torch.library.custom_op("rana_hf::masked_inputs", mutates_args=())(_masked_inputs_impl)


@_masked_inputs_op.register_fake
def _(x, threshold):
    return x.new_empty((threshold.shape[0], *x.shape))


def masked_inputs(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The inputs of several input-masked linears that read the same `x`, masked each with its thresholds, in one
    launch (the Triton kernel on CUDA in float16/bfloat16, else the torch reference): x [..., K], threshold [S, K]
    float32 -> [S, ..., K] in x's dtype, zero where `|x| < threshold[s]`. Prefill then multiplies each with cuBLAS."""
    threshold = threshold.reshape(-1, x.shape[-1])
    op = _masked_inputs_impl if _direct(x) else _masked_inputs_op
    out = op(x.reshape(-1, x.shape[-1]), threshold)
    return out.reshape(threshold.shape[0], *x.shape)


def masked_gemv(
    x: torch.Tensor,
    wt: torch.Tensor,
    threshold: torch.Tensor,
    gate: torch.Tensor | None = None,
    act: int = ACT_NONE,
    widths: Sequence[int] = (),
    rows: Sequence[int] = (),
) -> torch.Tensor:
    """Input-masked product `(x * keep) @ wt` for any leading shape: the Triton kernel when it supports the operands
    (CUDA, float16/bfloat16, at most `MAX_KERNEL_TOKENS` tokens), else the torch reference.

    Args:
        x: [..., K] inputs (with `gate`: the `up` projection's output).
        wt: [K, N] transposed weight (row `i` multiplies input `i`), contiguous rows.
        threshold: [K] float32 per-input thresholds on `|x|`; [S, K] with `widths`.
        gate: optional [..., K] gate pre-activations: the input is then `act(gate) * x`, computed in the load.
        act: `ACT_SILU` or `ACT_GELU_TANH` with `gate`.
        widths: optional column counts of up to 3 segments of `wt` (e.g. q, k and v stacked), each masked with its own
            row of `threshold`: one launch computes them all.
        rows: with two `widths`: the inputs of two segments that have inputs and weights of their own (gate and up
            rank adapters, each with its router's codes): x [..., rows[0] + rows[1]], threshold [rows[0] + rows[1]],
            wt their weights [rows[s], widths[s]] one after the other, flat. One launch computes both.

    Returns:
        [..., N] in x's dtype.
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    flat_gate = gate.reshape(-1, gate.shape[-1]) if gate is not None else None
    op = _masked_gemv_impl if _direct(x) else _masked_gemv_op
    out = op(flat, wt, threshold, flat_gate, act, list(widths), list(rows))
    return out.reshape(*lead, out.shape[-1])

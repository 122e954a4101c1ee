"""The input-masked GEMV: kernel against the torch reference on fresh random inputs, dispatch, and tracing.

On a machine without CUDA the Triton kernel runs in Triton's CPU interpreter (`TRITON_INTERPRET=1`), which checks its
indexing, masking and fused activation; the interpreter multiplies bfloat16 wrongly and rounds bfloat16 by truncation,
so there the kernel upcasts its operands and the bfloat16 cases with a fused activation run on the GPU only.
"""

from __future__ import annotations

import os

import pytest
import torch

from rana_hf.kernels import (
    ACT_GELU_TANH,
    ACT_NONE,
    ACT_SILU,
    MAX_KERNEL_TOKENS,
    kernel_supports,
    masked_gemv,
    masked_gemv_reference,
    masked_inputs,
    masked_inputs_reference,
)
from rana_hf.kernels.ops import glu_input

try:
    from rana_hf.kernels.triton_gemv import GemvConfig
except ImportError:  # no Triton: the kernel tests skip
    GemvConfig = None

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py on machines without a GPU


def _operands(T, K, N, dtype, act, device, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=generator).to(device, dtype)
    wt = (torch.randn(K, N, generator=generator) / K**0.5).to(device, dtype)
    gate = torch.randn(T, K, generator=generator).to(device, dtype) if act != ACT_NONE else None
    threshold = (torch.rand(K, generator=generator) * 0.8).to(device)
    threshold[: K // 7] = float("inf")  # some inputs never kept: their rows must not matter
    return x, wt, threshold, gate


def _exact(x, wt, threshold, gate, act):
    """float64 product of the inputs the op keeps (the mask decided as the op decides it)."""
    h = glu_input(gate, x, act) if gate is not None else x
    keep = h.float().abs() >= threshold
    return (h.double() * keep) @ wt.double()


SHAPES = [(1, 200, 300), (2, 256, 96), (3, 130, 40), (4, 512, 136)]
CASES = [(dtype, act) for dtype in (torch.float16, torch.bfloat16) for act in (ACT_NONE, ACT_SILU, ACT_GELU_TANH)]


# the default (split-K summed by atomics), two warps with small tiles, and a single pass (no split)
CONFIGS = (
    [
        GemvConfig(),
        GemvConfig(block_n=64, block_k=16, num_warps=2, per_sm=32),
        GemvConfig(block_n=32, split=1),
        GemvConfig(block_k=64, block_k_multi=16),  # other rows per step at 2+ tokens
    ]
    if GemvConfig
    else [None] * 4
)


@pytest.mark.parametrize("config", CONFIGS, ids=["split", "two-warps", "single", "rows-multi"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,act", CASES)
def test_kernel_matches_reference(shape, dtype, act, config):
    pytest.importorskip("triton")
    if not CUDA and not INTERPRETED:
        pytest.skip("no GPU and no Triton interpreter")
    if not CUDA and dtype == torch.bfloat16 and act != ACT_NONE:
        pytest.skip("the CPU interpreter rounds bfloat16 by truncation; this case runs on the GPU")
    from rana_hf.kernels.triton_gemv import masked_gemv_triton

    device = "cuda" if CUDA else "cpu"
    for seed in range(2):  # fresh inputs each time
        x, wt, threshold, gate = _operands(*shape, dtype, act, device, seed)
        out = masked_gemv_triton(x, wt, threshold, gate, act, config)
        assert out.shape == (shape[0], shape[2]) and out.dtype == dtype
        expected = _exact(x, wt, threshold, gate, act)
        error = float((out.double() - expected).norm() / expected.norm())
        assert error < (4e-3 if dtype == torch.float16 else 8e-3), (shape, dtype, act, error)


# q, k and v side by side (k/v narrower, as with grouped-query attention), gate and up, and segment starts that no
# usable block divides (the launcher then runs one launch per segment)
SEGMENTS = [(64, 32, 32), (48, 48), (40, 24, 8)]


@pytest.mark.parametrize("widths", SEGMENTS, ids=["qkv", "gate-up", "unaligned"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_segmented_kernel_matches_reference(widths, T, dtype):
    """Column segments of wt, each masked with its own thresholds, in one launch."""
    pytest.importorskip("triton")
    if not CUDA and not INTERPRETED:
        pytest.skip("no GPU and no Triton interpreter")
    from rana_hf.kernels.triton_gemv import masked_gemv_triton

    device = "cuda" if CUDA else "cpu"
    K, N = 96, sum(widths)
    x, wt, _, _ = _operands(T, K, N, dtype, ACT_NONE, device, 5)
    generator = torch.Generator().manual_seed(6)
    threshold = (torch.rand(len(widths), K, generator=generator) * 1.2).to(device)
    out = masked_gemv_triton(x, wt, threshold, None, ACT_NONE, widths=widths)
    parts, start = [], 0
    for s, width in enumerate(widths):  # each segment alone, as its own linear would compute it
        parts.append(_exact(x, wt[:, start : start + width], threshold[s], None, ACT_NONE))
        start += width
    expected = torch.cat(parts, dim=1)
    assert float((out.double() - expected).norm() / expected.norm()) < 8e-3
    reference = masked_gemv_reference(x.float(), wt.float(), threshold, widths=widths)
    torch.testing.assert_close(reference.double(), expected, rtol=1e-4, atol=1e-4)


# gate and up rank adapters (equal widths, ranks that differ under global allocation), unequal widths, and a split
# that no usable block divides (one launch per segment)
ROW_SEGMENTS = [((96, 80), (64, 64)), ((40, 100), (64, 32)), ((50, 50), (40, 24))]


@pytest.mark.parametrize("rows,widths", ROW_SEGMENTS, ids=["gate-up", "unequal", "unaligned"])
@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_segmented_kernel_matches_reference(rows, widths, T, dtype):
    """Two segments with inputs and weights of their own (gate's and up's router codes side by side, their `A^T`
    one after the other, flat) in one launch: each segment as its own masked product would compute it."""
    pytest.importorskip("triton")
    if not CUDA and not INTERPRETED:
        pytest.skip("no GPU and no Triton interpreter")
    from rana_hf.kernels.triton_gemv import masked_gemv_triton

    device = "cuda" if CUDA else "cpu"
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(T, sum(rows), generator=generator).to(device, dtype)
    weights = [
        (torch.randn(k, n, generator=generator) / k**0.5).to(device, dtype) for k, n in zip(rows, widths, strict=True)
    ]
    threshold = (torch.rand(sum(rows), generator=generator) * 1.2).to(device)
    threshold[rows[0] : rows[0] + 5] = float("inf")  # inputs of segment 1 never kept
    flat = torch.cat([w.reshape(-1) for w in weights])
    parts = [
        _exact(x[:, : rows[0]], weights[0], threshold[: rows[0]], None, ACT_NONE),
        _exact(x[:, rows[0] :], weights[1], threshold[rows[0] :], None, ACT_NONE),
    ]
    expected = torch.cat(parts, dim=1)
    for config in CONFIGS[:3]:
        out = masked_gemv_triton(x, flat, threshold, None, ACT_NONE, config, widths=widths, rows=rows)
        assert out.shape == (T, sum(widths)) and out.dtype == dtype
        assert float((out.double() - expected).norm() / expected.norm()) < 8e-3, config
    reference = masked_gemv_reference(x.float(), flat.float(), threshold, widths=widths, rows=rows)
    torch.testing.assert_close(reference.double(), expected, rtol=1e-4, atol=1e-4)
    through_op = masked_gemv(x[None], flat, threshold, widths=widths, rows=rows)  # any leading shape
    assert through_op.shape == (1, T, sum(widths))


def test_row_segments_refuse_operands_that_do_not_fit():
    pytest.importorskip("triton")
    from rana_hf.kernels.triton_gemv import masked_gemv_triton

    x, flat, threshold = torch.zeros(1, 10), torch.zeros(6 * 4 + 4 * 4 + 1), torch.zeros(10)
    with pytest.raises(ValueError, match="row segments"):
        masked_gemv_triton(x, flat, threshold, None, ACT_NONE, widths=(4, 4), rows=(6, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,S", [(1, 96, 1), (37, 300, 3), (130, 513, 2)])
def test_masked_inputs_kernel_matches_reference(M, K, S, dtype):
    """Prefill's masking launch: each segment's copy of the input, zero where |x| is under its threshold."""
    pytest.importorskip("triton")
    if not CUDA and not INTERPRETED:
        pytest.skip("no GPU and no Triton interpreter")
    from rana_hf.kernels.triton_gemv import masked_inputs_triton

    device = "cuda" if CUDA else "cpu"
    generator = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=generator).to(device, dtype)
    threshold = (torch.rand(S, K, generator=generator) * 1.5).to(device)
    threshold[0, : K // 5] = float("inf")
    out = masked_inputs_triton(x, threshold)
    assert out.shape == (S, M, K) and out.dtype == dtype
    expected = torch.stack([torch.where(x.float().abs() >= threshold[s], x.float(), 0.0) for s in range(S)])
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0)
    torch.testing.assert_close(masked_inputs_reference(x, threshold).float(), expected, rtol=0, atol=0)


def test_masked_inputs_keeps_the_leading_shape():
    x = torch.randn(2, 5, 16)
    threshold = torch.rand(3, 16)
    out = masked_inputs(x, threshold)
    assert out.shape == (3, 2, 5, 16)
    for s in range(3):
        torch.testing.assert_close(out[s], x * (x.abs() >= threshold[s]))


def test_reference_and_dispatch_on_cpu():
    x, wt, threshold, gate = _operands(3, 64, 32, torch.float32, ACT_SILU, "cpu", 0)
    assert not kernel_supports(x, wt)  # CPU, float32: the reference path
    out = masked_gemv(x[None], wt, threshold, gate[None], ACT_SILU)  # any leading shape
    assert out.shape == (1, 3, 32)
    torch.testing.assert_close(out[0].double(), _exact(x, wt, threshold, gate, ACT_SILU), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], masked_gemv_reference(x, wt, threshold, gate, ACT_SILU))


def test_op_traces_in_one_graph():
    x, wt, threshold, _ = _operands(2, 64, 32, torch.float32, ACT_NONE, "cpu", 1)
    compiled = torch.compile(lambda a: masked_gemv(a, wt, threshold) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), masked_gemv_reference(x, wt, threshold) * 2)


def test_eager_inference_calls_the_implementation_without_the_op(monkeypatch):
    """Eager inference skips the custom op's dispatch (host time per call); autograd and compile go through it."""
    from rana_hf.kernels import ops

    def refuse(*args):
        raise AssertionError("custom op dispatched")

    monkeypatch.setattr(ops, "_masked_gemv_op", refuse)
    monkeypatch.setattr(ops, "_masked_inputs_op", refuse)
    x, wt, threshold, _ = _operands(2, 64, 32, torch.float32, ACT_NONE, "cpu", 2)
    with torch.no_grad():
        torch.testing.assert_close(masked_gemv(x, wt, threshold), masked_gemv_reference(x, wt, threshold))
        assert masked_inputs(x, threshold.reshape(1, -1)).shape == (1, 2, 64)
    assert masked_gemv(x, wt, threshold).shape == (2, 32)  # grad mode, but x needs no gradient
    x.requires_grad_(True)
    with pytest.raises(AssertionError, match="custom op dispatched"):
        masked_gemv(x, wt, threshold)
    with pytest.raises(AssertionError, match="custom op dispatched"):
        masked_inputs(x, threshold.reshape(1, -1))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dispatch_and_cuda_graph_on_gpu(dtype):
    pytest.importorskip("triton")
    x, wt, threshold, gate = _operands(MAX_KERNEL_TOKENS, 4096, 11008, dtype, ACT_SILU, "cuda", 3)
    assert kernel_supports(x, wt) and not kernel_supports(torch.cat([x, x]), wt)
    expected = _exact(x, wt, threshold, gate, ACT_SILU)
    eager = masked_gemv(x, wt, threshold, gate, ACT_SILU)
    static_x = x.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = masked_gemv(static_x, wt, threshold, gate, ACT_SILU)
    static_out.fill_(float("nan"))  # poisoned: the replay must write every element
    graph.replay()
    torch.cuda.synchronize()
    for out in (eager, static_out):
        assert float((out.double() - expected).norm() / expected.norm()) < 8e-3
    compiled = torch.compile(lambda a: masked_gemv(a, wt, threshold, gate, ACT_SILU), fullgraph=True)
    assert float((compiled(x).double() - expected).norm() / expected.norm()) < 8e-3


@pytest.mark.skipif(GemvConfig is None, reason="needs Triton")
def test_sweep_chooses_the_tile_at_one_token_and_rows_and_depth_at_the_next_count():
    from rana_hf.benchmark import choose_config

    configs = [
        GemvConfig(block_n=bn, block_k=bk, per_sm=d, per_sm_multi=d)
        for bn in (128, 256)
        for bk in (16, 32)
        for d in (8, 16)
    ]
    one = {(256, 32, 8): 9}  # one token: 256 columns, 32 rows, depth 8 is best; every other tile takes 12
    four = {(256, 16, 16): 20, (128, 32, 8): 15}  # four tokens: 16 rows, depth 16 is best of those with 256 columns
    rows = [
        {
            "config": repr(c),
            "K": K,
            "N": 64,
            "tokens": T,
            "us": (one if T == 1 else four).get((c.block_n, c.block_k, c.per_sm), 12 if T == 1 else 30),
        }
        for c in configs
        for T in (1, 4)
        for K in (64, 128)
    ]
    chosen = choose_config(rows, configs, default_multi=32)
    assert (chosen.block_n, chosen.block_k, chosen.per_sm) == (256, 32, 8)
    assert (chosen.block_k_multi, chosen.per_sm_multi) == (16, 16)  # not 128 columns' 15 us: columns stay as chosen
    assert chosen.rows_per_step(1) == 32 and chosen.rows_per_step(2) == 16
    one_token = choose_config([r for r in rows if r["tokens"] == 1], configs, default_multi=32)
    assert (one_token.per_sm_multi, one_token.block_k_multi, one_token.rows_per_step(4)) == (32, 0, 32)


@pytest.mark.skipif(GemvConfig is None, reason="needs Triton")
def test_launches_of_two_tokens_cap_the_rows_per_program():
    from rana_hf.kernels.triton_gemv import _grid, _segment_starts

    cpu = torch.device("cpu")  # counted as 4 multiprocessors: 32 programs, fewer than the 86 column tiles
    starts = _segment_starts((11008, 11008), 22016)  # the stacked gate/up of a 7B-shape layer
    assert _grid(GemvConfig(), 1, 4096, 22016, cpu, starts) == (256, 86, 1, 4096)  # one token: no cap
    assert _grid(GemvConfig(), 2, 4096, 22016, cpu, starts) == (256, 86, 22, 192)
    assert _grid(GemvConfig(max_rows_multi=0), 2, 4096, 22016, cpu, starts) == (256, 86, 1, 4096)
    assert _grid(GemvConfig(split=2), 2, 4096, 22016, cpu, starts) == (256, 86, 2, 2048)  # an explicit split rules

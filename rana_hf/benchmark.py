"""Speed benchmarks: the masked-GEMV kernel in a CUDA graph, and decode with the same harness for dense and RaNA.

Numbers come from CUDA events (`triton.testing.do_bench`-style medians over many replays) on the machine that runs
them; nothing here is estimated except `bytes_per_step`, which counts the weight bytes a step must read (kept rows of
adapted layers from the FLOP reduction measured on held-out tokens, every other weight in full).

`run_bench`, `run_host_overhead` and `run_registers` are what `rana-hf bench` runs (it prints their reports).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .inference import compile_config, decode_compile_options, decode_guard_filter, greedy_generate, greedy_step

logger = logging.getLogger(__name__)

# Model shapes of the speed benchmark (random weights: real ones cannot travel to the GPU machine): transformers
# model type and config fields. Gemma 3 4B's text model: GELU-tanh MLP, 8 query heads of 256 over 4 KV heads, Gemma
# 3's four norms per layer; its 262k-token vocabulary makes the head 1.3 GB in 16 bits. Its layers all attend globally
# here: at the bench's lengths (well under 1024 tokens) the 1024-token sliding window of 5 layers in 6 sees the same
# keys, and transformers' static sliding-window cache layer branches on its length as a Python int, which makes a
# compiled decode step recompile at every position (seen with transformers 5.17 and 5.24).
LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
GEMMA3_4B = dict(
    vocab_size=262208,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=34,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    query_pre_attn_scalar=256,
    sliding_window=1024,
    max_position_embeddings=4096,
)
SHAPES = {"llama-2-7b": ("llama", LLAMA2_7B), "gemma-3-4b": ("gemma3_text", GEMMA3_4B)}


def _cuda_times(fn, repeats: int) -> tuple[float, float]:
    """Median seconds of `fn()` over `repeats` runs after one warm-up run: on the GPU (CUDA events around the call)
    and on the host (until the call returns, i.e. its last kernel is queued). Close values mean the GPU waited for
    the host."""
    fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append(time.perf_counter() - started)
        end.synchronize()
        gpu.append(start.elapsed_time(end) / 1000)
    return statistics.median(gpu), statistics.median(host)


def _cuda_time(fn, repeats: int) -> float:
    """Median GPU seconds of `fn()` over `repeats` runs (see `_cuda_times`)."""
    return _cuda_times(fn, repeats)[0]


def copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    source = torch.empty(num_bytes // 2, dtype=torch.uint8, device="cuda").random_()
    target = torch.empty_like(source)
    seconds = _cuda_time(lambda: target.copy_(source), 20)
    return 2 * source.numel() / seconds


def _rotating_weights(K: int, N: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Copies of a random [K, N] weight filling more than 4x the 60 MB L2, so that calls cycling through them read
    their weight from memory, not from the cache."""
    copies = max(2, -(-(256 << 20) // (K * N * 2)))
    return [torch.randn(K, N, device="cuda", dtype=dtype) / K**0.5 for _ in range(copies)]


def _keep_threshold(keep: float) -> float:
    """`|x| >= q` keeps a fraction `keep` of a standard normal's values: P(|x| >= q) = keep."""
    return float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - keep / 2)))


def _rows_read(x: torch.Tensor, q: float) -> float:
    """Fraction of weight rows some token of x [T, K] keeps."""
    return float(((x.float().abs() >= q).any(0)).float().mean())


def bench_kernels(
    shapes=((4096, 4096), (4096, 11008), (11008, 4096)),
    tokens=(1, 2, 4),
    dtypes=(torch.float16, torch.bfloat16),
    keep=0.56,
    calls: int = 64,
) -> list[dict]:
    """Time the masked GEMV against a dense `x @ Wt` (cuBLAS), each as `calls` launches inside one CUDA graph.

    Inputs are random with per-input thresholds that keep a fraction `keep` of each token's inputs; the weights rotate
    among enough copies that the L2 cache holds none of them between calls. Achieved bandwidth counts the bytes the
    kernel must read: the rows some token keeps, plus inputs and outputs.
    """
    rows = []
    for dtype in dtypes:
        for K, N in shapes:
            weights = _rotating_weights(K, N, dtype)
            q = _keep_threshold(keep)
            threshold = torch.full((K,), q, device="cuda")
            for T in tokens:
                x = torch.randn(T, K, device="cuda", dtype=dtype)
                kept_rows = _rows_read(x, q)

                masked = functools.partial(_launch_masked, x, weights, threshold, calls)
                dense = functools.partial(_launch_dense, x, weights, calls)
                result = {"dtype": str(dtype).replace("torch.", ""), "K": K, "N": N, "tokens": T, "keep": keep}
                for name, fn in (("masked", masked), ("dense", dense)):
                    seconds = _graph_time(fn) / calls
                    fraction = kept_rows if name == "masked" else 1.0
                    moved = fraction * K * N * 2 + T * (K + N) * 2
                    result[f"{name}_us"] = seconds * 1e6
                    result[f"{name}_GBps"] = moved / seconds / 1e9
                result["rows_read"] = kept_rows
                result["speedup"] = result["dense_us"] / result["masked_us"]
                rows.append(result)
                logger.info("%s", result)
    return rows


def _launch_masked(x, weights, threshold, calls):
    from .kernels.ops import masked_gemv

    for i in range(calls):
        masked_gemv(x, weights[i % len(weights)], threshold)


def _launch_dense(x, weights, calls):
    for i in range(calls):
        torch.matmul(x, weights[i % len(weights)])


def _graph_time(fn) -> float:
    """Median seconds of one replay of a CUDA graph holding `fn()` (warmed up outside the capture)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _cuda_time(graph.replay, 20)


def shape_config(shape: str, **overrides):
    """The transformers config of one of `SHAPES` (`overrides`: config fields), every layer attending globally."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    model_type, fields = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **{**fields, **overrides})
    if getattr(config, "layer_types", None) is not None:  # see SHAPES: every layer global
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    return config


def random_model(shape: str, dtype: torch.dtype, seed: int = 0, **overrides):
    """A causal LM of one of `SHAPES` with random weights, built directly on the GPU (`overrides`: config fields)."""
    from transformers import AutoModelForCausalLM

    config = shape_config(shape, **overrides)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_llama(dtype: torch.dtype, seed: int = 0, **overrides):
    """A Llama-2-7B-shaped causal LM with random weights, built directly on the GPU."""
    return random_model("llama-2-7b", dtype, seed, **overrides)


@torch.no_grad()
def bench_decode(
    model, batch_sizes=(1, 2, 4), prompt_len=128, new_tokens=64, seed=0, generate: bool = True
) -> list[dict]:
    """Tokens/s of greedy decoding for each batch size, three ways, all with a static KV cache and CUDA graphs:

    - `generate`: transformers' `generate` with its compiled decode step, as the README calls it
      (`compile_config=rana_hf.inference.compile_config()`, for dense too: CUDA graphs, `decode_guard_filter`; it waits
      on the host between steps), timed as `t(new_tokens) - t(1 token)` so that prefill and compilation drop out;
    - `greedy`: `rana_hf.inference.greedy_generate` (the loop below as a user calls it, end tokens off), timed the
      same way as `generate`;
    - `loop`: a plain greedy loop over the compiled forward (`torch.compile(**decode_compile_options())`),
      the next token chosen on the GPU and fed back without host synchronisation, timed with CUDA events over
      `new_tokens` steps after warm-up: what the model itself costs per step.

    `generate=False` times the loop alone (`generate` and `greedy_generate` compile and capture their own graphs: they
    take longer).
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    config = compile_config()
    rows = []
    for batch in batch_sizes:
        ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(model.device)
        row = {"batch": batch}
        if generate:
            step = _generation_step_seconds(functools.partial(_timed_generate, model, ids, config), new_tokens)
            row |= {"step_ms": step * 1e3, "tokens_per_s": batch / step}
            step = _generation_step_seconds(functools.partial(_timed_greedy, model, ids), new_tokens)
            row |= {"greedy_step_ms": step * 1e3, "greedy_tokens_per_s": batch / step}
        loop_step, loop_host = _loop_step_seconds(model, ids, new_tokens)
        row |= {"loop_step_ms": loop_step * 1e3, "loop_tokens_per_s": batch / loop_step}
        row["loop_host_ms"] = loop_host * 1e3
        rows.append(row)
        logger.info("decode batch %d: %s", batch, row)
    return rows


def _loop_step_seconds(model, ids: torch.Tensor, new_tokens: int, warmup: int = 4) -> tuple[float, float]:
    """(GPU seconds, host seconds) per step of a greedy decode loop over the compiled forward with a static KV cache
    (see bench_decode); when the host's time is the larger, the loop is host-bound."""
    step, token, positions, start = _warm_step(model, ids, new_tokens, warmup, **decode_compile_options())
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    begin.record()
    for i in range(start, start + new_tokens):
        token = step(token, positions[i : i + 1]).clone()
    end.record()
    host = time.perf_counter() - started  # the host's time to issue the steps (the GPU runs behind it)
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / new_tokens, host / new_tokens


def _warm_step(model, ids: torch.Tensor, steps: int, warmup: int, **options):
    """The greedy decode step (`greedy_step`) compiled with `fullgraph=True` and `options` over a static KV cache
    long enough for the prompt `ids` and `warmup + steps` more tokens; the prompt runs eagerly and `warmup` steps
    compile (and with CUDA graphs record) it. Returns (step, token, positions, start): the next step is
    `step(token, positions[start : start + 1])`. Each call gets graphs of its own (`torch._dynamo.reset()`)."""
    from transformers import StaticCache

    prompt_len = ids.shape[1]
    length = prompt_len + warmup + steps + 1
    positions = torch.arange(length, device=ids.device)
    forward = greedy_step(model, StaticCache(config=model.config, max_cache_len=length))
    torch._dynamo.reset()
    token = forward(ids, positions[:prompt_len])
    step = torch.compile(forward, **({"fullgraph": True} | options))
    for i in range(prompt_len, prompt_len + warmup):
        token = step(token, positions[i : i + 1]).clone()  # CUDA graphs reuse their output
    return step, token, positions, prompt_len + warmup


@torch.no_grad()
def host_overhead(model, batch_sizes=(1, 2), prompt_len=16, calls: int = 100, repeats: int = 7) -> list[dict]:
    """Host microseconds per call of the compiled decode step (`torch.compile(fullgraph=True)` over the same step as
    `bench_decode`'s loop), the graph's own work left out.

    The step is compiled with a backend that runs the captured graph once and from then on returns those outputs, so
    a call costs what `torch.compile` adds on the host: checking its guards, gathering the graph's inputs, replaying
    side effects. With CUDA graphs the GPU cannot start a step before this is done, so a step whose GPU work is shorter
    is host-bound. It does not depend on the device: it can be measured on the CPU with a small model of the same
    depth. Best of `repeats` runs of `calls` calls.
    """

    def hollow(graph, example_inputs):
        outputs = graph.forward(*example_inputs)
        return lambda *args: outputs

    rows = []
    for batch in batch_sizes:
        ids = _prompt(model, prompt_len, seed=0, batch=batch)
        options = {"guard_filter_fn": decode_guard_filter}  # as `decode_compile_options` (CUDA graphs aside)
        step, token, positions, start = _warm_step(model, ids, 1, warmup=3, backend=hollow, options=options)
        position = positions[start : start + 1]
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(calls):
                step(token, position)
            best = min(best, (time.perf_counter() - started) / calls)
        rows.append({"batch": batch, "host_us": best * 1e6})
    torch._dynamo.reset()
    return rows


def _generation_step_seconds(timed, new_tokens: int) -> float:
    """Seconds per decode step of a generation function `timed(count)` (wall seconds to make `count` tokens):
    `t(new_tokens) - t(1)` over the steps between, medians of 3 after two warm-up calls, which compile and capture.
    Each call gets graphs of its own batch size alone (as the loop does, and as a user with one size)."""
    torch._dynamo.reset()
    timed(new_tokens)
    timed(new_tokens)
    short = statistics.median(timed(1) for _ in range(3))
    full = statistics.median(timed(new_tokens) for _ in range(3))
    return (full - short) / (new_tokens - 1)


def _timed_greedy(model, ids, count: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    greedy_generate(model, ids, count, eos_token_id=[])  # no end token: every call makes `count` tokens
    torch.cuda.synchronize()
    return time.perf_counter() - started


def _timed_generate(model, ids, compile_config, count: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(
        ids,
        max_new_tokens=count,
        min_new_tokens=count,
        do_sample=False,
        cache_implementation="static",
        compile_config=compile_config,
    )
    torch.cuda.synchronize()
    return time.perf_counter() - started


@torch.no_grad()
def bench_prefill(
    model, tokens: int = 512, seed: int = 1, repeats: int = 10, compiled: bool = False, back_to_back: int = 4
) -> dict:
    """One forward over `tokens` tokens (batch 1), medians over `repeats` runs after warm-up: `ms` on the GPU and
    `host_ms`, the host's time to issue it (`_cuda_times`). `host_ms` close to `ms`: the forward is host-bound.

    Eager by default (as `generate` runs a prompt). `compiled=True` times the forward compiled with CUDA graphs
    (`torch.compile(**decode_compile_options())`, as a serving stack runs a prompt of a known length),
    `back_to_back` forwards per sample, each time divided by them: the host's work before a replay (cudagraph trees
    check the graph's inputs: 0.3 ms for a dense 8-layer model, 0.5-0.8 ms adapted, measured on an H200) then overlaps
    the GPU's previous forward, as in a serving loop, and the time is the GPU's work. A full garbage collection comes
    first, so that neither model pays for collections of the other's (or calibration's) leftover objects."""
    ids = _prompt(model, tokens, seed)
    gc.collect()

    def forward(input_ids):
        return model(input_ids=input_ids, use_cache=False).logits

    if compiled:
        torch._dynamo.reset()
        forward = torch.compile(forward, **decode_compile_options())
        for _ in range(2):  # compiles, records and replays the graph
            forward(ids)
    calls = back_to_back if compiled else 1

    def run():
        for _ in range(calls):
            forward(ids)

    gpu, host = _cuda_times(run, repeats)
    if compiled:
        torch._dynamo.reset()
    return {"ms": gpu * 1e3 / calls, "host_ms": host * 1e3 / calls}


def _prompt(model, tokens: int, seed: int, batch: int = 1) -> torch.Tensor:
    """[batch, tokens] random token ids (seeded) on the model's device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, tokens), generator=generator).to(model.device)


@torch.no_grad()
def profile_prefill(model, tokens: int = 512, seed: int = 1, top: int = 8) -> dict:
    """The GPU's own time in one eager forward over `tokens` tokens, from `torch.profiler`: `kernel_ms`, the sum of
    every kernel's time (what the forward costs the GPU when the host keeps up), and the `top` ops by that time; and
    the host's side: `host_ms` (inflated by the profiler itself) and the `top_host` ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    ids = _prompt(model, tokens, seed)
    cuda = ids.is_cuda  # on the CPU (tests) there are no kernels: kernel_ms is 0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model(input_ids=ids, use_cache=False)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
        model(input_ids=ids, use_cache=False)
        sync()
    averages = profiler.key_averages()
    ops = sorted(averages, key=lambda e: e.self_device_time_total, reverse=True)
    host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "kernel_ms": sum(e.self_device_time_total for e in ops) / 1e3,  # the profiler table's "Self CUDA time total"
        "host_ms": sum(e.self_cpu_time_total for e in host) / 1e3,  # its "Self CPU time total" (profiler included)
        "top": [
            {"name": e.key, "ms": e.self_device_time_total / 1e3, "calls": e.count}
            for e in ops[:top]
            if e.self_device_time_total > 0
        ],
        "top_host": [{"name": e.key, "ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in host[:top]],
    }


@torch.no_grad()
def profile_step(model, batch_sizes=(1, 2, 4), prompt_len=64, steps: int = 10, top: int = 6) -> list[dict]:
    """The GPU's kernels in one compiled decode step, per batch size: the step of `bench_decode`'s loop compiled
    without CUDA graphs (`torch.compile(fullgraph=True)`, so that the profiler sees each kernel), `steps` steps
    profiled after warm-up. Each row gives `kernel_us` (the sum of kernel times per step: the step's cost when nothing
    waits), `kernels` (launches per step) and the `top` kernels by time per step. Comparing two models' rows shows
    which kernels an adapted step adds or makes slower. On the CPU there are no kernels: zeros and an empty list."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    rows = []
    for batch in batch_sizes:
        ids = _prompt(model, prompt_len, seed=0, batch=batch)
        step, token, positions, start = _warm_step(model, ids, steps, warmup=3, **decode_compile_options(False))
        sync()
        with profile(activities=activities) as profiler:
            for i in range(start, start + steps):
                token = step(token, positions[i : i + 1])
            sync()
        times, counts = collections.Counter(), collections.Counter()
        for event in profiler.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                times[event.name] += event.device_time_total / steps
                counts[event.name] += 1 / steps
        rows.append(
            {
                "batch": batch,
                "kernel_us": sum(times.values()),
                "kernels": round(sum(counts.values())),
                "top": [{"name": n, "us": t, "calls": round(counts[n], 2)} for n, t in times.most_common(top)],
            }
        )
    torch._dynamo.reset()
    return rows


def storage_bytes(model) -> int:
    """Bytes of the storages behind the model's parameters and buffers, each counted once (views share one)."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def weight_bytes(model) -> int:
    """Bytes of the weights a decode step reads (the embedding table excluded: a step reads one row of it)."""
    embedding = model.get_input_embeddings().weight
    seen = {embedding.data_ptr()}
    total = 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    return total


def sweep_kernel_configs(
    configs,
    shapes=((4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288), (4096, 22016)),
    tokens=(1, 4),
    dtype=torch.float16,
    keep=0.56,
) -> list[dict]:
    """Time each `GemvConfig` of the masked GEMV on each shape (CUDA graph of 64 calls, rotating weights)."""
    from .kernels.triton_gemv import masked_gemv_triton

    rows = []
    q = _keep_threshold(keep)
    for K, N in shapes:
        weights = _rotating_weights(K, N, dtype)
        threshold = torch.full((K,), q, device="cuda")
        for T in tokens:
            x = torch.randn(T, K, device="cuda", dtype=dtype)
            kept_rows = _rows_read(x, q)
            for config in configs:
                fn = functools.partial(_launch_config, masked_gemv_triton, x, weights, threshold, config, 64)
                try:
                    seconds = _graph_time(fn) / 64
                except Exception as error:  # a configuration the compiler refuses: recorded, not fatal
                    rows.append({"config": repr(config), "K": K, "N": N, "tokens": T, "error": str(error)[:200]})
                    continue
                moved = kept_rows * K * N * 2 + T * (K + N) * 2
                row = {"config": repr(config), "K": K, "N": N, "tokens": T, "us": seconds * 1e6}
                rows.append(row | {"GBps": moved / seconds / 1e9})
                logger.info("%s", rows[-1])
    return rows


def _launch_config(kernel, x, weights, threshold, config, calls):
    for i in range(calls):
        kernel(x, weights[i % len(weights)], threshold, None, 0, config)


def choose_config(rows: list[dict], configs, default_multi: int):
    """The launch configuration a sweep picks: the tile (columns, rows per step, warps) and depth (`per_sm`) with the
    best geometric mean at one token; for steps of 2+ tokens, the rows per step (`block_k_multi`) and depth
    (`per_sm_multi`) that are best with the same columns and warps at the fewest tokens above one that the sweep timed
    (else the one-token rows and `default_multi`). Each swept configuration uses its `block_k` and `per_sm` at every
    token count."""
    import dataclasses

    best = best_config(rows, configs, tokens=1)
    multi = sorted({r["tokens"] for r in rows if r["tokens"] > 1})
    if not multi:
        return dataclasses.replace(best, per_sm_multi=default_multi, block_k_multi=0)
    same_columns = [c for c in configs if (c.block_n, c.num_warps) == (best.block_n, best.num_warps)]
    at_multi = best_config(rows, same_columns, tokens=multi[0])
    return dataclasses.replace(best, per_sm_multi=at_multi.per_sm, block_k_multi=at_multi.block_k)


def best_config(rows: list[dict], configs, tokens: int = 1):
    """The configuration with the smallest geometric-mean time over the shapes at `tokens` tokens."""
    import math

    scores = {}
    for config in configs:
        times = [r["us"] for r in rows if r["config"] == repr(config) and r["tokens"] == tokens and "us" in r]
        if times and len(times) == len({(r["K"], r["N"]) for r in rows}):
            scores[config] = math.exp(sum(math.log(t) for t in times) / len(times))
    return min(scores, key=scores.get)


def run_bench(
    dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16),
    batch_sizes: Sequence[int] = (1, 2, 4),
    methods: Sequence[tuple[str, str]] = (("teal", "global"), ("rana", "uniform")),
    flop_reduction: float = 0.44,
    target_modules: list[str] | None = None,
    calibration_tokens: int = 8192,
    layers: int | None = None,
    new_tokens: int = 64,
    kernels: bool = True,
    sweep: bool = False,
    sweep_tokens: Sequence[int] = (1,),
    decode: bool = True,
    generate: bool = True,
    prefill_profile: bool = False,
    step_profile: bool = False,
    on_progress: Callable[[dict], None] | None = None,
    shape: str = "llama-2-7b",
    compensation_rank: int | None = None,
    force_rotation: bool = False,
    residual_rotation: str | None = None,
) -> dict:
    """The GPU benchmarks `rana-hf bench` runs: the masked-GEMV kernel against cuBLAS, then dense and adapted decode
    and prefill on a random model of `shape` (`random_model`; `SHAPES`) of `layers` layers.

    For each dtype the dense model is timed first (`bench_decode`, then `bench_prefill` eager and compiled), then each
    (method, allocation): compressed on random calibration tokens, its FLOP reduction measured on random held-out
    tokens, prepared for decode (`rana_hf.inference.prepare_for_decode`) and timed the same way, each on a fresh model.

    Args:
        dtypes: dtypes of the kernel table and of the models.
        batch_sizes: decode batch sizes (and token counts of the kernel table).
        methods: (method, allocation) pairs to compare with dense.
        flop_reduction: FLOP reduction target of every method.
        target_modules: linears to adapt (None: the presets, with o_proj; `config.PAPER_TARGETS`: the paper's set).
        calibration_tokens: random calibration tokens (the weights are random too).
        layers: decoder layers of the model (None: the shape's own).
        new_tokens: decode steps timed.
        kernels: time the kernel table.
        sweep: first time kernel launch configurations (`sweep_kernel_configs`) and use the best from then on (it
            replaces `kernels.triton_gemv.DEFAULT_CONFIG` for the rest of the process).
        sweep_tokens: token counts the sweep times (1 is always added).
        decode: time decode and prefill (the decode table).
        generate: also time `generate` and `greedy_generate` (else the compiled loop alone).
        prefill_profile: also profile one prefill (`profile_prefill`).
        step_profile: also profile the compiled decode step (`profile_step`).
        on_progress: called with the report so far after each section (e.g. to save it).
        shape: the model's shape, a key of `SHAPES`.
        compensation_rank: method `compensated`: give every adapted linear a term of this rank (`offered_ranks`);
            None: the ranks its calibration chooses, which on random weights are all 0 (the plain mask).
        force_rotation: method `rotated`: rotate every unit that can take a rotation (`adapters.rotated.forced`);
            else calibration on random weights chooses the plain masks.
        residual_rotation: `RaNAConfig.residual_rotation` of every method (the stream's turns run and are timed).

    Returns:
        A report: `gpu`, `copy_GBps`, `sweep` and `kernel_config` (with `sweep`), `kernels` (with `kernels`), and
        `decode`: per dtype, the dense model's row and one per method (`method:allocation`).
    """
    from . import RaNAConfig, compress, measure_flops
    from .adapters import compensated, rotated
    from .inference import prepare_for_decode, set_dense_prefill
    from .sweep import planned_adapters

    if not torch.cuda.is_available():
        raise RuntimeError("run_bench measures GPU speed and needs CUDA (host_overhead runs on the CPU)")
    layers = layers or shape_config(shape).num_hidden_layers  # an unknown shape is refused here, before any work
    progress = on_progress or (lambda report: None)
    report = {"gpu": torch.cuda.get_device_name(), "copy_GBps": copy_bandwidth() / 1e9}
    batch_sizes = list(batch_sizes)
    if sweep:
        from .kernels import triton_gemv

        configs = [  # tile shapes and split-K depths; warps side by side along the columns (256 columns each)
            triton_gemv.GemvConfig(block_n=bn, block_k=bk, per_sm=per_sm, per_sm_multi=per_sm, num_warps=warps)
            for warps in (1, 2)
            for bn in (128 * warps, 256 * warps)
            for bk in (16, 32, 64)
            for per_sm in (4, 8, 16, 32)
        ]
        report["sweep"] = sweep_kernel_configs(configs, tokens=sorted(set(sweep_tokens) | {1}))
        best = choose_config(report["sweep"], configs, triton_gemv.DEFAULT_CONFIG.per_sm_multi)
        triton_gemv.DEFAULT_CONFIG = best  # used by everything below
        report["kernel_config"] = repr(triton_gemv.DEFAULT_CONFIG)
        progress(report)
    if kernels:
        report["kernels"] = bench_kernels(dtypes=dtypes, tokens=batch_sizes)
        progress(report)
    report["decode"] = []
    for dtype in dtypes if decode else []:
        model = random_model(shape, dtype, num_hidden_layers=layers)
        generator = torch.Generator().manual_seed(1)
        vocab = model.config.vocab_size
        calibration = torch.randint(0, vocab, (calibration_tokens // 512, 512), generator=generator)
        heldout = torch.randint(0, vocab, (4, 512), generator=generator)
        entry = {"dtype": str(dtype).replace("torch.", ""), "shape": shape, "layers": model.config.num_hidden_layers}
        entry["targets"] = target_modules or "default"
        # each model: decode first, then prefill (the same order for dense and adapted: an eager forward that
        # follows the compiled decode's graphs finds the process in the same state for both)
        entry["dense"] = {
            "weight_bytes": weight_bytes(model),
            "parameter_bytes": storage_bytes(model),
            "decode": bench_decode(model, batch_sizes, new_tokens=new_tokens, generate=generate),
        }
        if step_profile:
            entry["dense"]["step_profile"] = profile_step(model, batch_sizes)
        entry["dense"].update(_prefill_rows(model, prefill_profile))
        for method, allocation in methods:
            config = RaNAConfig(
                method=method,
                allocation=allocation,
                flop_reduction=flop_reduction,
                calibration_tokens=calibration_tokens,
                threshold_sample_tokens=2048,
                target_modules=target_modules,
                residual_rotation=residual_rotation,
            )
            started = time.perf_counter()
            forced = method == "compensated" and compensation_rank is not None
            with contextlib.ExitStack() as stack:
                if forced:
                    stack.enter_context(compensated.offered_ranks((compensation_rank,)))
                if method == "rotated" and force_rotation:
                    stack.enter_context(rotated.forced())
                adapted = compress(model, config, calibration)
            row = {"method": method, "allocation": allocation, "compress_seconds": time.perf_counter() - started}
            row["residual_rotation"] = residual_rotation
            plan = adapted.peft_config["default"].plan
            row["adapters"] = planned_adapters(plan)  # units per chosen kind (a mix: `auto`, `rotated`)
            if method == "compensated":  # the ranks planned (random weights alone would give every linear 0)
                row["compensation_ranks"] = sorted(e.get("rank", 0) for e in plan.values() if e["kind"] != "dense")
            if method == "rotated":  # the rotations planned: rank of each shared router (their owners')
                row["rotation_ranks"] = {k: e["rank"] for k, e in plan.items() if e.get("role") in ("owner", "own")}
            flops = measure_flops(adapted, heldout, batch_size=1)
            row["flop_reduction_measured"] = flops["reduction"]
            targeted = sum(m["dense"] for m in flops["per_module"].values()) / 2 / flops["tokens"]  # MACs per token
            row["bytes_per_step"] = entry["dense"]["weight_bytes"] - 2 * targeted * flops["reduction"]
            row.update(prepare_for_decode(adapted))
            base = adapted.base_model.model
            row["parameter_bytes"] = storage_bytes(base)
            row["decode"] = bench_decode(base, batch_sizes, new_tokens=new_tokens, generate=generate)
            if step_profile:
                row["step_profile"] = profile_step(base, batch_sizes)
            row.update(_prefill_rows(base, prefill_profile))
            if set_dense_prefill(base, True):  # the prompt through the input adapters' dense weights
                row.update(_prefill(bench_prefill(base), "prefill_512_dense_prefill"))
                set_dense_prefill(base, False)
            entry[f"{method}:{allocation}"] = row
            progress(report | {"decode": report["decode"] + [entry]})
            model = None  # the adapted model replaced the dense weights: load a fresh one for the next method
            del adapted, base
            torch.cuda.empty_cache()
            model = random_model(shape, dtype, num_hidden_layers=layers)
        report["decode"].append(entry)
        del model
        torch.cuda.empty_cache()
        progress(report)
    return report


def _prefill_rows(model, profile: bool) -> dict:
    """Prefill timings of `model`, then the GPU memory it holds (after a forward: cuBLAS's workspaces count for every
    model alike), then optionally a profile of one prefill."""
    rows = _prefill(bench_prefill(model))
    rows["memory_bytes"] = torch.cuda.memory_allocated()
    rows.update(_prefill(bench_prefill(model, compiled=True), "prefill_512_compiled"))
    if profile:
        rows["prefill_512_profile"] = profile_prefill(model)
    return rows


def _prefill(timed: dict, prefix: str = "prefill_512") -> dict:
    return {f"{prefix}_ms": timed["ms"], f"{prefix}_host_ms": timed["host_ms"]}


def run_host_overhead(
    methods: Sequence[tuple[str, str]] = (("teal", "global"), ("rana", "uniform")),
    flop_reduction: float = 0.44,
    target_modules: list[str] | None = None,
    layers: int = 32,
    batch_sizes: Sequence[int] = (1, 2),
) -> dict:
    """Host time per compiled decode step (`host_overhead`), dense against each method, on a small random Llama of
    `layers` layers on the CPU: the host's cost depends on the depth and the modules, not on the widths.

    Args:
        methods: (method, allocation) pairs to compare with dense.
        flop_reduction: FLOP reduction target of every method.
        target_modules: linears to adapt (None: the presets).
        layers: decoder layers.
        batch_sizes: batch sizes; those above 2 (steps the decode kernel does not take) are skipped.

    Returns:
        `{"host": {"dense": rows, "method:allocation": rows, ...}}`, rows as `host_overhead` returns them.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    from . import RaNAConfig, compress
    from .inference import prepare_for_decode

    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=512)
    batches = [b for b in batch_sizes if b <= 2]  # steps the kernel takes (DECODE_KERNEL_TOKENS)
    report = {"host": {}}
    torch.manual_seed(0)
    report["host"]["dense"] = host_overhead(AutoModelForCausalLM.from_config(config).eval(), batches)
    calibration = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    for method, allocation in methods:
        torch.manual_seed(0)
        rana_config = RaNAConfig(
            method=method,
            allocation=allocation,
            flop_reduction=flop_reduction,
            calibration_tokens=512,
            calibration_seq_len=64,
            threshold_sample_tokens=512,
            target_modules=target_modules,
        )
        adapted = compress(AutoModelForCausalLM.from_config(config).eval(), rana_config, calibration)
        prepare_for_decode(adapted)
        report["host"][f"{method}:{allocation}"] = host_overhead(adapted.base_model.model, batches)
    return report


def run_registers(tokens: Sequence[int] = (1, 2, 4)) -> dict:
    """Registers and stack (spill) bytes per thread of the masked GEMV built for sm_90, by rows per step (16, 32, 64),
    token count and GLU; compiled on this machine, no GPU needed (needs triton).

    Returns:
        `{"config": repr of the default launch configuration, "rows": [{block_k, tokens, glu, registers,
        stack_bytes, ...}]}`.
    """
    import dataclasses

    from .kernels import triton_gemv

    report = {"config": repr(triton_gemv.DEFAULT_CONFIG), "rows": []}
    for block_k in (16, 32, 64):
        config = dataclasses.replace(triton_gemv.DEFAULT_CONFIG, block_k=block_k, block_k_multi=0)
        for count in tokens:
            for glu in (False, True):
                usage = triton_gemv.resource_usage(config, count, glu=glu)
                report["rows"].append({"block_k": block_k, "tokens": count, "glu": glu} | usage)
    return report

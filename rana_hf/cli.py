"""`rana-hf` command line: compress a model and report dense vs RaNA quality and FLOPs; an end-to-end demo.

Thin over the API: every number printed comes from `rana_hf.evaluation.perplexity` and `rana_hf.measure_flops`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import torch

from .config import ALLOCATIONS, BUDGET_MODES, METHODS, PAPER_TARGETS, RaNAConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(model_name: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_models import REAL_MODELS, real_model_path

    path = real_model_path(model_name) if model_name in REAL_MODELS else model_name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    return path, model, tokenizer


def _calibration_text(source: str):
    """'default' (embedded Shakespeare), a text file, or a `datasets` name (train split, 'text' column)."""
    from .data import load_text

    if source == "default":
        return [load_text("calibration")]
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            return [handle.read()]
    import datasets

    return datasets.load_dataset(source, split="train")


def _eval_chunks(args, tokenizer):
    """Held-out token chunks: `--eval-text` ('default': the embedded held-out plays, or a text file)."""
    from .calibration import calibration_chunks
    from .data import load_text

    text = load_text("heldout") if args.eval_text == "default" else open(args.eval_text, encoding="utf-8").read()
    return calibration_chunks([text], tokenizer, seq_len=args.seq_len, max_tokens=args.eval_tokens)


def _versions_text(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def _versions() -> dict:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, threads={torch.get_num_threads()}",
    }


# The paper's method in both allocations, each baseline in its usual form (TEAL's own allocation is greedy, so both),
# and auto with global allocation.
DEFAULT_EVAL_METHODS = "rana,rana:global,cats,teal,teal:global,svd,auto:global"

DEMO_PROMPT = "Friends, Romans, countrymen,"


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int = 30) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def run_compress(args) -> tuple[dict, object, object]:
    """Load, evaluate dense, compress, evaluate RaNA, save; returns (summary, RaNA model, tokenizer)."""
    from . import RaNAConfig, compress, measure_flops
    from .evaluation import perplexity

    path, model, tokenizer = _load(args.model, args.dtype)
    eval_chunks = _eval_chunks(args, tokenizer)
    started = time.perf_counter()
    dense_ppl = perplexity(model, eval_chunks, batch_size=args.eval_batch_size, progress=True)
    dense_eval_s = time.perf_counter() - started
    dense_text = _greedy(model, tokenizer, DEMO_PROMPT)

    config = RaNAConfig(
        flop_reduction=args.flop_reduction,
        calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.seq_len,
        fuse_qkv=not args.no_fuse_qkv,
        refit_passes=args.refit_passes,
        balance_qkv=args.balance_qkv,
        target_modules=args.target_modules.split(",") if args.target_modules else None,
        method=args.method,
        allocation=args.allocation,
        no_larger_than_dense=args.no_larger_than_dense,
        budget_mode=args.budget_mode,
    )
    started = time.perf_counter()
    rana = compress(model, config, calibration=_calibration_text(args.calibration), tokenizer=tokenizer)
    compress_s = time.perf_counter() - started
    flops = measure_flops(rana, eval_chunks, batch_size=args.eval_batch_size)
    rana_ppl = perplexity(rana, eval_chunks, batch_size=args.eval_batch_size, progress=True)
    if getattr(args, "standalone", False):
        from .integrations.standalone import save_compressed

        save_compressed(rana, args.out, tokenizer=tokenizer)
    else:
        rana.save_pretrained(args.out)
    summary = {
        "model": args.model,
        "model_path": path,
        "dtype": args.dtype,
        "method": args.method,
        "allocation": args.allocation,
        "flop_reduction_target": args.flop_reduction,
        "flop_reduction_measured": flops["reduction"],
        "eval_tokens": int(eval_chunks.numel()),
        "perplexity_dense": dense_ppl,
        "perplexity_rana": rana_ppl,
        "compress_seconds": compress_s,
        "dense_eval_seconds": dense_eval_s,
        "calibration_tokens": args.calibration_tokens,
        "calibration": args.calibration,
        "greedy_dense": dense_text,
        "versions": _versions(),
    }
    with open(os.path.join(args.out, "rana_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary, rana, tokenizer


def _print_summary(summary: dict) -> None:
    rows = [
        ("model", summary["model"]),
        ("method / allocation", f"{summary['method']} / {summary['allocation']}"),
        ("held-out tokens", summary["eval_tokens"]),
        ("perplexity dense", f"{summary['perplexity_dense']:.3f}"),
        ("perplexity RaNA", f"{summary['perplexity_rana']:.3f}"),
        ("FLOP reduction target", f"{summary['flop_reduction_target']:.3f}"),
        ("FLOP reduction measured", f"{summary['flop_reduction_measured']:.3f}"),
        ("compress time (s)", f"{summary['compress_seconds']:.1f}"),
        ("versions", _versions_text(summary["versions"])),
    ]
    width = max(len(name) for name, _ in rows)
    print("| " + "metric".ljust(width) + " | value |")
    print("|-" + "-" * width + "-|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


def cmd_compress(args) -> int:
    summary, _, _ = run_compress(args)
    _print_summary(summary)
    kind = "standalone checkpoint" if args.standalone else "adapter"
    print(f"{kind} written to {args.out}")
    return 0


def cmd_demo(args) -> int:
    from transformers import AutoModelForCausalLM

    from .calibration import calibration_chunks
    from .data import load_text

    summary, rana, tokenizer = run_compress(args)
    _print_summary(summary)
    print(f"\nReloading {args.out} with AutoModelForCausalLM.from_pretrained ...")
    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=DTYPES[args.dtype]).eval()
    probe = calibration_chunks([load_text("heldout")], tokenizer, seq_len=64, max_tokens=128)
    with torch.no_grad():
        same = torch.equal(reloaded(probe).logits, rana(probe).logits)
    print(f"reloaded logits identical to the compressed model: {same}")
    print(f"greedy generation of the dense model:\n  {summary['greedy_dense']}")
    print(f"greedy generation of the reloaded RaNA model:\n  {_greedy(reloaded, tokenizer, DEMO_PROMPT)}")
    return 0 if same else 1


def _float_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _method_specs(methods: str, allocations: str) -> list[tuple[str, str]]:
    """'rana,auto:global' x 'uniform,global' -> [(method, allocation)]; 'method:allocation' pins one allocation."""
    from .config import ALLOCATIONS, METHODS

    specs = []
    for token in (t.strip() for t in methods.split(",") if t.strip()):
        method, _, pinned = token.partition(":")
        chosen = [pinned] if pinned else [a.strip() for a in allocations.split(",") if a.strip()]
        for allocation in chosen:
            if method not in METHODS or allocation not in ALLOCATIONS:
                raise SystemExit(f"unknown method/allocation {method}:{allocation}; methods {METHODS}, {ALLOCATIONS}")
            if (method, allocation) not in specs:
                specs.append((method, allocation))
    return specs


def run_eval(args) -> dict:
    """Calibrate once, then compress with every method x allocation x FLOP reduction and compare to dense."""
    from . import RaNAConfig, calibrate, compress
    from .api import parameter_counts
    from .evaluation import compare_to_dense

    try:
        import matplotlib  # noqa: F401  (checked first: the plot comes at the end of a long run)
    except ImportError as error:
        raise SystemExit('rana-hf eval draws its plot with matplotlib: pip install "rana_hf[eval]"') from error
    specs = _method_specs(args.methods, args.allocations)
    reductions = _float_list(args.flop_reduction)
    if not reductions or not all(0 < r < 1 for r in reductions):
        raise SystemExit(f"--flop-reduction takes values in (0, 1), got {args.flop_reduction}")
    os.makedirs(args.out, exist_ok=True)
    path, model, tokenizer = _load(args.model, args.dtype)
    eval_chunks = _eval_chunks(args, tokenizer)
    base = dict(
        calibration_seq_len=args.seq_len,
        target_modules=args.target_modules.split(",") if args.target_modules else None,
        no_larger_than_dense=args.no_larger_than_dense,
        budget_mode=args.budget_mode,
    )
    token_counts = [int(t) for t in str(args.calibration_tokens).split(",") if t.strip()]
    if not token_counts or min(token_counts) <= 0:
        raise SystemExit(f"--calibration-tokens takes positive integers, got {args.calibration_tokens}")
    calibration = _calibration_text(args.calibration)
    report = {
        "model": args.model,
        "model_path": path,
        "dtype": args.dtype,
        "calibration": args.calibration,
        "calibrations": [],
        "eval_tokens": int(eval_chunks.numel()),
        "budget_mode": args.budget_mode,
        "eval_text": args.eval_text,
        "versions": _versions(),
        "rows": [],
    }
    json_path = os.path.join(args.out, "rana_eval.json")
    for tokens in token_counts:
        settings = dict(base, calibration_tokens=tokens)
        started = time.perf_counter()
        statistics = calibrate(
            model,
            RaNAConfig(**settings),
            calibration,
            tokenizer,
            methods=sorted({m for m, _ in specs}),
            fisher=any(a == "global" for _, a in specs),
        )
        calibrated = {"tokens": int(statistics.chunks.numel()), "seconds": time.perf_counter() - started}
        report["calibrations"].append(calibrated)
        report["target_modules"] = statistics.targets
        for method, allocation in specs:
            for reduction in reductions:
                row = {"method": method, "allocation": allocation, "flop_reduction_target": reduction}
                row.update(calibration_tokens=calibrated["tokens"], calibration_seconds=calibrated["seconds"])
                started = time.perf_counter()
                try:
                    config = RaNAConfig(**settings, method=method, allocation=allocation, flop_reduction=reduction)
                    adapted = compress(model, config, statistics=statistics)
                except ValueError as error:  # a method that cannot reach the target says so
                    row["error"] = str(error)
                    report["rows"].append(row)
                    print(f"{method}/{allocation} at {reduction}: {error}", file=sys.stderr)
                    continue
                row["compress_seconds"] = time.perf_counter() - started
                quality = compare_to_dense(adapted, eval_chunks, batch_size=args.eval_batch_size)
                params = parameter_counts(adapted)
                row.update(quality)
                row["flop_reduction_measured"] = row.pop("flop_reduction")
                row["params_ratio"] = params["adapted"] / params["dense"]
                row["seconds"] = time.perf_counter() - started
                report["dense_perplexity"] = quality["dense_perplexity"]
                report["rows"].append(row)
                model = adapted.unload()
                print(_row_line(row), flush=True)
                _dump(report, json_path)
        del statistics
    _dump(report, json_path)
    _plot(report, os.path.join(args.out, "rana_eval.png"))
    return report


def _row_line(row: dict) -> str:
    calibration = f"{row['calibration_tokens']} | {row['calibration_seconds']:.0f} |"
    if "error" in row:
        return f"| {row['method']} | {row['allocation']} | {row['flop_reduction_target']:.2f} | unreachable " + (
            f"| | | | | {calibration} |"
        )
    return (
        f"| {row['method']} | {row['allocation']} | {row['flop_reduction_target']:.2f} | "
        f"{row['flop_reduction_measured']:.3f} | {row['perplexity']:.2f} | {row['kl_to_dense']:.3f} | "
        f"{row['top1_agreement']:.3f} | {row['params_ratio']:.3f} | {calibration} {row['compress_seconds']:.0f} |"
    )


def _print_eval(report: dict) -> None:
    calibrations = ", ".join(f"{c['tokens']} tokens in {c['seconds']:.0f} s" for c in report["calibrations"])
    print(
        f"\n{report['model']}: dense perplexity {report.get('dense_perplexity', float('nan')):.2f} on "
        f"{report['eval_tokens']} held-out tokens; calibration pass {calibrations}"
    )
    print(
        "| method | allocation | target | measured reduction | perplexity | KL to dense | top-1 agreement "
        "| params/dense | calibration tokens | calibration s | compress s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        print(_row_line(row))
    print("versions: " + _versions_text(report["versions"]))


def _plot(report: dict, path: str) -> None:
    """Perplexity against measured FLOP reduction, one line per method/allocation, dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in report["rows"]:
        if "error" not in row:
            label = f"{row['method']} ({row['allocation']})"
            if len(report["calibrations"]) > 1:
                label += f", {row['calibration_tokens']} calibration tokens"
            lines.setdefault(label, []).append((row["flop_reduction_measured"], row["perplexity"]))
    for label, points in lines.items():
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if "dense_perplexity" in report:
        axes.axhline(report["dense_perplexity"], color="black", linestyle="--", label="dense")
    axes.set_yscale("log")
    axes.set_xlabel("measured FLOP reduction of the targeted linears (held-out text)")
    axes.set_ylabel("held-out perplexity")
    axes.set_title(f"{report['model']}, no fine-tuning")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def cmd_eval(args) -> int:
    report = run_eval(args)
    _print_eval(report)
    print(f"JSON and plot written to {args.out}/rana_eval.json and {args.out}/rana_eval.png")
    return 0


def run_bench(args) -> dict:
    """Kernel and decode benchmarks on the GPU (see `rana_hf.benchmark`); writes rana_bench.json."""
    from . import RaNAConfig, compress, measure_flops
    from . import benchmark as bench
    from .inference import prepare_for_decode, set_dense_prefill

    if args.host_overhead:
        return run_host_overhead(args)
    if args.registers:
        return run_registers(args)
    if not torch.cuda.is_available():
        raise SystemExit("rana-hf bench measures GPU speed and needs CUDA (`--host-overhead` runs on the CPU)")
    os.makedirs(args.out, exist_ok=True)
    report = {"versions": _versions(), "gpu": torch.cuda.get_device_name(), "args": vars(args).copy()}
    report["args"].pop("func", None)
    import triton

    report["versions"]["triton"] = triton.__version__
    report["copy_GBps"] = bench.copy_bandwidth() / 1e9
    path = os.path.join(args.out, "rana_bench.json")
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    if args.sweep:
        from .kernels import triton_gemv

        configs = [  # tile shapes and split-K depths; warps side by side along the columns (256 columns each)
            triton_gemv.GemvConfig(block_n=bn, block_k=bk, per_sm=per_sm, per_sm_multi=per_sm, num_warps=warps)
            for warps in (1, 2)
            for bn in (128 * warps, 256 * warps)
            for bk in (16, 32, 64)
            for per_sm in (4, 8, 16, 32)
        ]
        tokens = sorted(set(_int_list(args.sweep_tokens)) | {1})
        report["sweep"] = bench.sweep_kernel_configs(configs, tokens=tokens)
        best = bench.choose_config(report["sweep"], configs, triton_gemv.DEFAULT_CONFIG.per_sm_multi)
        triton_gemv.DEFAULT_CONFIG = best  # used by everything below
        report["kernel_config"] = repr(triton_gemv.DEFAULT_CONFIG)
        _dump(report, path)
    if args.kernels:
        report["kernels"] = bench.bench_kernels(dtypes=dtypes, tokens=_int_list(args.batch_sizes))
        _dump(report, path)
    report["decode"] = []
    for dtype in dtypes if args.decode else []:
        model = bench.random_llama(dtype, num_hidden_layers=args.layers)
        generator = torch.Generator().manual_seed(1)
        vocab = model.config.vocab_size
        calibration = torch.randint(0, vocab, (args.calibration_tokens // 512, 512), generator=generator)
        heldout = torch.randint(0, vocab, (4, 512), generator=generator)
        entry = {
            "dtype": args.dtypes.split(",")[dtypes.index(dtype)],
            "layers": args.layers,
            "targets": _bench_targets(args.target_modules) or "default",
        }
        # each model: decode first, then prefill (the same order for dense and adapted: an eager forward that
        # follows the compiled decode's graphs finds the process in the same state for both)
        entry["dense"] = {
            "weight_bytes": bench.weight_bytes(model),
            "parameter_bytes": bench.storage_bytes(model),
            "decode": bench.bench_decode(
                model, _int_list(args.batch_sizes), new_tokens=args.new_tokens, generate=args.generate
            ),
        }
        if args.profile_step:
            entry["dense"]["step_profile"] = bench.profile_step(model, _int_list(args.batch_sizes))
        entry["dense"].update(_prefill_rows(bench, model, args.profile_prefill))
        for method, allocation in _method_specs(args.methods, "uniform"):
            config = RaNAConfig(
                method=method,
                allocation=allocation,
                flop_reduction=args.flop_reduction,
                calibration_tokens=args.calibration_tokens,
                threshold_sample_tokens=2048,
                target_modules=_bench_targets(args.target_modules),
            )
            started = time.perf_counter()
            adapted = compress(model, config, calibration)
            row = {"method": method, "allocation": allocation, "compress_seconds": time.perf_counter() - started}
            flops = measure_flops(adapted, heldout, batch_size=1)
            row["flop_reduction_measured"] = flops["reduction"]
            targeted = sum(m["dense"] for m in flops["per_module"].values()) / 2 / flops["tokens"]  # MACs per token
            row["bytes_per_step"] = entry["dense"]["weight_bytes"] - 2 * targeted * flops["reduction"]
            row.update(prepare_for_decode(adapted))
            base = adapted.base_model.model
            row["parameter_bytes"] = bench.storage_bytes(base)
            row["decode"] = bench.bench_decode(
                base, _int_list(args.batch_sizes), new_tokens=args.new_tokens, generate=args.generate
            )
            if args.profile_step:
                row["step_profile"] = bench.profile_step(base, _int_list(args.batch_sizes))
            row.update(_prefill_rows(bench, base, args.profile_prefill))
            if set_dense_prefill(base, True):  # the prompt through the input adapters' dense weights
                row.update(_prefill(bench.bench_prefill(base), "prefill_512_dense_prefill"))
                set_dense_prefill(base, False)
            entry[f"{method}:{allocation}"] = row
            _dump(report | {"decode": report["decode"] + [entry]}, path)
            model = None  # the adapted model replaced the dense weights: load a fresh one for the next method
            del adapted, base
            torch.cuda.empty_cache()
            model = bench.random_llama(dtype, num_hidden_layers=args.layers)
        report["decode"].append(entry)
        del model
        torch.cuda.empty_cache()
        _dump(report, path)
    return report


def run_host_overhead(args) -> dict:
    """`rana-hf bench --host-overhead`: host time per compiled decode step, dense against each method, on a small
    Llama of `--layers` layers on the CPU (the host's cost depends on the depth and the modules, not on the widths)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from . import RaNAConfig, compress
    from . import benchmark as bench
    from .inference import prepare_for_decode

    os.makedirs(args.out, exist_ok=True)
    report = {"versions": _versions(), "args": vars(args).copy(), "host": {}}
    report["args"].pop("func", None)
    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    config = LlamaConfig(**shape, num_hidden_layers=args.layers, max_position_embeddings=512)
    batches = [b for b in _int_list(args.batch_sizes) if b <= 2]  # steps the kernel takes (DECODE_KERNEL_TOKENS)
    torch.manual_seed(0)
    report["host"]["dense"] = bench.host_overhead(AutoModelForCausalLM.from_config(config).eval(), batches)
    calibration = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    for method, allocation in _method_specs(args.methods, "uniform"):
        torch.manual_seed(0)
        rana_config = RaNAConfig(
            method=method,
            allocation=allocation,
            flop_reduction=args.flop_reduction,
            calibration_tokens=512,
            calibration_seq_len=64,
            threshold_sample_tokens=512,
            target_modules=_bench_targets(args.target_modules),
        )
        adapted = compress(AutoModelForCausalLM.from_config(config).eval(), rana_config, calibration)
        prepare_for_decode(adapted)
        report["host"][f"{method}:{allocation}"] = bench.host_overhead(adapted.base_model.model, batches)
    _dump(report, os.path.join(args.out, "rana_host.json"))
    return report


def run_registers(args) -> dict:
    """`rana-hf bench --registers`: registers and stack (spill) bytes per thread of the masked GEMV for sm_90, by
    rows per step, tokens and GLU, compiled on this machine (no GPU); writes rana_registers.json."""
    import dataclasses

    import triton

    from .kernels import triton_gemv

    os.makedirs(args.out, exist_ok=True)
    report = {"versions": _versions() | {"triton": triton.__version__}, "config": repr(triton_gemv.DEFAULT_CONFIG)}
    report["rows"] = []
    for block_k in (16, 32, 64):
        config = dataclasses.replace(triton_gemv.DEFAULT_CONFIG, block_k=block_k, block_k_multi=0)
        for tokens in _int_list(args.batch_sizes):
            for glu in (False, True):
                usage = triton_gemv.resource_usage(config, tokens, glu=glu)
                report["rows"].append({"block_k": block_k, "tokens": tokens, "glu": glu} | usage)
    _dump(report, os.path.join(args.out, "rana_registers.json"))
    return report


def _prefill_rows(bench, model, profile: bool) -> dict:
    """Prefill timings of `model`, then the GPU memory it holds (after a forward: cuBLAS's workspaces count for every
    model alike), then optionally a profile of one prefill."""
    rows = _prefill(bench.bench_prefill(model))
    rows["memory_bytes"] = torch.cuda.memory_allocated()
    rows.update(_prefill(bench.bench_prefill(model, compiled=True), "prefill_512_compiled"))
    if profile:
        rows["prefill_512_profile"] = bench.profile_prefill(model)
    return rows


def _prefill(timed: dict, prefix: str = "prefill_512") -> dict:
    return {f"{prefix}_ms": timed["ms"], f"{prefix}_host_ms": timed["host_ms"]}


def _dump(report: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _bench_targets(spec: str) -> list[str] | None:
    """`--target-modules` of the bench: "paper" (q/k/v, gate, up, down: the paper's set, which the speed goals name),
    "default" (the presets, with o_proj: None) or comma-separated module names."""
    if spec == "paper":
        return list(PAPER_TARGETS)
    if spec == "default":
        return None
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise SystemExit(f"--target-modules: 'paper', 'default' or comma-separated module names, not {spec!r}")
    return names


def _targets_text(targets: list[str] | str | None) -> str:
    """The adapted linears as a table header names them: the list, or "default" (the presets)."""
    return ", ".join(targets) if isinstance(targets, list) else "default"


def _print_bench(report: dict) -> None:
    print(f"{report['gpu']}; copy bandwidth {report['copy_GBps']:.0f} GB/s; " + _versions_text(report["versions"]))
    if report.get("kernels"):
        print("| dtype | K x N | tokens | rows read | masked us | masked GB/s | dense us | dense GB/s | speedup |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in report["kernels"]:
            print(
                f"| {r['dtype']} | {r['K']}x{r['N']} | {r['tokens']} | {r['rows_read']:.2f} | {r['masked_us']:.1f} | "
                f"{r['masked_GBps']:.0f} | {r['dense_us']:.1f} | {r['dense_GBps']:.0f} | {r['speedup']:.2f} |"
            )
    for entry in report.get("decode", []):
        dense = entry["dense"]
        targets = _targets_text(entry.get("targets"))
        print(f"\ndecode, {entry['dtype']}, {entry['layers']} layers, adapted: {targets}")
        print(
            "| model | batch | generate tok/s | speedup | loop tok/s | speedup | loop weight GB/s | FLOP reduction "
            "| prefill 512 ms | its host ms | compiled prefill ms | memory GB | greedy_generate tok/s | speedup |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, row in entry.items():
            if not isinstance(row, dict):
                continue
            step_bytes = row.get("bytes_per_step", dense["weight_bytes"])
            for d, base in zip(row["decode"], dense["decode"], strict=True):
                loop = d.get("loop_tokens_per_s", float("nan"))
                loop_speedup = loop / base.get("loop_tokens_per_s", float("nan"))
                loop_ms = d.get("loop_step_ms", float("nan"))
                generated = d.get("tokens_per_s", float("nan"))  # nan with --no-generate
                speedup = generated / base.get("tokens_per_s", float("nan"))
                greedy = d.get("greedy_tokens_per_s", float("nan"))
                greedy_speedup = greedy / base.get("greedy_tokens_per_s", float("nan"))
                print(
                    f"| {name} | {d['batch']} | {generated:.1f} | {speedup:.2f} "
                    f"| {loop:.1f} | {loop_speedup:.2f} | {step_bytes / (loop_ms / 1e3) / 1e9:.0f} "
                    f"| {row.get('flop_reduction_measured', 0.0):.3f} | {row['prefill_512_ms']:.1f} "
                    f"| {row.get('prefill_512_host_ms', float('nan')):.1f} "
                    f"| {row.get('prefill_512_compiled_ms', float('nan')):.1f} | {row['memory_bytes'] / 1e9:.2f} "
                    f"| {greedy:.1f} | {greedy_speedup:.2f} |"
                )
        profiled = {
            name: row["prefill_512_profile"]
            for name, row in entry.items()
            if isinstance(row, dict) and "prefill_512_profile" in row
        }
        if profiled:
            print(
                "prefill 512, GPU kernel time: "
                + ", ".join(f"{k} {v['kernel_ms']:.1f} ms" for k, v in profiled.items())
            )
        stepped = {
            name: row["step_profile"] for name, row in entry.items() if isinstance(row, dict) and "step_profile" in row
        }
        if stepped:
            print("\ncompiled decode step without CUDA graphs, GPU kernels per step (`--profile-step`)")
            print("| model | batch | kernel us | kernels | top kernels (us per step) |")
            print("|---|---|---|---|---|")
            for name, rows in stepped.items():
                for r in rows:
                    tops = "; ".join(f"{t['name'][:48]} {t['us']:.1f}" for t in r["top"][:3])
                    print(f"| {name} | {r['batch']} | {r['kernel_us']:.1f} | {r['kernels']} | {tops} |")


def cmd_bench(args) -> int:
    report = run_bench(args)
    if args.host_overhead:
        print(_versions_text(report["versions"]))
        targets = _targets_text(_bench_targets(args.target_modules))
        print(f"host time per compiled decode step, {args.layers} layers, adapted: {targets} (graph work excluded)")
        print("| model | batch | host us | vs dense |")
        print("|---|---|---|---|")
        dense = {row["batch"]: row["host_us"] for row in report["host"]["dense"]}
        for name, rows in report["host"].items():
            for row in rows:
                ratio = row["host_us"] / dense[row["batch"]]
                print(f"| {name} | {row['batch']} | {row['host_us']:.0f} | {ratio:.2f} |")
        print(f"JSON written to {args.out}/rana_host.json")
        return 0
    if args.registers:
        print(_versions_text(report["versions"]))
        print(f"masked GEMV for sm_90, float16, {report['config']}, each row per thread")
        print("| rows per step | tokens | act(gate)*up | registers | stack (spill) bytes |")
        print("|---|---|---|---|---|")
        for r in report["rows"]:
            print(f"| {r['block_k']} | {r['tokens']} | {r['glu']} | {r['registers']} | {r['stack_bytes']} |")
        print(f"JSON written to {args.out}/rana_registers.json")
        return 0
    _print_bench(report)
    print(f"JSON written to {args.out}/rana_bench.json")
    return 0


def cmd_push(args) -> int:
    from .hub import push_to_hub

    try:
        info = push_to_hub(args.dir, args.repo_id, private=True if args.private else None, base_model=args.base_model)
    except ValueError as err:  # bad input, found before anything was pushed
        print(f"rana-hf push: error: {err}", file=sys.stderr)
        return 2
    print(f"pushed {args.dir} with its model card to {args.repo_id}: {info.commit_url}")
    return 0


def run_finetune(args) -> dict:
    """`rana-hf compress`, then fine-tune the adapter with Trainer (distilling from the dense model), refit the
    thresholds, and measure again; the adapter in `--out` is replaced by the fine-tuned one."""
    from transformers import Trainer, TrainingArguments

    from . import measure_flops, refit_thresholds
    from .calibration import calibration_chunks
    from .evaluation import perplexity
    from .training import DistillationTrainer

    summary, rana, tokenizer = run_compress(args)
    eval_chunks = _eval_chunks(args, tokenizer)
    train_chunks = calibration_chunks(
        _calibration_text(args.calibration), tokenizer, seq_len=args.train_seq_len, max_tokens=args.train_tokens
    )
    examples = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in train_chunks]
    training_args = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 10),
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
    )
    model = rana
    if args.lora_r > 0:  # LoRA on top of the RaNA layers: the way to fine-tune input adapters (teal), which own none
        from peft import LoraConfig

        from .training import add_lora
        from .tuner import rana_config as _rana_config

        targets = _rana_config(rana).target_modules
        targets = targets if isinstance(targets, str) else sorted(targets)
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=targets)
        model = add_lora(rana, lora)
    model.train()
    trainer = DistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=examples,
        distill_weight=args.distill_weight,
        lm_weight=args.lm_weight,
        temperature=args.temperature,
    )
    started = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - started
    model.eval()
    refit = calibration_chunks(_calibration_text(args.calibration), tokenizer, args.seq_len, 4096)
    for _ in range(2):
        refit_thresholds(model, refit)
    flops = measure_flops(model, eval_chunks, batch_size=args.eval_batch_size)
    tuned_ppl = perplexity(model, eval_chunks, batch_size=args.eval_batch_size, progress=True)
    gap = summary["perplexity_rana"] - summary["perplexity_dense"]
    summary["finetune"] = {
        "steps": args.max_steps,
        "train_tokens": int(args.max_steps * args.train_batch_size * args.train_seq_len),
        "train_seconds": train_s,
        "training_loss": result.training_loss,
        "distill_weight": args.distill_weight,
        "lm_weight": args.lm_weight,
        "perplexity_before": summary["perplexity_rana"],
        "perplexity_after": tuned_ppl,
        "gap_recovered": (summary["perplexity_rana"] - tuned_ppl) / gap if gap > 0 else 0.0,
        "flop_reduction_measured_after": flops["reduction"],
        "lora_r": args.lora_r,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if args.lora_r > 0 and args.dense_baseline:  # the same LoRA on the dense model: how much is domain adaptation
        from peft import get_peft_model

        _, dense, _ = _load(args.model, args.dtype)
        dense_lora = get_peft_model(dense, lora)
        dense_lora.train()
        started = time.perf_counter()
        Trainer(model=dense_lora, args=training_args, train_dataset=examples).train()
        dense_lora.eval()
        summary["finetune"]["dense_baseline"] = {
            "loss": "lm (a dense model has no other teacher)",
            "perplexity_after": perplexity(dense_lora, eval_chunks, batch_size=args.eval_batch_size, progress=True),
            "train_seconds": time.perf_counter() - started,
        }
        del dense, dense_lora
    rana.save_pretrained(args.out)  # the RaNA adapter (refit thresholds; fine-tuned A and B without LoRA)
    if model is not rana:
        model.save_pretrained(os.path.join(args.out, "lora"))
        summary["finetune"]["lora_folder"] = os.path.join(args.out, "lora", model.active_adapter)
    _dump(summary, os.path.join(args.out, "rana_summary.json"))
    return summary


def cmd_finetune(args) -> int:
    summary = run_finetune(args)
    tuned = summary["finetune"]
    print(
        f"{summary['model']} ({summary['method']}, {summary['allocation']}): dense {summary['perplexity_dense']:.2f}, "
        f"before fine-tuning {tuned['perplexity_before']:.2f}, after {tuned['perplexity_after']:.2f} "
        f"({100 * tuned['gap_recovered']:.0f}% of the gap recovered) at a measured FLOP reduction of "
        f"{tuned['flop_reduction_measured_after']:.3f}; {tuned['steps']} steps in {tuned['train_seconds']:.0f} s"
    )
    print(f"fine-tuned adapter and rana_summary.json written to {args.out}")
    if "dense_baseline" in tuned:
        print(f"the same LoRA on the dense model (LM loss): {tuned['dense_baseline']['perplexity_after']:.2f}")
    if "lora_folder" in tuned:
        print(f"LoRA adapter (load it on the RaNA one with PeftModel.from_pretrained) in {tuned['lora_folder']}")
    return 0


def _add_compress_args(
    parser: argparse.ArgumentParser,
    model_default: str | None,
    out_default: str | None,
    calibration_tokens: int = 32768,
    eval_tokens: int = 16384,
) -> None:
    parser.add_argument(
        "--model",
        default=model_default,
        required=model_default is None,
        help="a model folder or Hub id, or a real small model from the package index: smollm2-135m, gemma-3-270m",
    )
    parser.add_argument("--flop-reduction", type=float, default=0.44, help="fraction of targeted FLOPs to remove")
    parser.add_argument("--out", default=out_default, required=out_default is None, help="adapter output folder")
    parser.add_argument(
        "--calibration", default="default", help="'default' (embedded text), a text file, or a datasets name"
    )
    parser.add_argument("--calibration-tokens", type=int, default=calibration_tokens)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-text", default="default", help="'default' (embedded held-out text) or a text file")
    parser.add_argument("--eval-tokens", type=int, default=eval_tokens, help="held-out tokens for perplexity/FLOPs")
    parser.add_argument("--eval-batch-size", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--no-fuse-qkv", action="store_true", help="separate adapters for q, k and v")
    parser.add_argument(
        "--target-modules", default=None, help="comma-separated module names to adapt (default: per architecture)"
    )
    parser.add_argument("--balance-qkv", action="store_true", help="weigh q, k, v equally in the shared basis")
    parser.add_argument("--refit-passes", type=int, default=2, help="threshold refit passes after injection (0: none)")
    parser.add_argument("--method", choices=METHODS, default=RaNAConfig.method, help="adapter method")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default=RaNAConfig.allocation, help="budget allocation")
    parser.add_argument("--no-larger-than-dense", action="store_true", help="cap ranks: parameters <= dense")
    parser.add_argument(
        "--budget-mode", choices=BUDGET_MODES, default="threshold", help="'topk': exact FLOPs per token"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rana-hf", description="RaNA adapters for Hugging Face models")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    compress_parser = sub.add_parser("compress", help="calibrate RaNA adapters and report quality and FLOPs")
    _add_compress_args(compress_parser, None, None)
    compress_parser.add_argument(
        "--standalone",
        action="store_true",
        help="write a standalone checkpoint (rana_hf.save_compressed: no dense weights where rank adapters replace "
        "them; loads with AutoModelForCausalLM after `import rana_hf`) instead of an adapter folder",
    )
    compress_parser.set_defaults(func=cmd_compress)
    demo_parser = sub.add_parser("demo", help="end to end on the embedded default: compress, reload, generate")
    _add_compress_args(demo_parser, "gemma-3-270m", "rana-demo", calibration_tokens=16384, eval_tokens=4096)
    demo_parser.set_defaults(func=cmd_demo)
    finetune_parser = sub.add_parser(
        "finetune", help="compress, then fine-tune with Trainer (distilled from dense), refit thresholds, measure"
    )
    _add_compress_args(finetune_parser, None, None, eval_tokens=4096)
    finetune_parser.add_argument("--max-steps", type=int, default=100)
    finetune_parser.add_argument("--train-batch-size", type=int, default=4)
    finetune_parser.add_argument("--train-seq-len", type=int, default=256)
    finetune_parser.add_argument("--train-tokens", type=int, default=131072, help="calibration tokens to train on")
    finetune_parser.add_argument("--learning-rate", type=float, default=1e-4)
    finetune_parser.add_argument("--distill-weight", type=float, default=1.0, help="weight of KL(dense || adapted)")
    finetune_parser.add_argument("--lm-weight", type=float, default=1.0, help="weight of the language-model loss")
    finetune_parser.add_argument("--temperature", type=float, default=2.0)
    finetune_parser.add_argument("--gradient-checkpointing", action="store_true")
    finetune_parser.add_argument(
        "--lora-r", type=int, default=0, help="> 0: train a LoRA adapter of this rank on the RaNA layers instead"
    )
    finetune_parser.add_argument(
        "--dense-baseline", action="store_true", help="with --lora-r: also fine-tune the same LoRA on the dense model"
    )
    finetune_parser.set_defaults(func=cmd_finetune)
    eval_parser = sub.add_parser(
        "eval", help="compare methods at equal measured FLOPs: table, JSON and a plot (one calibration pass)"
    )
    eval_parser.add_argument("--model", required=True, help="folder, Hub id, smollm2-135m or gemma-3-270m")
    eval_parser.add_argument("--methods", default=DEFAULT_EVAL_METHODS, help="'name:allocation' pins one")
    eval_parser.add_argument("--allocations", default="uniform", help="allocations of methods not pinned")
    eval_parser.add_argument("--flop-reduction", default="0.3,0.44,0.5", help="comma-separated targets")
    eval_parser.add_argument("--out", default="rana-eval", help="folder for rana_eval.json and rana_eval.png")
    eval_parser.add_argument("--calibration", default="default")
    eval_parser.add_argument(
        "--calibration-tokens", default="32768", help="comma-separated: one calibration pass (timed) per value"
    )
    eval_parser.add_argument("--seq-len", type=int, default=512)
    eval_parser.add_argument("--eval-text", default="default")
    eval_parser.add_argument("--eval-tokens", type=int, default=8192)
    eval_parser.add_argument("--eval-batch-size", type=int, default=2)
    eval_parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    eval_parser.add_argument("--target-modules", default=None, help="comma-separated module names to adapt")
    eval_parser.add_argument("--no-larger-than-dense", action="store_true", help="cap ranks: parameters <= dense")
    eval_parser.add_argument("--budget-mode", choices=BUDGET_MODES, default="threshold", help="'topk': exact FLOPs")
    eval_parser.set_defaults(func=cmd_eval)
    bench_parser = sub.add_parser(
        "bench", help="GPU speed: masked-GEMV kernel and decode tokens/s, dense vs RaNA, random 7B-shape Llama"
    )
    bench_parser.add_argument("--out", default="rana-bench", help="folder for rana_bench.json")
    bench_parser.add_argument("--dtypes", default="float16,bfloat16")
    bench_parser.add_argument("--batch-sizes", default="1,2,4")
    bench_parser.add_argument("--methods", default="teal:global,rana:uniform", help="'name:allocation' list")
    bench_parser.add_argument("--flop-reduction", type=float, default=0.44)
    bench_parser.add_argument(
        "--target-modules",
        default="paper",
        help="linears to adapt: 'paper' (q/k/v, gate, up, down: the set the speed goals name), 'default' (the "
        "presets, which add o_proj) or comma-separated names",
    )
    bench_parser.add_argument("--calibration-tokens", type=int, default=8192, help="random tokens (random weights)")
    bench_parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shape model")
    bench_parser.add_argument("--new-tokens", type=int, default=64)
    bench_parser.add_argument("--no-kernels", dest="kernels", action="store_false", help="skip the kernel table")
    bench_parser.add_argument("--sweep", action="store_true", help="time kernel launch configurations first")
    bench_parser.add_argument(
        "--registers",
        action="store_true",
        help="only the kernel's registers and spills per thread for sm_90 (compiled here, no GPU), by rows per step",
    )
    bench_parser.add_argument(
        "--profile-prefill",
        action="store_true",
        help="also profile one prefill: the GPU's kernel time (the prefill's cost when the host keeps up), top ops",
    )
    bench_parser.add_argument(
        "--sweep-tokens",
        default="1",
        help="token counts the sweep times (tile chosen at 1; rows per step and depth of 2+ tokens at the next)",
    )
    bench_parser.add_argument(
        "--profile-step",
        action="store_true",
        help="also profile the compiled decode step without CUDA graphs: its kernels: time, count, top ones",
    )
    bench_parser.add_argument("--no-decode", dest="decode", action="store_false", help="skip the decode table")
    bench_parser.add_argument(
        "--no-generate",
        dest="generate",
        action="store_false",
        help="time decode with the greedy loop only, not through `generate` (which compiles its own graphs)",
    )
    bench_parser.add_argument(
        "--host-overhead",
        action="store_true",
        help="only the host time per compiled decode step (dense and each method, a small model of --layers layers, "
        "on the CPU)",
    )
    bench_parser.set_defaults(func=cmd_bench)
    push_parser = sub.add_parser(
        "push",
        help="push an adapter folder or a standalone checkpoint to the Hugging Face Hub with a model card (measured "
        "numbers included)",
    )
    push_parser.add_argument(
        "dir",
        help="folder written by `rana-hf compress --out [--standalone]`, `model.save_pretrained` or "
        "`rana_hf.save_compressed`",
    )
    push_parser.add_argument("repo_id", help="Hub repository, namespace/name (created if missing)")
    push_parser.add_argument("--private", action="store_true", help="create the repository private")
    push_parser.add_argument(
        "--base-model",
        default=None,
        help="Hub id of the base model, when the checkpoint names it by a local path (needed for an adapter)",
    )
    push_parser.set_defaults(func=cmd_push)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("rana_hf").setLevel(logging.INFO)
    if isinstance(getattr(args, "flop_reduction", None), float) and not 0 < args.flop_reduction < 1:
        parser.error(f"--flop-reduction must be in (0, 1), got {args.flop_reduction}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

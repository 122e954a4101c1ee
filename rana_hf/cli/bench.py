"""`rana-hf bench`: GPU speed of the masked-GEMV kernel and of decode, dense against RaNA (`rana_hf.benchmark`);
`--host-overhead` and `--registers` run without a GPU."""

from __future__ import annotations

import argparse
import os

import torch

from ..benchmark import SHAPES
from ..config import PAPER_TARGETS
from ._common import (
    DTYPES,
    HelpFormatter,
    adapters_text,
    add_residual_rotation,
    dump,
    int_list,
    method_specs,
    versions,
    versions_text,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="GPU speed: masked-GEMV kernel and decode tokens/s, dense vs RaNA, random 7B-shape Llama",
        description="GPU speed on a random Llama-2-7B-shaped model: the masked-GEMV kernel against cuBLAS, decode "
        "tokens/s and prefill, dense against each method (prepared with rana_hf.inference.prepare_for_decode). "
        "Writes rana_bench.json; --host-overhead and --registers run on the CPU.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", default="rana-bench", help="folder for rana_bench.json")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="comma-separated dtypes of kernels and models")
    parser.add_argument(
        "--batch-sizes", default="1,2,4", help="comma-separated decode batch sizes (token counts of the kernel table)"
    )
    parser.add_argument("--methods", default="teal:global,rana:uniform", help="comma-separated 'name:allocation' list")
    parser.add_argument("--flop-reduction", type=float, default=0.44, help="FLOP reduction target of every method")
    parser.add_argument(
        "--target-modules",
        default="paper",
        help="linears to adapt: 'paper' (q/k/v, gate, up, down: the set the speed goals name), 'default' (the "
        "presets, which add o_proj) or comma-separated names",
    )
    parser.add_argument("--calibration-tokens", type=int, default=8192, help="random tokens (random weights)")
    parser.add_argument(
        "--compensation-rank",
        type=int,
        default=None,
        help="method compensated: a low-rank term of this rank on every adapted linear (random weights leave nothing "
        "for a term to capture, so calibration alone gives every linear rank 0, the plain mask)",
    )
    parser.add_argument(
        "--force-rotation",
        action="store_true",
        help="method rotated: rotate q/k/v and gate/up everywhere (random weights give no principal axes worth a "
        "rotation's cost, so calibration alone keeps the plain masks)",
    )
    add_residual_rotation(parser)
    parser.add_argument(
        "--shape",
        default="llama-2-7b",
        choices=sorted(SHAPES),
        help="shape of the random model: llama-2-7b (4096 wide, MLP 11008, 32 heads, SiLU) or gemma-3-4b (2560 wide, "
        "MLP 10240, 8 heads of 256 over 4 KV heads, GELU-tanh, Gemma 3's norms and sliding-window layers)",
    )
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own, 32 or 34)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed")
    parser.add_argument("--no-kernels", dest="kernels", action="store_false", help="skip the kernel table")
    parser.add_argument("--sweep", action="store_true", help="time kernel launch configurations first")
    parser.add_argument(
        "--registers",
        action="store_true",
        help="only the kernel's registers and spills per thread for sm_90 (compiled here, no GPU), by rows per step",
    )
    parser.add_argument(
        "--profile-prefill",
        action="store_true",
        help="also profile one prefill: the GPU's kernel time (the prefill's cost when the host keeps up), top ops",
    )
    parser.add_argument(
        "--sweep-tokens",
        default="1",
        help="token counts the sweep times (tile chosen at 1; rows per step and depth of 2+ tokens at the next)",
    )
    parser.add_argument(
        "--profile-step",
        action="store_true",
        help="also profile the compiled decode step without CUDA graphs: its kernels: time, count, top ones",
    )
    parser.add_argument(
        "--no-pdl",
        dest="pdl",
        action="store_false",
        help="launch the masked-GEMV kernel without programmatic dependent launch (to compare)",
    )
    parser.add_argument("--no-decode", dest="decode", action="store_false", help="skip the decode table")
    parser.add_argument(
        "--no-generate",
        dest="generate",
        action="store_false",
        help="time decode with the greedy loop only, not through `generate` (which compiles its own graphs)",
    )
    parser.add_argument(
        "--host-overhead",
        action="store_true",
        help="only the host time per compiled decode step (dense and each method, a small model of --layers layers, "
        "on the CPU)",
    )
    parser.set_defaults(func=run)
    return parser


def bench_targets(spec: str) -> list[str] | None:
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


def targets_text(targets: list[str] | str | None) -> str:
    """The adapted linears as a table header names them: the list, or "default" (the presets)."""
    return ", ".join(targets) if isinstance(targets, list) else "default"


def _arguments(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def run(args) -> int:
    from .. import benchmark

    out = os.path.abspath(args.out)
    if args.host_overhead or args.registers:
        os.makedirs(args.out, exist_ok=True)
    if args.host_overhead:
        layers = args.layers or SHAPES[args.shape][1]["num_hidden_layers"]
        report = {"versions": versions(), "args": _arguments(args)}
        report |= benchmark.run_host_overhead(
            method_specs(args.methods, "uniform"),
            args.flop_reduction,
            bench_targets(args.target_modules),
            layers,
            int_list(args.batch_sizes),
        )
        dump(report, os.path.join(args.out, "rana_host.json"))
        print_host(report, layers, bench_targets(args.target_modules))
        print(f"JSON written to {out}/rana_host.json")
        return 0
    if args.registers:
        import triton

        report = {"versions": versions() | {"triton": triton.__version__}} | benchmark.run_registers(
            int_list(args.batch_sizes)
        )
        dump(report, os.path.join(args.out, "rana_registers.json"))
        print_registers(report)
        print(f"JSON written to {out}/rana_registers.json")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("rana-hf bench measures GPU speed and needs CUDA (`--host-overhead` runs on the CPU)")
    import triton

    from ..kernels import triton_gemv

    triton_gemv.PDL = args.pdl
    os.makedirs(args.out, exist_ok=True)
    header = {"versions": versions() | {"triton": triton.__version__}, "args": _arguments(args)}
    path = os.path.join(args.out, "rana_bench.json")
    report = header | benchmark.run_bench(
        dtypes=[DTYPES[d] for d in args.dtypes.split(",")],
        batch_sizes=int_list(args.batch_sizes),
        methods=method_specs(args.methods, "uniform"),
        flop_reduction=args.flop_reduction,
        target_modules=bench_targets(args.target_modules),
        calibration_tokens=args.calibration_tokens,
        layers=args.layers,
        shape=args.shape,
        compensation_rank=args.compensation_rank,
        force_rotation=args.force_rotation,
        residual_rotation=args.residual_rotation,
        new_tokens=args.new_tokens,
        kernels=args.kernels,
        sweep=args.sweep,
        sweep_tokens=int_list(args.sweep_tokens),
        decode=args.decode,
        generate=args.generate,
        prefill_profile=args.profile_prefill,
        step_profile=args.profile_step,
        on_progress=lambda partial: dump(header | partial, path),
    )
    dump(report, path)
    print_bench(report)
    print(f"JSON written to {out}/rana_bench.json")
    return 0


def print_host(report: dict, layers: int, targets: list[str] | None) -> None:
    print(versions_text(report["versions"]))
    print(
        f"host time per compiled decode step, {layers} layers, adapted: {targets_text(targets)} (graph work excluded)"
    )
    print("| model | batch | host us | vs dense |")
    print("|---|---|---|---|")
    dense = {row["batch"]: row["host_us"] for row in report["host"]["dense"]}
    for name, rows in report["host"].items():
        for row in rows:
            print(f"| {name} | {row['batch']} | {row['host_us']:.0f} | {row['host_us'] / dense[row['batch']]:.2f} |")


def print_registers(report: dict) -> None:
    print(versions_text(report["versions"]))
    print(f"masked GEMV for sm_90, float16, {report['config']}, each row per thread")
    print("| rows per step | tokens | act(gate)*up | registers | stack (spill) bytes |")
    print("|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['block_k']} | {r['tokens']} | {r['glu']} | {r['registers']} | {r['stack_bytes']} |")


def print_bench(report: dict) -> None:
    print(f"{report['gpu']}; copy bandwidth {report['copy_GBps']:.0f} GB/s; " + versions_text(report["versions"]))
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
        targets = targets_text(entry.get("targets"))
        shape = entry.get("shape", "llama-2-7b")
        turned = {row.get("residual_rotation") for row in entry.values() if isinstance(row, dict)} - {None}
        turns = f"; residual stream rotated per {', '.join(sorted(turned))} (its turns timed)" if turned else ""
        print(f"\ndecode, {shape}, {entry['dtype']}, {entry['layers']} layers, adapted: {targets}{turns}")
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
        for name, row in entry.items():
            if isinstance(row, dict) and len(row.get("adapters", {})) > 1:  # a method that chose between kinds
                print(f"{name}: units per adapter: {adapters_text(row['adapters'])}")
            if isinstance(row, dict) and "compensation_ranks" in row:
                ranks = row["compensation_ranks"]
                print(f"{name}: low-rank terms of the {len(ranks)} adapted linears: {_rank_counts(ranks)}")
            if isinstance(row, dict) and "rotation_ranks" in row:
                ranks = list(row["rotation_ranks"].values())
                print(f"{name}: {len(ranks)} rotations: {_rank_counts(ranks)}")
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


def _rank_counts(ranks: list[int]) -> str:
    """'rank 8: 3, rank 16: 5': how many of `ranks` have each value."""
    return ", ".join(f"rank {r}: {ranks.count(r)}" for r in sorted(set(ranks)))

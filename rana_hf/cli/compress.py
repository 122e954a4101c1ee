"""`rana-hf compress`: calibrate RaNA adapters on a model, report dense vs adapted quality and FLOPs, save."""

from __future__ import annotations

import argparse
import os
import time

import torch

from ._common import (
    HelpFormatter,
    Stages,
    add_compress_args,
    calibration_text,
    dump,
    heldout_chunks,
    load_model,
    perplexity,
    target_list,
    versions,
    versions_text,
)

DEMO_PROMPT = "Friends, Romans, countrymen,"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compress",
        help="calibrate RaNA adapters and report quality and FLOPs",
        description="Calibrate RaNA adapters on a model, measure perplexity and FLOPs on held-out text against the "
        "dense model, and save the adapter (or a standalone checkpoint) with rana_summary.json.",
        formatter_class=HelpFormatter,
    )
    add_compress_args(parser, None, None)
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="write a standalone checkpoint (rana_hf.save_compressed: no dense weights where rank adapters replace "
        "them; loads with AutoModelForCausalLM after `import rana_hf`) instead of an adapter folder",
    )
    parser.set_defaults(func=run)
    return parser


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 30) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def compress_and_measure(args, stages: Stages | None = None) -> tuple[dict, object, object]:
    """Load, evaluate dense, compress, evaluate the adapted model, save; returns (summary, adapted model, tokenizer).
    `stages` labels each step as it runs (`Stages(0)`, the default, prints nothing)."""
    from .. import RaNAConfig, compress, measure_flops, save_compressed
    from ..files import staged_directory
    from ..hub import write_model_card

    stages = stages or Stages(0)
    with stages(f"load {args.model}"):
        path, model, tokenizer = load_model(args.model, args.dtype)
        chunks = heldout_chunks(args.eval_text, tokenizer, args.seq_len, args.eval_tokens)
    with stages(f"dense perplexity on {chunks.numel()} held-out tokens, and a greedy generation"):
        started = time.perf_counter()
        dense_ppl = perplexity(model, chunks, args.eval_batch_size, "perplexity, dense")
        dense_eval_s = time.perf_counter() - started
        dense_text = greedy(model, tokenizer, DEMO_PROMPT)
    config = RaNAConfig(
        flop_reduction=args.flop_reduction,
        calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.seq_len,
        fuse_qkv=not args.no_fuse_qkv,
        refit_passes=args.refit_passes,
        balance_qkv=args.balance_qkv,
        target_modules=target_list(args.target_modules),
        method=args.method,
        allocation=args.allocation,
        size_cap=args.size_cap,
        budget_mode=args.budget_mode,
        residual_rotation=args.residual_rotation,
    )
    with stages(f"compress ({args.method}, {args.allocation}): calibration statistics, allocation, threshold refit"):
        started = time.perf_counter()
        rana = compress(model, config, calibration=calibration_text(args.calibration), tokenizer=tokenizer)
        compress_s = time.perf_counter() - started
    with stages("adapted model: measured FLOPs and perplexity on the same tokens"):
        flops = measure_flops(rana, chunks, batch_size=args.eval_batch_size)
        rana_ppl = perplexity(rana, chunks, args.eval_batch_size, "perplexity, adapted")
    kind = "standalone checkpoint" if getattr(args, "standalone", False) else "adapter"
    with stages(f"save the {kind} to {os.path.abspath(args.out)}"):
        if getattr(args, "standalone", False):
            save_compressed(rana, args.out, tokenizer=tokenizer)
        else:
            with staged_directory(args.out) as staging:  # a failure halfway leaves the folder as it was
                rana.save_pretrained(staging)
        summary = {
            "model": args.model,
            "model_path": path,
            "dtype": args.dtype,
            "method": args.method,
            "allocation": args.allocation,
            "flop_reduction_target": args.flop_reduction,
            "flop_reduction_measured": flops["reduction"],
            "eval_tokens": int(chunks.numel()),
            "perplexity_dense": dense_ppl,
            "perplexity_rana": rana_ppl,
            "compress_seconds": compress_s,
            "dense_eval_seconds": dense_eval_s,
            "calibration_tokens": args.calibration_tokens,
            "calibration": args.calibration,
            "greedy_dense": dense_text,
            "versions": versions(),
        }
        dump(summary, os.path.join(args.out, "rana_summary.json"))
        if not getattr(args, "standalone", False):
            write_model_card(args.out)  # README.md again, named after the folder and with the measured numbers
    return summary, rana, tokenizer


def print_summary(summary: dict) -> None:
    rows = [
        ("model", summary["model"]),
        ("method / allocation", f"{summary['method']} / {summary['allocation']}"),
        ("held-out tokens", summary["eval_tokens"]),
        ("perplexity dense", f"{summary['perplexity_dense']:.3f}"),
        ("perplexity RaNA", f"{summary['perplexity_rana']:.3f}"),
        ("FLOP reduction target", f"{summary['flop_reduction_target']:.3f}"),
        ("FLOP reduction measured", f"{summary['flop_reduction_measured']:.3f}"),
        ("compress time (s)", f"{summary['compress_seconds']:.1f}"),
        ("versions", versions_text(summary["versions"])),
    ]
    width = max(len(name) for name, _ in rows)
    print("| " + "metric".ljust(width) + " | value |")
    print("|-" + "-" * width + "-|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


def run(args) -> int:
    summary, _, _ = compress_and_measure(args, Stages(5))
    print_summary(summary)
    kind = "standalone checkpoint" if args.standalone else "adapter"
    print(f"{kind} written to {os.path.abspath(args.out)}")
    return 0

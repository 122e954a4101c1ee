"""`rana-hf eval`: compare methods at equal measured FLOPs (`rana_hf.sweep.compare_methods`): table, JSON, plot."""

from __future__ import annotations

import argparse
import os

from ..config import BUDGET_MODES
from ._common import (
    BUDGET_MODE_HELP,
    DTYPES,
    EVAL_TEXT_HELP,
    MODEL_HELP,
    HelpFormatter,
    adapters_text,
    add_residual_rotation,
    add_size_cap,
    calibration_text,
    dump,
    float_list,
    heldout_chunks,
    int_list,
    load_model,
    method_specs,
    target_list,
    versions,
    versions_text,
)

# The paper's method in both allocations, each baseline in its usual form (TEAL's own allocation is greedy, so both),
# and auto with global allocation.
DEFAULT_EVAL_METHODS = "rana,rana:global,cats,teal,teal:global,svd,auto:global"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="compare methods at equal measured FLOPs: table, JSON and a plot (one calibration pass)",
        description="Calibrate once, then compress with every method x allocation x FLOP reduction and compare each "
        "to the dense model on held-out text: perplexity, KL to dense, top-1 agreement, measured FLOP reduction. "
        'Writes rana_eval.json and rana_eval.png (matplotlib: pip install "rana_hf[eval]").',
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--methods",
        default=DEFAULT_EVAL_METHODS,
        help="comma-separated methods (teal, rana, cats, compensated, rotated, svd, auto: see `rana-hf compress "
        "--help`); 'name:allocation' pins one allocation",
    )
    parser.add_argument(
        "--allocations", default="uniform", help="comma-separated allocations (uniform, global) of methods not pinned"
    )
    parser.add_argument("--flop-reduction", default="0.3,0.44,0.5", help="comma-separated targets, each in (0, 1)")
    parser.add_argument("--out", default="rana-eval", help="folder for rana_eval.json and rana_eval.png")
    parser.add_argument(
        "--calibration", default="default", help="'default' (embedded Shakespeare), a text file, or a datasets name"
    )
    parser.add_argument(
        "--calibration-tokens", default="32768", help="comma-separated: one calibration pass (timed) per value"
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and evaluation chunk")
    parser.add_argument(
        "--eval-text",
        default="default",
        help=EVAL_TEXT_HELP + "; several, comma-separated: each plan is compared on every one (the first fills the "
        "main table and the plot)",
    )
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for the comparison")
    parser.add_argument("--eval-batch-size", type=int, default=2, help="chunks per forward pass when evaluating")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype the model is loaded in")
    parser.add_argument(
        "--target-modules", default=None, help="comma-separated module names to adapt; None: the architecture's preset"
    )
    add_size_cap(parser)
    parser.add_argument("--budget-mode", choices=BUDGET_MODES, default="threshold", help=BUDGET_MODE_HELP)
    add_residual_rotation(parser)
    parser.set_defaults(func=run)
    return parser


def row_line(row: dict) -> str:
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


def print_eval(report: dict) -> None:
    calibrations = ", ".join(f"{c['tokens']} tokens in {c['seconds']:.0f} s" for c in report["calibrations"])
    rotated = f"; residual stream rotated per {report['residual_rotation']}" if report.get("residual_rotation") else ""
    print(
        f"\n{report['model']}: dense perplexity {report.get('dense_perplexity', float('nan')):.2f} on "
        f"{report['eval_tokens']} held-out tokens; calibration pass {calibrations}{rotated}"
    )
    print(
        "| method | allocation | target | measured reduction | perplexity | KL to dense | top-1 agreement "
        "| params/dense | calibration tokens | calibration s | compress s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        print(row_line(row))
    for row in report["rows"]:
        if len(row.get("adapters", {})) > 1:  # a method that chose between kinds: what it chose
            spec = f"{row['method']}:{row['allocation']} at {row['flop_reduction_target']}"
            print(f"{spec}: units per adapter: {adapters_text(row['adapters'])}")
    for name, text in report.get("other_texts", {}).items():
        print(
            f"\non {name}: dense perplexity {text['dense_perplexity']:.2f} on {text['eval_tokens']} tokens\n"
            "| method | allocation | target | measured reduction | perplexity | KL to dense | top-1 agreement |\n"
            "|---|---|---|---|---|---|---|"
        )
        for row in report["rows"]:
            if name in row.get("other_texts", {}):
                other = row["other_texts"][name]
                measures = (other["flop_reduction_measured"], other["perplexity"], other["kl_to_dense"])
                print(
                    f"| {row['method']} | {row['allocation']} | {row['flop_reduction_target']:.2f} | "
                    f"{measures[0]:.3f} | {measures[1]:.2f} | {measures[2]:.3f} | {other['top1_agreement']:.3f} |"
                )
    print("versions: " + versions_text(report["versions"]))


def run(args) -> int:
    from ..sweep import check_sweep, compare_methods, plot_comparison

    try:
        import matplotlib  # noqa: F401  (checked first: the plot comes at the end of a long run)
    except ImportError as error:
        raise SystemExit('rana-hf eval draws its plot with matplotlib: pip install "rana_hf[eval]"') from error
    specs = method_specs(args.methods, args.allocations)
    reductions = float_list(args.flop_reduction)
    token_counts = int_list(str(args.calibration_tokens))
    try:
        check_sweep(specs, reductions, token_counts)
    except ValueError as error:
        raise SystemExit(f"rana-hf eval: {error} (--methods, --flop-reduction, --calibration-tokens)") from error
    os.makedirs(args.out, exist_ok=True)
    path, model, tokenizer = load_model(args.model, args.dtype)
    texts = [text.strip() for text in args.eval_text.split(",") if text.strip()]
    if not texts or len(set(texts)) < len(texts):
        raise SystemExit(f"rana-hf eval: --eval-text {args.eval_text!r} names no text, or one text twice")
    chunks, *others = [heldout_chunks(text, tokenizer, args.seq_len, args.eval_tokens) for text in texts]
    header = {"model": args.model, "model_path": path, "dtype": args.dtype, "calibration": args.calibration}
    tail = {
        "budget_mode": args.budget_mode,
        "residual_rotation": args.residual_rotation,
        "eval_text": args.eval_text,
        "versions": versions(),
    }
    json_path = os.path.join(args.out, "rana_eval.json")

    def on_row(row: dict, partial: dict) -> None:
        if "error" not in row:  # an unreachable target is logged by compare_methods
            print(row_line(row), flush=True)
        dump(header | partial | tail, json_path)

    report = compare_methods(
        model,
        tokenizer,
        calibration_text(args.calibration),
        chunks,
        specs,
        reductions,
        calibration_tokens=token_counts,
        config_kwargs=dict(
            calibration_seq_len=args.seq_len,
            target_modules=target_list(args.target_modules),
            size_cap=args.size_cap,
            budget_mode=args.budget_mode,
            residual_rotation=args.residual_rotation,
        ),
        eval_batch_size=args.eval_batch_size,
        on_row=on_row,
        other_chunks=dict(zip(texts[1:], others, strict=True)),
    )
    report = header | report | tail
    dump(report, json_path)
    plot_comparison(report, os.path.join(args.out, "rana_eval.png"), title=f"{args.model}, no fine-tuning")
    print_eval(report)
    out = os.path.abspath(args.out)
    print(f"JSON and plot written to {out}/rana_eval.json and {out}/rana_eval.png")
    return 0

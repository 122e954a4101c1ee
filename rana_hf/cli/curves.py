"""`rana-hf curves`: each adapter kind's error-vs-FLOPs curve on every targeted linear (`rana_hf.sweep.kind_curves`),
summarised per linear type: table and JSON."""

from __future__ import annotations

import argparse
import os

from ._common import (
    DTYPES,
    MODEL_HELP,
    HelpFormatter,
    calibration_text,
    dump,
    load_model,
    target_list,
    versions,
    versions_text,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..sweep import CURVE_KINDS

    parser = subparsers.add_parser(
        "curves",
        help="each adapter kind's error-vs-FLOPs curve on every targeted linear (one calibration pass)",
        description="Calibrate once, then measure, for every targeted linear and adapter kind, the relative output "
        "error E||Wx - adapted(x)||^2 / E||Wx||^2 on the calibration sample against the share of the linear's dense "
        "MACs it spends, extra matrices included (a rank adapter's router, a compensation's term): the curves the "
        "allocator chooses from. Prints the median over layers per linear type at a few shares; rana_curves.json "
        "holds every curve.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--kinds", default=",".join(CURVE_KINDS), help="comma-separated adapter kinds")
    parser.add_argument("--out", default="rana-curves", help="folder for rana_curves.json")
    parser.add_argument(
        "--calibration", default="default", help="'default' (embedded Shakespeare), a text file, or a datasets name"
    )
    parser.add_argument("--calibration-tokens", type=int, default=32768, help="calibration tokens")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype the model is loaded in")
    parser.add_argument(
        "--target-modules", default=None, help="comma-separated module names to adapt; None: the architecture's preset"
    )
    parser.set_defaults(func=run)
    return parser


def print_curves(report: dict) -> None:
    shares = report["shares"]
    print(
        f"\n{report['model']}: median relative output error over layers, on {report['calibration_tokens']} "
        "calibration tokens, at a share of each linear's dense MACs (extra matrices included; '-' where the kind "
        "cannot be that cheap)"
    )
    print("| linear | kind | " + " | ".join(f"{share:.2f}" for share in shares) + " |")
    print("|---|---|" + "---|" * len(shares))
    for leaf, kinds in report["summary"].items():
        for kind, errors in kinds.items():
            cells = " | ".join("-" if e is None else f"{e:.4f}" for e in errors)
            print(f"| {leaf} | {kind} | {cells} |")
    print("versions: " + versions_text(report["versions"]))


def run(args) -> int:
    from ..adapters import KINDS
    from ..sweep import kind_curves

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise SystemExit(f"rana-hf curves: unknown --kinds {unknown or kinds}; choose from {', '.join(sorted(KINDS))}")
    os.makedirs(args.out, exist_ok=True)
    path, model, tokenizer = load_model(args.model, args.dtype)
    report = kind_curves(
        model,
        calibration_text(args.calibration),
        tokenizer,
        kinds=kinds,
        target_modules=target_list(args.target_modules),
        calibration_tokens=args.calibration_tokens,
    )
    report = {"model": args.model, "model_path": path, "dtype": args.dtype, "calibration": args.calibration} | report
    report["versions"] = versions()
    json_path = os.path.join(args.out, "rana_curves.json")
    dump(report, json_path)
    print_curves(report)
    print(f"JSON written to {json_path}")
    return 0

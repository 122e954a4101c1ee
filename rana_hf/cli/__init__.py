"""`rana-hf` command line: compress a model and report dense vs RaNA quality and FLOPs, an end-to-end demo, method
comparisons, fine-tuning, GPU benchmarks and Hub uploads.

Thin over the Python API: each subcommand (one module here) parses its options, calls the library (`rana_hf.compress`,
`rana_hf.sweep`, `rana_hf.training.finetune`, `rana_hf.benchmark`, `rana_hf.push_to_hub`) and prints the results.
"""

from __future__ import annotations

import argparse
import logging
import warnings

from . import bench, compress, curves, demo, eval, finetune, push
from ._common import HelpFormatter

SUBCOMMANDS = (compress, demo, finetune, eval, curves, bench, push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rana-hf",
        description="RaNA adapters for Hugging Face models. Run `rana-hf demo` for a tour, `rana-hf <command> --help` "
        "for a command's options.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every library's INFO messages, not only rana_hf's"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("rana_hf").setLevel(logging.INFO)
    # PEFT 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5.2x deprecates; it is
    # PEFT's call (inside `get_peft_model` and `PeftModel.from_pretrained`), not the user's: silence that one warning.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if isinstance(getattr(args, "flop_reduction", None), float) and not 0 < args.flop_reduction < 1:
        parser.error(f"--flop-reduction must be in (0, 1), got {args.flop_reduction}")
    return args.func(args)

"""`rana-hf push`: push an adapter folder or a standalone checkpoint to the Hub with a model card
(`rana_hf.push_to_hub`)."""

from __future__ import annotations

import argparse
import sys

from ._common import HelpFormatter


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "push",
        help="push an adapter folder or a standalone checkpoint to the Hugging Face Hub with a model card (measured "
        "numbers included)",
        description="Push a folder written by `rana-hf compress` (or `save_pretrained`, `rana_hf.save_compressed`) "
        "to the Hugging Face Hub, with a model card that carries the measured numbers of its rana_summary.json.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "dir",
        help="folder written by `rana-hf compress --out [--standalone]`, `model.save_pretrained` or "
        "`rana_hf.save_compressed`",
    )
    parser.add_argument("repo_id", help="Hub repository, namespace/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument(
        "--base-model",
        default=None,
        help="Hub id of the base model, when the checkpoint names it by a local path (needed for an adapter)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from .. import push_to_hub

    try:
        info = push_to_hub(args.dir, args.repo_id, private=True if args.private else None, base_model=args.base_model)
    except ValueError as err:  # bad input, found before anything was pushed
        print(f"rana-hf push: error: {err}", file=sys.stderr)
        return 2
    print(f"pushed {args.dir} with its model card to {args.repo_id}: {info.commit_url}")
    return 0

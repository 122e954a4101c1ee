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


DEMO_PROMPT = "Friends, Romans, countrymen,"


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int = 30) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def run_compress(args) -> tuple[dict, object, object]:
    """Load, evaluate dense, compress, evaluate RaNA, save; returns (summary, RaNA model, tokenizer)."""
    from . import RaNAConfig, compress, measure_flops
    from .calibration import calibration_chunks
    from .data import load_text
    from .evaluation import perplexity

    path, model, tokenizer = _load(args.model, args.dtype)
    eval_text = load_text("heldout") if args.eval_text == "default" else open(args.eval_text, encoding="utf-8").read()
    eval_chunks = calibration_chunks([eval_text], tokenizer, seq_len=args.seq_len, max_tokens=args.eval_tokens)
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
    )
    started = time.perf_counter()
    rana = compress(model, config, calibration=_calibration_text(args.calibration), tokenizer=tokenizer)
    compress_s = time.perf_counter() - started
    flops = measure_flops(rana, eval_chunks, batch_size=args.eval_batch_size)
    rana_ppl = perplexity(rana, eval_chunks, batch_size=args.eval_batch_size, progress=True)
    rana.save_pretrained(args.out)
    summary = {
        "model": args.model,
        "model_path": path,
        "dtype": args.dtype,
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
        ("held-out tokens", summary["eval_tokens"]),
        ("perplexity dense", f"{summary['perplexity_dense']:.3f}"),
        ("perplexity RaNA", f"{summary['perplexity_rana']:.3f}"),
        ("FLOP reduction target", f"{summary['flop_reduction_target']:.3f}"),
        ("FLOP reduction measured", f"{summary['flop_reduction_measured']:.3f}"),
        ("compress time (s)", f"{summary['compress_seconds']:.1f}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in summary["versions"].items())),
    ]
    width = max(len(name) for name, _ in rows)
    print("| " + "metric".ljust(width) + " | value |")
    print("|-" + "-" * width + "-|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


def cmd_compress(args) -> int:
    summary, _, _ = run_compress(args)
    _print_summary(summary)
    print(f"adapter written to {args.out}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rana-hf", description="RaNA adapters for Hugging Face models")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    compress_parser = sub.add_parser("compress", help="calibrate RaNA adapters and report quality and FLOPs")
    _add_compress_args(compress_parser, None, None)
    compress_parser.set_defaults(func=cmd_compress)
    demo_parser = sub.add_parser("demo", help="end to end on the embedded default: compress, reload, generate")
    _add_compress_args(demo_parser, "gemma-3-270m", "rana-demo", calibration_tokens=16384, eval_tokens=4096)
    demo_parser.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("rana_hf").setLevel(logging.INFO)
    if not 0 < args.flop_reduction < 1:
        parser.error(f"--flop-reduction must be in (0, 1), got {args.flop_reduction}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

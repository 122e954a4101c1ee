"""`RaNAConfig`: the PEFT config of RaNA adapters, its validation and the per-architecture defaults."""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig
from peft.utils import PeftType

from . import adapters

# Version of the adapter format written by this package (plan layout and tensor names). A checkpoint written by a
# newer format is refused instead of being loaded as a silently different model.
# 2: neuron entries with an importance, gated and follower entries (CATS); 3: residual_rotation (its bases travel with
# the adapter; a reader of format 2 would drop the field and load a silently wrong model)
FORMAT_VERSION = 3
FORMAT_VERSION_UNROTATED = 2  # written without residual_rotation, so that older rana_hf still reads those adapters

PEFT_TYPE_NAME = "RANA_HF"  # the name a user sees in PEFT's KeyError when rana_hf is not imported

# Roles of the linears in a decoder block, by module name. q/k/v share their input (the attention input), gate/up
# share theirs (the MLP input), down's input is the gated product act(gate x) * up x.
QKV_NAMES = ("q_proj", "k_proj", "v_proj")
ATTN_OUT = "o_proj"
MLP_GATE, MLP_UP, MLP_DOWN = "gate_proj", "up_proj", "down_proj"
# o_proj is not in the paper's targets; adding it lowers perplexity at equal FLOPs removed (SmolLM2 teal:global 42.00
# -> 39.86, Gemma-3-270M 67.55 -> 60.95; docs/benchmarks.md), so the presets include it. The paper's set:
# PAPER_TARGETS.
_DECODER_TARGETS = [*QKV_NAMES, ATTN_OUT, MLP_GATE, MLP_UP, MLP_DOWN]
PAPER_TARGETS = [*QKV_NAMES, MLP_GATE, MLP_UP, MLP_DOWN]

# Default targets per `config.model_type`: architectures whose block layout (q/k/v, o, gated MLP) we know.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    model_type: list(_DECODER_TARGETS)
    for model_type in (
        "llama",
        "mistral",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "qwen2",
        "qwen3",
    )
}

# Adapter methods (`adapters.METHODS`): the paper's RaNA, the comparison points CATS-style, TEAL-style and static
# SVD, and `auto`, which lets each unit choose its basis (data-aware low rank or identity) from measured error-vs-FLOPs
# curves.
METHODS = tuple(adapters.METHODS)
# How the budget is spread: the same fraction in every unit (the paper) or one model-wide budget (global).
ALLOCATIONS = ("uniform", "global")
BUDGET_MODES = ("threshold", "topk")
# How the rank adapters' size is capped: the adapted targets no larger than dense in total (the allocator lowers ranks
# above break-even where needed), every rank adapter no larger than the weight it replaces, or no cap.
SIZE_CAPS = ("model", "layer", "none")
# How the residual stream may be rotated (rotation.py): a basis per decoder layer, or one for the model.
RESIDUAL_ROTATIONS = ("layer", "model")


def ensure_peft_type() -> PeftType:
    """Add the `RANA_HF` member to PEFT's closed `PeftType` enum (idempotent) and return it.

    PEFT's registry refuses names that are not members of the enum, and transformers calls `.value` on the peft type,
    so a plain string does not work.
    """
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    assert isinstance(PeftType(PEFT_TYPE_NAME), enum.Enum)
    return member


@dataclass
class RaNAConfig(PeftConfig):
    """Configuration of RaNA adapters (Rank and Neuron Allocator, ICLR 2025).

    A targeted linear `y = W x` becomes `y = A (mask(x) * B x) + bias`, with `B` a data-aware basis truncated to `rank`
    rows and `mask` keeping the components with `|(B x)_i| >= threshold`; MLP down projections keep the neurons whose
    importance `|h_j| * ||W[:, j]||` passes a threshold. `flop_reduction` sets the budget; calibration fills `plan`.

    Example:
        ```py
        >>> import rana_hf
        >>> config = rana_hf.RaNAConfig(flop_reduction=0.44)
        >>> model = rana_hf.compress(base_model, config, calibration=texts, tokenizer=tokenizer)
        ```
    """

    flop_reduction: float = field(
        default=0.44,
        metadata={"help": "Fraction of the dense FLOPs of the targeted linears to remove, in (0, 1)."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffixes) or a regex to adapt. Default: the q/k/v, o, gate, up and down "
            "projections of Llama, Gemma 1/2/3, Mistral and Qwen2/3 (the paper's set, `config.PAPER_TARGETS`, leaves "
            "out o_proj). "
            "Filled with the exact module names after calibration."
        },
    )
    fuse_qkv: bool = field(
        default=True,
        metadata={"help": "Share one rank adapter (one `B x`) between q, k and v, which read the same input."},
    )
    balance_qkv: bool = field(
        default=False,
        metadata={
            "help": "With fuse_qkv: weigh q, k and v equally in the shared decomposition (each divided by its RMS "
            "output) instead of by raw output energy."
        },
    )
    calibration_tokens: int = field(
        default=32768, metadata={"help": "Number of calibration tokens used for the input statistics."}
    )
    calibration_seq_len: int = field(default=512, metadata={"help": "Length of each calibration sequence."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Sequences per calibration forward pass."})
    threshold_sample_tokens: int = field(
        default=2048,
        metadata={"help": "Tokens per layer kept (sampled) to fit thresholds and compare plans; bounds memory."},
    )
    min_calibration_tokens: int = field(
        default=512, metadata={"help": "Refuse calibration with fewer tokens than this (statistics too noisy)."}
    )
    refit_passes: int = field(
        default=2,
        metadata={
            "help": "Passes of threshold refitting on the adapted model after injection (0: none). Upstream "
            "approximation shifts deeper layers' inputs; refitting holds each module's planned FLOPs."
        },
    )
    refit_tokens: int = field(default=4096, metadata={"help": "Calibration tokens used per refit pass."})
    method: str = field(
        default="teal",
        metadata={
            "help": f"Adapter method, one of {METHODS}: 'teal' (the default: identity-basis input adapters, a mask on "
            "|x| at every targeted linear's input; measured best at equal FLOPs), 'rana' (the paper's rank + neuron "
            "adapters), 'cats' (MLP only, mask on |act(gate x)|), 'compensated' (teal's mask plus a data-aware "
            "low-rank term for the dropped inputs, its rank chosen per budget), 'rotated' (teal's mask in the "
            "principal axes of q/k/v's and gate/up's inputs, the rotation computed at run time and counted, where it "
            "beats the plain mask), 'svd' (fixed rank, no mask), 'auto' "
            "(per module the best of the rank, neuron and magnitude adapters, checked end to end)."
        },
    )
    allocation: str = field(
        default="global",
        metadata={
            "help": f"How the budget is spread, one of {ALLOCATIONS}: 'uniform' (every layer keeps the same fraction, "
            "as in the paper) or 'global' (one model-wide budget spent where the estimated loss drops most; errors "
            "are weighted by the loss gradient at each module's output)."
        },
    )
    fisher_tokens: int = field(
        default=2048,
        metadata={"help": "Calibration tokens of the backward passes that weigh module errors (global allocation)."},
    )
    budget_mode: str = field(
        default="threshold",
        metadata={
            "help": "'threshold': keep what passes the calibrated thresholds (FLOPs vary with the text, as in the "
            "paper); 'topk': keep each token's planned number of components/neurons exactly (FLOPs hold on any text)."
        },
    )
    auto_check_tokens: int = field(
        default=2048,
        metadata={"help": "method='auto': calibration tokens of the end-to-end loss checks that scale each kind."},
    )
    layer_by_layer: bool | None = field(
        default=None,
        metadata={
            "help": "Calibrate one decoder layer at a time over all batches (one layer's weights and statistics on "
            "the accelerator). None: when accelerate offloaded part of the model (device_map with 'cpu' or 'disk')."
        },
    )
    size_cap: str = field(
        default="model",
        metadata={
            "help": f"How the rank adapters' size is capped, one of {SIZE_CAPS}: 'model' (the default: the adapted "
            "targets hold no more parameters than the dense ones in total, so the model prepared for decoding takes "
            "no more memory than dense; where the uncapped plan would, every rank above a common multiple of its "
            "layer's break-even rank mn/(m+n) is lowered to it, the largest multiple that fits), 'layer' (every "
            "rank adapter's A and B no larger than the weight it replaces) or 'none'."
        },
    )
    no_larger_than_dense: bool = field(
        default=False,
        metadata={"help": "The older spelling of size_cap='layer' (True: every rank adapter no larger than its W)."},
    )
    residual_rotation: str | None = field(
        default=None,
        metadata={
            "help": "Carry the residual stream in principal axes (LaRoSA's construction; Llama, Mistral, Qwen2/3): "
            "'layer' (a basis per decoder layer, the stream turned between layers: n^2 MACs per token each) or "
            "'model' (one basis, turned at the two ends). The norm weights and rotations are folded into the base "
            "weights, so the masks of q/k/v and gate/up drop principal components at no run-time rotation cost; the "
            "turns are counted in the budget. None: the stream as it is."
        },
    )
    plan: dict[str, dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "Per-module plan written by calibration (kind, shapes, rank); not set by hand."},
    )
    base_fingerprint: dict[str, list[float]] | None = field(
        default=None,
        metadata={
            "help": "A few weight values of the base model's targeted linears, written by calibration: loading onto "
            "another base of the same shapes is refused. Set to None to load onto a different base on purpose."
        },
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "rana_hf adapter format version."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        self.validate()

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's `save_pretrained` (adapter_config.json), then the RaNA model card as README.md.

        `PeftModel.save_pretrained` writes PEFT's generic model card first and the adapter config last, after the
        weights; so `model.save_pretrained(folder)` of a RaNA model, however it was made or loaded, ends with the card
        that `rana_hf.push_to_hub` renders (`rana_hf.hub.write_model_card`; a README.md written by hand is kept)."""
        super().save_pretrained(save_directory, **kwargs)
        from .hub import write_card_after_save  # hub imports this module

        write_card_after_save(save_directory)

    def validate(self) -> None:
        """Check every field; raise a `ValueError`/`TypeError` that names the field and what it takes.

        Runs at construction and again wherever a config is used (`compress`, injection, loading), so a field changed
        after construction is checked before any work starts."""
        if isinstance(self.flop_reduction, bool) or not isinstance(self.flop_reduction, numbers.Real):
            raise TypeError(f"flop_reduction must be a number in (0, 1), got {self.flop_reduction!r}")
        if not 0.0 < float(self.flop_reduction) < 1.0:
            raise ValueError(f"flop_reduction must be in (0, 1), got {self.flop_reduction}")
        self.flop_reduction = float(self.flop_reduction)
        for name in (
            "calibration_tokens",
            "calibration_seq_len",
            "calibration_batch_size",
            "threshold_sample_tokens",
            "refit_tokens",
            "fisher_tokens",
            "auto_check_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.refit_passes, int) or self.refit_passes < 0:
            raise ValueError(f"refit_passes must be an integer >= 0, got {self.refit_passes!r}")
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode must be one of {BUDGET_MODES}, got {self.budget_mode!r}")
        if self.method not in adapters.METHODS:
            raise ValueError(f"method must be one of {tuple(adapters.METHODS)}, got {self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.residual_rotation not in (None, *RESIDUAL_ROTATIONS):
            raise ValueError(
                f"residual_rotation must be one of {RESIDUAL_ROTATIONS} or None, got {self.residual_rotation!r}"
            )
        if self.size_cap not in SIZE_CAPS:
            raise ValueError(f"size_cap must be one of {SIZE_CAPS}, got {self.size_cap!r}")
        if self.no_larger_than_dense and self.size_cap != "layer":
            if self.size_cap == "none":
                raise ValueError(
                    "no_larger_than_dense=True caps every layer, size_cap='none' asks for no cap: set one of them "
                    "(size_cap='layer' is the newer spelling of no_larger_than_dense=True)"
                )
            self.size_cap = "layer"
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            raise TypeError(
                f"format_version must be an integer (the rana_hf adapter format), got {self.format_version!r}: the "
                "adapter_config.json is damaged or was not written by rana_hf"
            )
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This RaNA adapter was written by a newer rana_hf (format {self.format_version}; this rana_hf reads "
                f"up to {FORMAT_VERSION}). Upgrade rana_hf: `pip install -U rana_hf`."
            )

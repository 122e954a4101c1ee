"""Fine-tuning an adapted model with `transformers.Trainer`, optionally distilling from its own dense original.

`DistillationTrainer` adds `KL(dense || adapted)` on the next-token distributions to the language-model loss. The dense
teacher is the same model with its RaNA layers switched off (`evaluation.dense_mode`), so no second copy of the
weights is held. After training, call `rana_hf.refit_thresholds` so the measured FLOPs are back on the budget.

`add_lora` puts a PEFT LoRA adapter on top of the RaNA layers (each RaNA layer becomes a LoRA layer's base layer), for
fine-tuning a few parameters while the RaNA adapter stays as calibrated.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from transformers import Trainer, TrainingArguments

from .config import RaNAConfig
from .evaluation import dense_mode
from .layers import RaNALayer


def add_lora(model: nn.Module, lora_config: LoraConfig, adapter_name: str = "tuned"):
    """Add a LoRA adapter on top of an adapted model: `y = rana(x) + B_lora A_lora x` on each LoRA target.

    Args:
        model: the RaNA `PeftModel` from `compress` / `PeftModel.from_pretrained`, or a transformers model with RaNA
            layers (e.g. loaded with `AutoModelForCausalLM.from_pretrained(adapter_dir)`). It is changed in place.
        lora_config: a `peft.LoraConfig`; its targets may be RaNA layers or any other linear.
        adapter_name: the LoRA adapter's name; must differ from the RaNA adapter's (PEFT keys both by name).

    Only LoRA trains; the RaNA adapter stays as calibrated (fine-tune it first, with `DistillationTrainer`, if it
    should change too). `model.save_pretrained` still writes the RaNA adapter alone (thresholds refit after LoRA
    training included), with its usual tensor names.

    Returns:
        The LoRA `PeftModel`. Train it with `Trainer`; its `save_pretrained(folder)` writes the LoRA adapter alone,
        in `folder/<adapter_name>` (PEFT's layout for adapters not named "default"); load it back on top of the RaNA
        adapter with `PeftModel.from_pretrained(model_with_rana, f"{folder}/{adapter_name}", adapter_name=...)`.
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"add_lora takes a peft.LoraConfig, got {type(lora_config).__name__}")
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    layers = [m for m in inner.modules() if isinstance(m, RaNALayer)]
    if not layers:
        raise ValueError("this model has no RaNA layers; for LoRA alone use peft.get_peft_model")
    rana_names = {name for layer in layers for name in (*layer.rana_hf_A, *layer.rana_hf_threshold)}
    if adapter_name in rana_names:
        raise ValueError(
            f"adapter_name {adapter_name!r} is the name of the RaNA adapter; give LoRA another name (PEFT keys "
            "adapters by name, so the two would be saved and trained as one)"
        )
    if any(layer._dense_freed for layer in layers):
        raise ValueError("prepare_for_decode froze this model for inference; add LoRA before preparing it")
    # PEFT shares a model's existing `peft_config` dict with a new tuner (and saves every adapter in it): give LoRA a
    # dict of its own, so that the RaNA PeftModel keeps its config and LoRA's `save_pretrained` writes LoRA alone.
    configs = inner.__dict__.pop("peft_config", None) or {}
    rana_config = next((c for c in configs.values() if isinstance(c, RaNAConfig)), None)
    if rana_config is not None:
        inner.rana_hf_config = rana_config  # where `refit_thresholds` and `measure_flops` find it (tuner.rana_config)
    lora_model = get_peft_model(inner, lora_config, adapter_name=adapter_name)
    for layer in layers:  # PEFT takes every tuner layer's tensors for its own, RaNA's included: freeze them
        for parameter in (*layer.rana_hf_A.values(), *layer.rana_hf_B.values()):
            parameter.requires_grad_(False)
    save = lora_model.save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        # PEFT's state-dict selection also takes the tensors of the RaNA layers LoRA wraps; leave them out
        state_dict = kwargs.get("state_dict")
        state_dict = lora_model.state_dict() if state_dict is None else state_dict
        kwargs["state_dict"] = {key: value for key, value in state_dict.items() if ".rana_hf_" not in key}
        return save(save_directory, *args, **kwargs)

    lora_model.save_pretrained = save_pretrained  # also what Trainer's checkpoints call
    if isinstance(model, PeftModel):  # the RaNA PeftModel saves as before, not under LoRA's nesting
        save_rana = model.save_pretrained

        def save_rana_pretrained(save_directory, *args, **kwargs):
            with lora_unwrapped(inner):
                return save_rana(save_directory, *args, **kwargs)

        model.save_pretrained = save_rana_pretrained
    return lora_model


@contextlib.contextmanager
def lora_unwrapped(model: nn.Module):
    """Put each RaNA layer that a LoRA layer wraps back in the LoRA layer's place for the block (PEFT's save of the
    RaNA adapter names tensors by module path), then the LoRA layers back."""
    swaps = []
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if isinstance(module, BaseTunerLayer) and not isinstance(module, RaNALayer) and isinstance(base, RaNALayer):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swaps.append((parent, leaf, module))
    for parent, leaf, module in swaps:
        setattr(parent, leaf, module.base_layer)
    try:
        yield model
    finally:
        for parent, leaf, module in swaps:
            setattr(parent, leaf, module)


def make_trainable(model: nn.Module, base_weights: bool = False) -> int:
    """Make the active RaNA adapter of a loaded model trainable, in place: the rank adapters' `A` and `B` get
    `requires_grad` and the adapter's config leaves inference mode. Checkpoints load frozen, for inference, whichever
    way they are loaded (`AutoModelForCausalLM.from_pretrained(adapter_dir)`, `PeftModel.from_pretrained` without
    `is_trainable=True`); call this before handing such a model to `transformers.Trainer`.

    With `base_weights=True` the dense weights that the RaNA layers compute with (those of input adapters such as
    `teal`'s, which own no weights, and of compensated layers; not those that rank adapters replace) train too: a full
    fine-tuning of the masked linears, at no extra inference cost. An adapter checkpoint holds no base weights, so the
    model's `save_pretrained` then refuses (it would load untrained): save it with `rana_hf.save_compressed`. Distil
    from a frozen copy of the dense model (`DistillationTrainer(teacher=...)`), since switching the adapters off no
    longer gives the original.

    Args:
        model: a model with RaNA layers (a `PeftModel`, or a transformers model that loaded a RaNA adapter).
        base_weights: also train the base weights the RaNA layers read.

    Returns:
        the number of parameters made trainable (0 for input adapters without `base_weights`, which own no weights;
        see `check_trainable`).
    """
    layers = [m for m in model.modules() if isinstance(m, RaNALayer)]
    if not layers:
        raise ValueError("this model has no RaNA layers: load or compress a RaNA adapter first")
    if any(m._dense_freed for m in layers):
        raise ValueError(
            "this model's dense weights of rank adapters are not in memory (freed by `prepare_for_decode`, or not in "
            "a standalone checkpoint): load the adapter checkpoint to train it"
        )
    count = 0
    for layer in layers:
        name = layer._active() or next(iter(layer.active_adapters), None)  # adapters switched off: still theirs
        for container in (layer.rana_hf_A, layer.rana_hf_B):
            if name in container and not container[name].requires_grad:
                container[name].requires_grad_(True)
                count += container[name].numel()
    if base_weights:
        for layer in layers:
            weight = layer.base_layer.weight
            if not layer.replaces_weight and not weight.requires_grad:
                weight.requires_grad_(True)
                count += weight.numel()
        _refuse_adapter_save(model)
    configs = getattr(model, "peft_config", None) or {}
    for config in configs.values():
        if isinstance(config, RaNAConfig):
            config.inference_mode = False
    return count


def trains_base_weights(model: nn.Module) -> bool:
    """Whether any base weight that a RaNA layer computes with has `requires_grad` (see `make_trainable`)."""
    layers = [m for m in model.modules() if isinstance(m, RaNALayer) and not m.replaces_weight]
    return any(m.base_layer.weight.requires_grad for m in layers)


def _refuse_adapter_save(model: nn.Module) -> None:
    """Make `model.save_pretrained` refuse: its adapter checkpoint would leave out the trained base weights."""
    if getattr(model, "_rana_hf_base_trained", False):
        return

    def save_pretrained(*args, **kwargs):
        raise ValueError(
            "the base weights of this model's RaNA layers were trained (make_trainable(base_weights=True)): an "
            "adapter checkpoint holds only the RaNA tensors and would load with the original weights. Save a "
            "standalone checkpoint instead: rana_hf.save_compressed(model, folder)."
        )

    model.save_pretrained = save_pretrained
    model._rana_hf_base_trained = True


def check_trainable(model: torch.nn.Module) -> None:
    """Refuse a model with nothing to train, saying why (input adapters own no weights of their own)."""
    if not any(p.requires_grad for p in model.parameters()):
        frozen = any(
            not p.requires_grad for m in model.modules() if isinstance(m, RaNALayer) for p in m.rana_hf_A.values()
        )
        if frozen:
            raise ValueError(
                "this model's RaNA adapter is frozen: checkpoints load for inference. Call "
                "`rana_hf.training.make_trainable(model)` first, or load it with "
                "`PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)`."
            )
        raise ValueError(
            "this model has no trainable parameters. Input (neuron/magnitude) adapters, the default method 'teal', "
            "own only thresholds: their weights are the base model's. Add a LoRA adapter on top "
            "(`rana_hf.training.add_lora(model, peft.LoraConfig(...))`), fine-tune a model compressed with "
            "method='rana' (its A and B train), or make the base weights trainable yourself."
        )


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is `lm_weight * LM loss + distill_weight * T^2 * KL(dense_T || adapted_T)`.

    Args:
        distill_weight: weight of the distillation term (0 gives plain fine-tuning).
        lm_weight: weight of the language-model loss (needs `labels` in the batch when > 0).
        temperature: softmax temperature `T` of both distributions.
        *args, **kwargs: passed to `transformers.Trainer`.
    """

    def __init__(
        self,
        *args,
        distill_weight: float = 1.0,
        lm_weight: float = 1.0,
        temperature: float = 1.0,
        teacher: nn.Module | None = None,
        **kwargs,
    ):
        if distill_weight < 0 or lm_weight < 0 or distill_weight + lm_weight == 0 or temperature <= 0:
            raise ValueError(
                f"need distill_weight, lm_weight >= 0 (not both 0) and temperature > 0; got {distill_weight}, "
                f"{lm_weight}, {temperature}"
            )
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            check_trainable(model)
            if distill_weight > 0 and teacher is None and trains_base_weights(model):
                raise ValueError(
                    "this model trains the base weights of its RaNA layers, so switching its adapters off no longer "
                    "gives the dense original: pass a frozen copy of it as the teacher (teacher=copy.deepcopy(model) "
                    "before make_trainable(base_weights=True)), or distill_weight=0"
                )
        super().__init__(*args, **kwargs)
        self.distill_weight, self.lm_weight, self.temperature = distill_weight, lm_weight, temperature
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_inputs = inputs if self.lm_weight > 0 else {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**student_inputs)
        loss = self.lm_weight * outputs.loss if self.lm_weight > 0 else 0.0
        if self.distill_weight > 0:
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            if self.teacher is not None:
                with torch.no_grad(), _dense_if_adapted(self.teacher):
                    teacher = self.teacher(**teacher_inputs).logits  # [B, T, V]
            else:
                with torch.no_grad(), dense_mode(model):
                    teacher = model(**teacher_inputs).logits  # [B, T, V]
            kl = _token_kl(outputs.logits, teacher, inputs.get("attention_mask"), self.temperature)
            loss = loss + self.distill_weight * self.temperature**2 * kl
        return (loss, outputs) if return_outputs else loss


def _dense_if_adapted(model: nn.Module):
    """`dense_mode` for a teacher with RaNA layers (a copy of the adapted model); nothing for a plain model."""
    if any(isinstance(m, RaNALayer) for m in model.modules()):
        return dense_mode(model)
    return contextlib.nullcontext(model)


def _token_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float):
    """Mean over (unmasked) positions of `KL(softmax(teacher / T) || softmax(student / T))`."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, T]
    if mask is None:
        return per_token.mean()
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def finetune(
    model: PeftModel,
    train_chunks: torch.Tensor,
    eval_chunks: torch.Tensor,
    refit_chunks: torch.Tensor,
    *,
    output_dir: str,
    max_steps: int = 100,
    train_batch_size: int = 4,
    learning_rate: float = 1e-4,
    distill_weight: float = 1.0,
    lm_weight: float = 1.0,
    temperature: float = 2.0,
    gradient_checkpointing: bool = False,
    lora_r: int = 0,
    train_base_weights: bool = False,
    dense_baseline: Callable[[], nn.Module] | None = None,
    refit_passes: int = 2,
    eval_batch_size: int = 2,
    perplexity_before: float | None = None,
    perplexity_dense: float | None = None,
    progress: bool = False,
) -> tuple[nn.Module, dict]:
    """Fine-tune an adapted model with `DistillationTrainer` (distilled from its own dense original), refit its
    thresholds and measure it again: the recipe of `rana-hf finetune`.

    With `lora_r > 0` a LoRA adapter of that rank is trained on the RaNA layers (`add_lora`) instead of the RaNA
    tensors themselves: the way to fine-tune input adapters (method 'teal'), which own no weights.

    Args:
        model: the RaNA `PeftModel` from `compress` (trained in place).
        train_chunks: [num_chunks, seq_len] token ids to train on (the labels are the inputs).
        eval_chunks: [num_chunks, seq_len] held-out token ids for perplexity and FLOPs.
        refit_chunks: [num_chunks, seq_len] calibration token ids for the threshold refit after training.
        output_dir: `TrainingArguments.output_dir` (nothing is saved there but the trainer's logs).
        max_steps, train_batch_size, learning_rate: training length, batch size and peak learning rate (cosine
            schedule, 10% warm-up).
        distill_weight, lm_weight, temperature: the loss (see `DistillationTrainer`).
        gradient_checkpointing: trade compute for memory.
        lora_r: rank of a LoRA adapter to train instead (0: train the RaNA adapter).
        train_base_weights: also train the base weights the RaNA layers read (`make_trainable(base_weights=True)`):
            the way to fine-tune input adapters without extra inference cost. A frozen copy of the model is the
            distillation teacher, and the model then saves only with `rana_hf.save_compressed`.
        dense_baseline: with `lora_r > 0`, a function returning a fresh dense model: the same LoRA is trained on it
            with the LM loss, to tell domain adaptation from recovered compression loss.
        refit_passes: threshold refit passes after training.
        eval_batch_size: chunks per forward pass when evaluating.
        perplexity_before: the adapted model's perplexity on `eval_chunks` before training (measured if None).
        perplexity_dense: the dense model's; when given, the fraction of the gap recovered is reported.
        progress: show progress bars.

    Returns:
        (trained model: `model`, or the LoRA `PeftModel` on it, report): `steps`, `train_tokens`, `train_seconds`,
        `training_loss`, `perplexity_before`, `perplexity_after`, `gap_recovered` (with `perplexity_dense`),
        `flop_reduction_measured_after`, `lora_r`, `trainable_parameters`, and `dense_baseline` when trained.
    """
    from peft import LoraConfig, get_peft_model

    from . import measure_flops, refit_thresholds
    from .evaluation import perplexity

    if perplexity_before is None:
        perplexity_before = perplexity(model, eval_chunks, batch_size=eval_batch_size, progress=progress)
    examples = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in train_chunks]
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=train_batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 10),
        logging_steps=max(1, max_steps // 10),
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=gradient_checkpointing,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
    )
    if train_base_weights and lora_r > 0:
        raise ValueError("train_base_weights trains the masked linears themselves; it does not combine with lora_r")
    teacher = None
    if train_base_weights:
        teacher = copy.deepcopy(model) if distill_weight > 0 else None  # the dense original, frozen
        make_trainable(model, base_weights=True)
    trained = model
    if lora_r > 0:  # LoRA on top of the RaNA layers
        targets = model.peft_config[model.active_adapter].target_modules
        targets = targets if isinstance(targets, str) else sorted(targets)
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=targets)
        trained = add_lora(model, lora)
    trained.train()
    trainer = DistillationTrainer(
        model=trained,
        args=training_args,
        train_dataset=examples,
        distill_weight=distill_weight,
        lm_weight=lm_weight,
        temperature=temperature,
        teacher=teacher,
    )
    started = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - started
    trainer.teacher = teacher = None  # the frozen copy is not needed after training
    trained.eval()
    for _ in range(refit_passes):
        refit_thresholds(trained, refit_chunks)
    flops = measure_flops(trained, eval_chunks, batch_size=eval_batch_size)
    tuned_ppl = perplexity(trained, eval_chunks, batch_size=eval_batch_size, progress=progress)
    report = {
        "steps": max_steps,
        "train_tokens": int(max_steps * train_batch_size * train_chunks.shape[1]),
        "train_seconds": train_s,
        "training_loss": result.training_loss,
        "distill_weight": distill_weight,
        "lm_weight": lm_weight,
        "perplexity_before": perplexity_before,
        "perplexity_after": tuned_ppl,
    }
    if perplexity_dense is not None:
        gap = perplexity_before - perplexity_dense
        report["gap_recovered"] = (perplexity_before - tuned_ppl) / gap if gap > 0 else 0.0
    report["flop_reduction_measured_after"] = flops["reduction"]
    report["lora_r"] = lora_r
    report["train_base_weights"] = train_base_weights
    report["trainable_parameters"] = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    if lora_r > 0 and dense_baseline is not None:  # the same LoRA on the dense model: how much is domain adaptation
        dense_lora = get_peft_model(dense_baseline(), lora)
        dense_lora.train()
        started = time.perf_counter()
        Trainer(model=dense_lora, args=training_args, train_dataset=examples).train()
        dense_lora.eval()
        report["dense_baseline"] = {
            "loss": "lm (a dense model has no other teacher)",
            "perplexity_after": perplexity(dense_lora, eval_chunks, batch_size=eval_batch_size, progress=progress),
            "train_seconds": time.perf_counter() - started,
        }
        del dense_lora
    return trained, report

"""Fine-tuning an adapted model with `transformers.Trainer`, optionally distilling from its own dense original.

`DistillationTrainer` adds `KL(dense || adapted)` on the next-token distributions to the language-model loss. The dense
teacher is the same model with its RaNA layers switched off (`evaluation.dense_mode`), so no second copy of the
weights is held. After training, call `rana_hf.refit_thresholds` so the measured FLOPs are back on the budget.

`add_lora` puts a PEFT LoRA adapter on top of the RaNA layers (each RaNA layer becomes a LoRA layer's base layer), for
fine-tuning a few parameters while the RaNA adapter stays as calibrated.
"""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from transformers import Trainer

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
        inner.rana_hf_config = rana_config  # where `refit_thresholds` and `measure_flops` find it (api._rana_config)
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


def check_trainable(model: torch.nn.Module) -> None:
    """Refuse a model with nothing to train, saying why (input adapters own no weights of their own)."""
    if not any(p.requires_grad for p in model.parameters()):
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

    def __init__(self, *args, distill_weight: float = 1.0, lm_weight: float = 1.0, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if distill_weight < 0 or lm_weight < 0 or distill_weight + lm_weight == 0 or temperature <= 0:
            raise ValueError(
                f"need distill_weight, lm_weight >= 0 (not both 0) and temperature > 0; got {distill_weight}, "
                f"{lm_weight}, {temperature}"
            )
        check_trainable(self.model)
        self.distill_weight, self.lm_weight, self.temperature = distill_weight, lm_weight, temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_inputs = inputs if self.lm_weight > 0 else {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**student_inputs)
        loss = self.lm_weight * outputs.loss if self.lm_weight > 0 else 0.0
        if self.distill_weight > 0:
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad(), dense_mode(model):
                teacher = model(**teacher_inputs).logits  # [B, T, V]
            kl = _token_kl(outputs.logits, teacher, inputs.get("attention_mask"), self.temperature)
            loss = loss + self.distill_weight * self.temperature**2 * kl
        return (loss, outputs) if return_outputs else loss


def _token_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float):
    """Mean over (unmasked) positions of `KL(softmax(teacher / T) || softmax(student / T))`."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, T]
    if mask is None:
        return per_token.mean()
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)

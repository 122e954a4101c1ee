"""Fine-tuning an adapted model with `transformers.Trainer`, optionally distilling from its own dense original.

`DistillationTrainer` adds `KL(dense || adapted)` on the next-token distributions to the language-model loss. The dense
teacher is the same model with its RaNA layers switched off (`evaluation.dense_mode`), so no second copy of the
weights is held. After training, call `rana_hf.refit_thresholds` so the measured FLOPs are back on the budget.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import Trainer

from .evaluation import dense_mode


def check_trainable(model: torch.nn.Module) -> None:
    """Refuse a model with nothing to train, saying why (input adapters own no weights of their own)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "this model has no trainable parameters. Input (neuron/magnitude) adapters, the default method 'teal', "
            "own only thresholds: their weights are the base model's. Fine-tune a model compressed with "
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

"""Fine-tuning an adapted model with Trainer, plain and distilled from its own dense original."""

from __future__ import annotations

import pytest
import torch
from tiny_models import load_tiny, token_batch
from transformers import TrainingArguments

import rana_hf
from rana_hf import RaNAConfig, compress, measure_flops
from rana_hf.training import DistillationTrainer

SETTINGS = dict(calibration_tokens=1024, calibration_seq_len=64, threshold_sample_tokens=1024, fisher_tokens=256)


def _examples(num: int, seed: int) -> list[dict]:
    ids = token_batch(num, 32, seed=seed)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def _args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    return TrainingArguments(**{**defaults, **kwargs})


@pytest.mark.parametrize("lm_weight,checkpointing", [(1.0, False), (0.0, False), (1.0, True)])
def test_distillation_trains_every_adapter_tensor(tiny_base_dirs, calibration_ids, tmp_path, lm_weight, checkpointing):
    config = RaNAConfig(method="rana", allocation="uniform", flop_reduction=0.44, **SETTINGS)
    model = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration_ids)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    thresholds = {n: b.clone() for n, b in model.named_buffers() if "rana_hf_threshold" in n}
    trainer = DistillationTrainer(
        model=model,
        args=_args(tmp_path, gradient_checkpointing=checkpointing),
        train_dataset=_examples(8, seed=3),
        lm_weight=lm_weight,
        temperature=2.0,
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert before and all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    assert all(torch.equal(thresholds[n], b) for n, b in model.named_buffers() if n in thresholds)  # masks no_grad
    # training moves the code distribution; refitting puts the measured FLOPs back on the budget
    rana_hf.refit_thresholds(model, calibration_ids)
    assert abs(measure_flops(model, calibration_ids)["reduction"] - 0.44) < 0.03


def test_nothing_to_train_is_refused_clearly(tiny_base_dirs, calibration_ids, tmp_path):
    config = RaNAConfig(method="teal", flop_reduction=0.44, **SETTINGS)  # input adapters own no weights
    model = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration_ids)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DistillationTrainer(model=model, args=_args(tmp_path), train_dataset=_examples(4, seed=4))

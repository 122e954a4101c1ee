"""A checkpoint loaded the README's one-call way (`AutoModelForCausalLM.from_pretrained(adapter_dir)`) is a whole
model: transformers' adapter methods save it, switch it off and on, and delete it; it trains with `Trainer` once made
trainable. These run at both ends of the dependency ranges in CI (`.ci/run`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import SMALL_CALIBRATION, load_tiny, token_batch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import rana_hf  # noqa: F401  (registers RaNA with PEFT and transformers)
from rana_hf import RaNAConfig, compress
from rana_hf.layers import RaNALayer
from rana_hf.training import DistillationTrainer, make_trainable


@pytest.fixture(scope="module")
def adapter_dir(tiny_base_dirs, calibration_ids, tmp_path_factory):
    config = RaNAConfig(method="rana", allocation="uniform", flop_reduction=0.44, **SMALL_CALIBRATION)
    model = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration_ids)
    path = tmp_path_factory.mktemp("rana-adapter")
    model.save_pretrained(path)
    return str(path)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_one_call_model_saves_switches_and_deletes(adapter_dir, tiny_base_dirs, tmp_path):
    ids = token_batch(2, 16, seed=5)
    model = AutoModelForCausalLM.from_pretrained(adapter_dir).eval()
    dense = _logits(load_tiny(tiny_base_dirs["llama"]), ids)
    adapted = _logits(model, ids)
    assert not torch.allclose(adapted, dense)
    assert model.active_adapters() == ["default"]

    model.save_pretrained(tmp_path / "again")  # the adapter alone, as PeftModel writes it
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(_logits(again, ids), adapted, rtol=0, atol=0)

    model.disable_adapters()
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-5, atol=1e-5)
    model.enable_adapters()
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=0)

    model.delete_adapter("default")  # back to the base model, still callable
    assert not any(isinstance(m, RaNALayer) and m.rana_hf_A for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-5, atol=1e-5)


def test_one_call_model_trains_once_made_trainable(adapter_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(adapter_dir)
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference, as LoRA checkpoints are
    examples = [{"input_ids": row, "labels": row} for row in token_batch(4, 32, seed=4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="make_trainable"):  # the frozen adapter is named, with what to do
        DistillationTrainer(model=model, args=args, train_dataset=examples)
    count = make_trainable(model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert count == sum(p.numel() for p in trainable.values()) > 0
    assert all("rana_hf_A" in n or "rana_hf_B" in n for n in trainable)
    Trainer(model=model, args=args, train_dataset=examples).train()
    moved = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert len(moved) == len(trainable)
    model.save_pretrained(tmp_path / "tuned")  # the trained adapter saves and reloads
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    ids = token_batch(1, 8, seed=6)
    torch.testing.assert_close(_logits(tuned, ids), _logits(model.eval(), ids), rtol=0, atol=0)


def test_make_trainable_refuses_what_it_cannot_train(tiny_base_dirs):
    with pytest.raises(ValueError, match="no RaNA layers"):
        make_trainable(load_tiny(tiny_base_dirs["llama"]))

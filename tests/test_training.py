"""Fine-tuning an adapted model with Trainer, plain and distilled from its own dense original."""

from __future__ import annotations

import pytest
import torch
from tiny_models import SMALL_CALIBRATION, load_tiny, token_batch
from transformers import TrainingArguments

import rana_hf
from rana_hf import RaNAConfig, compress, measure_flops
from rana_hf.training import DistillationTrainer


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
    config = RaNAConfig(method="rana", allocation="uniform", flop_reduction=0.44, **SMALL_CALIBRATION)
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
    config = RaNAConfig(method="teal", flop_reduction=0.44, **SMALL_CALIBRATION)  # input adapters own no weights
    model = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration_ids)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DistillationTrainer(model=model, args=_args(tmp_path), train_dataset=_examples(4, seed=4))


@pytest.mark.parametrize("method", ["rana", "teal"])
def test_lora_on_rana_layers_trains_saves_and_reloads(tiny_base_dirs, calibration_ids, tmp_path, method, monkeypatch):
    """LoRA stacked on the RaNA layers: only LoRA trains (so the default `teal`, which owns no weights, can be
    fine-tuned too), the distillation teacher is the dense original, and the LoRA adapter reloads on top of RaNA."""
    from peft import LoraConfig, PeftModel

    from rana_hf.evaluation import dense_mode
    from rana_hf.training import add_lora

    config = RaNAConfig(method=method, allocation="uniform", flop_reduction=0.44, **SMALL_CALIBRATION)
    model = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration_ids)
    model.save_pretrained(tmp_path / "rana")
    ids = calibration_ids[:2, :32]
    with torch.no_grad():
        rana_logits = model(input_ids=ids).logits
        dense_logits = load_tiny(tiny_base_dirs["llama"])(input_ids=ids).logits
    with pytest.raises(ValueError, match="name of the RaNA adapter"):
        add_lora(model, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="default")
    lora = add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    frozen = {n: t.detach().clone() for n, t in lora.state_dict().items() if "rana_hf" in n}
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, rana_logits)  # LoRA's B starts at zero
        with dense_mode(lora):  # the teacher: RaNA and LoRA both off
            torch.testing.assert_close(lora(input_ids=ids).logits, dense_logits)
    lora.train()
    trainer = DistillationTrainer(model=lora, args=_args(tmp_path / "run"), train_dataset=_examples(8, seed=3))
    trainer.train()
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in lora.named_parameters() if "lora_B" in n)
    assert all(torch.equal(frozen[n], t) for n, t in lora.state_dict().items() if n in frozen)  # RaNA as calibrated
    lora.save_pretrained(tmp_path / "lora")
    saved = list((tmp_path / "lora").rglob("adapter_model.safetensors"))
    assert [path.parent.name for path in saved] == ["tuned"]
    from safetensors import safe_open

    with safe_open(str(saved[0]), "pt") as handle:
        assert handle.keys() and all("lora_" in key for key in handle.keys())  # the LoRA adapter only
    lora.eval()
    reloaded = PeftModel.from_pretrained(load_tiny(tiny_base_dirs["llama"]), tmp_path / "rana")
    reloaded = PeftModel.from_pretrained(reloaded.get_base_model(), saved[0].parent, adapter_name="tuned")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, lora(input_ids=ids).logits)
    rana_hf.refit_thresholds(lora, calibration_ids)
    flops = measure_flops(lora, calibration_ids)
    from peft.tuners.lora import LoraLayer

    layers = [m for m in lora.modules() if isinstance(m, LoraLayer)]
    lora_macs = sum(m.r["tuned"] * (m.in_features + m.out_features) for m in layers)
    monkeypatch.setattr(rana_hf.evaluation, "LoraLayer", type("NotLora", (), {}))  # the same run, LoRA not counted
    unseen = measure_flops(lora, calibration_ids)
    monkeypatch.undo()
    assert lora_macs and flops["actual"] - unseen["actual"] == 2 * flops["tokens"] * lora_macs  # LoRA's products
    assert abs(unseen["reduction"] - 0.44) < 0.03  # the RaNA layers are back on their budget
    model.save_pretrained(tmp_path / "rana-refit")  # the RaNA adapter with the refit thresholds, usual names
    lora.save_pretrained(tmp_path / "lora-refit")
    reloaded = PeftModel.from_pretrained(load_tiny(tiny_base_dirs["llama"]), tmp_path / "rana-refit")
    reloaded = PeftModel.from_pretrained(reloaded.get_base_model(), tmp_path / "lora-refit" / "tuned", "tuned")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, lora(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["teal", "compensated"])
def test_training_the_masked_weights_saves_standalone(tiny_base_dirs, calibration_ids, tmp_path, method):
    """`finetune(train_base_weights=True)`: the weights the masked layers read train (no extra inference cost), the
    teacher is a frozen copy of the dense original, the adapter save refuses (it would load untrained) and the
    standalone checkpoint carries the trained weights."""
    from transformers import AutoModelForCausalLM

    from rana_hf.training import finetune, make_trainable

    config = RaNAConfig(method=method, allocation="uniform", flop_reduction=0.44, **SMALL_CALIBRATION)
    model = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration_ids)
    ids = calibration_ids[:2, :32]
    with torch.no_grad():
        dense_logits = load_tiny(tiny_base_dirs["llama"])(input_ids=ids).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    assert weights
    with pytest.raises(ValueError, match="lora_r"):
        finetune(model, calibration_ids, ids, ids, output_dir=str(tmp_path / "x"), train_base_weights=True, lora_r=4)
    tuned, report = finetune(
        model,
        token_batch(8, 32, seed=3),
        ids,
        calibration_ids,
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        learning_rate=1e-2,
        train_base_weights=True,
    )
    assert tuned is model and report["train_base_weights"]
    assert report["trainable_parameters"] >= sum(w.numel() for w in weights.values())
    assert all(not torch.equal(weights[n], p) for n, p in model.named_parameters() if n in weights)
    with torch.no_grad(), rana_hf.evaluation.dense_mode(model):  # the dense model moved with its weights ...
        assert not torch.allclose(model(input_ids=ids).logits, dense_logits)
    with pytest.raises(ValueError, match="save_compressed"):  # ... so an adapter would load the untrained weights
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    assert abs(report["flop_reduction_measured_after"] - 0.44) < 0.05
    rana_hf.save_compressed(model, tmp_path / "standalone")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "standalone")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert make_trainable(model, base_weights=True) == 0  # already trainable: nothing new
    fresh = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration_ids)
    make_trainable(fresh, base_weights=True)
    with pytest.raises(ValueError, match="frozen copy"):  # switching adapters off is no teacher any more
        DistillationTrainer(model=fresh, args=_args(tmp_path / "y"), train_dataset=_examples(4, seed=4))

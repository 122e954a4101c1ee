"""compress / measure_flops / save -> load round trips on tiny random models of four architectures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from tiny_models import TINY_CONFIGS, char_tokenizer, load_tiny, token_batch
from transformers import AutoModelForCausalLM

import rana_hf
from rana_hf import RaNAConfig, compress, measure_flops
from rana_hf.adapters import RaNALinear, RaNANeuronLinear
from rana_hf.calibration import CalibrationError
from rana_hf.layers import RaNALayer

ARCHS = sorted(TINY_CONFIGS)


def small_config(**kwargs) -> RaNAConfig:
    defaults = dict(calibration_tokens=1024, calibration_seq_len=64, threshold_sample_tokens=1024, method="rana")
    defaults.update(allocation="uniform")  # the paper's method; the default (teal, global) is tested in test_methods
    defaults.update(kwargs)
    return RaNAConfig(**defaults)


@pytest.fixture(scope="module")
def compressed(tiny_base_dirs, calibration_ids):
    """One compressed model per architecture at flop_reduction=0.44."""
    models = {}
    for arch in ARCHS:
        models[arch] = compress(load_tiny(tiny_base_dirs[arch]), small_config(), calibration=calibration_ids)
    return models


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_compress_targets_and_measured_flops(compressed, heldout_ids, calibration_ids, arch):
    model = compressed[arch]
    assert isinstance(model, PeftModel)
    layers = [m for m in model.modules() if isinstance(m, RaNALayer)]
    kinds = {type(m) for m in layers}
    assert kinds == {RaNALinear, RaNANeuronLinear}
    names = {m.module_name.rsplit(".", 1)[-1] for m in layers}
    assert names <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # the presets
    assert {"q_proj", "gate_proj", "down_proj"} <= names
    report = measure_flops(model, heldout_ids)
    assert set(report) >= {"dense", "actual", "reduction", "per_module"}
    assert report["actual"] < report["dense"]
    assert abs(report["reduction"] - 0.44) < 0.06, report["reduction"]
    on_calibration = measure_flops(model, calibration_ids)["reduction"]
    assert abs(on_calibration - 0.44) < 0.03, on_calibration


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_through_all_loaders(compressed, tiny_base_dirs, heldout_ids, tmp_path, arch):
    model = compressed[arch]
    expected = logits(model, heldout_ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        saved["peft_type"] == "RANA_HF" and saved["plan"] and saved["base_model_name_or_path"] == tiny_base_dirs[arch]
    )

    via_peft = PeftModel.from_pretrained(load_tiny(tiny_base_dirs[arch]), tmp_path).eval()
    assert torch.equal(logits(via_peft, heldout_ids), expected)
    via_auto_peft = AutoPeftModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(via_auto_peft, heldout_ids), expected)
    via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert any(isinstance(m, RaNALayer) for m in via_transformers.modules())
    assert torch.equal(logits(via_transformers, heldout_ids), expected)
    assert measure_flops(via_transformers, heldout_ids)["reduction"] == measure_flops(model, heldout_ids)["reduction"]


def test_error_grows_with_flop_reduction(tiny_base_dirs, calibration_ids, heldout_ids):
    dense = load_tiny(tiny_base_dirs["llama"])
    reference = logits(dense, heldout_ids)
    errors = []
    for reduction in (0.1, 0.3, 0.6):
        model = compress(load_tiny(tiny_base_dirs["llama"]), small_config(flop_reduction=reduction), calibration_ids)
        errors.append(float((logits(model, heldout_ids) - reference).norm() / reference.norm()))
    assert errors[0] < errors[1] < errors[2], errors
    assert errors[0] < 0.25  # random weights have near-isotropic activations: low rank is hard for them


def test_batch_and_sequence_independent(compressed, heldout_ids):
    model = compressed["llama"]
    together = logits(model, heldout_ids[:3])
    for row in range(3):
        alone = logits(model, heldout_ids[row : row + 1])
        torch.testing.assert_close(alone[0], together[row], rtol=1e-4, atol=1e-4)


def test_padding_is_not_counted(compressed, heldout_ids):
    model = compressed["llama"]
    mask = torch.ones_like(heldout_ids[:2])
    mask[1, 32:] = 0
    report = measure_flops(model, heldout_ids[:2], attention_mask=mask)
    assert report["tokens"] == 64 + 32
    for name, entry in report["per_module"].items():
        if entry["tokens"]:
            assert entry["tokens"] == 96, name


def test_unfused_qkv_and_member_sharing(tiny_base_dirs, calibration_ids, heldout_ids):
    fused = compress(load_tiny(tiny_base_dirs["llama"]), small_config(), calibration_ids)
    roles = {m.module_name.rsplit(".", 1)[-1]: m.role for m in fused.modules() if isinstance(m, RaNALinear)}
    assert roles["q_proj"] == "owner" and roles["k_proj"] == "member" and roles["v_proj"] == "member"
    separate = compress(load_tiny(tiny_base_dirs["llama"]), small_config(fuse_qkv=False), calibration_ids)
    roles = {m.module_name.rsplit(".", 1)[-1]: m.role for m in separate.modules() if isinstance(m, RaNALinear)}
    assert set(roles.values()) == {"own"}
    assert abs(measure_flops(separate, heldout_ids)["reduction"] - 0.44) < 0.06


def test_member_recomputes_codes_without_owner_cache(compressed, heldout_ids):
    """k/v reuse q's codes only for the very same input tensor; otherwise they compute them, with the same result."""
    model = compressed["llama"]
    attention = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 5, 64)
    k_cached = attention.k_proj(x) if attention.q_proj(x) is not None else None
    k_fresh = attention.k_proj(x.clone())
    torch.testing.assert_close(k_cached, k_fresh)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(tiny_base_dirs, calibration_ids, heldout_ids, dtype):
    model = compress(load_tiny(tiny_base_dirs["llama"], dtype=torch.bfloat16), small_config(), calibration_ids)
    model = model.to(dtype)
    out = logits(model, heldout_ids[:2])
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert abs(measure_flops(model, heldout_ids)["reduction"] - 0.44) < 0.08


def test_gradients_reach_adapter_weights_only(compressed, heldout_ids):
    model = compressed["llama"]
    model.train()
    try:
        out = model(input_ids=heldout_ids[:2], labels=heldout_ids[:2])
        out.loss.backward()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".rana_hf_A." in n or ".rana_hf_B." in n for n in trainable)
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable
        )
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_refit_thresholds_holds_budget(tiny_base_dirs, calibration_ids, heldout_ids):
    model = compress(load_tiny(tiny_base_dirs["llama"]), small_config(refit_passes=0), calibration_ids)
    with torch.no_grad():  # perturb thresholds, as fine-tuning would move the code distribution
        for layer in model.modules():
            if isinstance(layer, RaNALayer) and "default" in layer.rana_hf_threshold:
                layer.rana_hf_threshold["default"].mul_(0.25)
    assert measure_flops(model, calibration_ids)["reduction"] < 0.3
    rana_hf.refit_thresholds(model, calibration_ids)
    assert abs(measure_flops(model, calibration_ids)["reduction"] - 0.44) < 0.03


def test_text_and_dataset_calibration(tiny_base_dirs):
    datasets = pytest.importorskip("datasets")
    tokenizer = char_tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog " * 40] * 4
    config = small_config(calibration_tokens=2048)
    from_text = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration=texts, tokenizer=tokenizer)
    dataset = datasets.Dataset.from_dict({"text": texts})
    from_dataset = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration=dataset, tokenizer=tokenizer)
    ids = token_batch(2, 32, seed=5) % 27
    torch.testing.assert_close(logits(from_text, ids), logits(from_dataset, ids))
    with pytest.raises(CalibrationError, match="tokenizer"):
        compress(load_tiny(tiny_base_dirs["llama"]), config, calibration=texts)


# ----- bad input: a clear error, and nothing of the user's model is changed -----


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    no_rana = not any(isinstance(m, RaNALayer) for m in model.modules())
    return no_rana and after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("value", [0.0, 1.0, 1.3, -0.2])
def test_flop_reduction_out_of_range(value):
    with pytest.raises(ValueError, match=r"flop_reduction must be in \(0, 1\)"):
        RaNAConfig(flop_reduction=value)


def test_unknown_method_and_allocation_are_refused():
    with pytest.raises(ValueError, match="method"):
        RaNAConfig(method="magic")
    with pytest.raises(ValueError, match="allocation"):
        RaNAConfig(allocation="magic")


def test_targets_matching_nothing(tiny_base_dirs, calibration_ids):
    model = load_tiny(tiny_base_dirs["llama"])
    before = _state(model)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        compress(model, small_config(target_modules=["does_not_exist"]), calibration_ids)
    assert _unchanged(model, before)


def test_model_without_defaults_needs_target_modules(calibration_ids):
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

    with pytest.raises(ValueError, match="target_modules"):
        compress(Toy(), small_config(), calibration_ids)


def test_calibration_too_short(tiny_base_dirs):
    model = load_tiny(tiny_base_dirs["llama"])
    before = _state(model)
    with pytest.raises(CalibrationError, match="at least 512 tokens"):
        compress(model, small_config(), calibration=token_batch(2, 64, seed=3))
    assert _unchanged(model, before)


def test_nan_activations(tiny_base_dirs, calibration_ids):
    model = load_tiny(tiny_base_dirs["llama"])
    with torch.no_grad():  # finite weights whose products overflow float32: inf activations in layer 1
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e20)
        model.model.layers[0].mlp.up_proj.weight.mul_(1e20)
    before = _state(model)
    with pytest.raises(CalibrationError, match="non-finite activations"):
        compress(model, small_config(), calibration_ids)
    assert _unchanged(model, before)
    assert not any(m._forward_pre_hooks for m in model.modules()), "calibration hooks left behind"


def test_nan_weights(tiny_base_dirs, calibration_ids):
    model = load_tiny(tiny_base_dirs["llama"])
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        compress(model, small_config(), calibration_ids)
    assert not any(isinstance(m, RaNALayer) for m in model.modules())


def test_adapter_on_base_with_other_shapes(compressed, tmp_path):
    compressed["llama"].save_pretrained(tmp_path)
    other = AutoModelForCausalLM.from_config(
        TINY_CONFIGS["llama"]().__class__(**{**TINY_CONFIGS["llama"]().to_dict(), "intermediate_size": 96})
    )
    with pytest.raises(ValueError, match="calibrated for"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, RaNALayer) for m in other.modules())


def test_compress_refuses_adapted_model(compressed, calibration_ids):
    with pytest.raises(ValueError, match="without RaNA/PEFT adapters"):
        compress(compressed["llama"], small_config(), calibration_ids)


def test_merge_is_refused_and_unload_restores(tiny_base_dirs, calibration_ids, heldout_ids):
    dense = load_tiny(tiny_base_dirs["llama"])
    reference = logits(dense, heldout_ids)
    model = compress(load_tiny(tiny_base_dirs["llama"]), small_config(), calibration_ids)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    restored = model.unload()
    assert not any(isinstance(m, RaNALayer) for m in restored.modules())
    assert torch.equal(logits(restored, heldout_ids), reference)


@pytest.mark.parametrize("dropped,match", [("rana_hf_threshold", "no calibrated threshold"), ("rana_hf_A", "no A")])
def test_truncated_checkpoint_fails_loudly(compressed, tiny_base_dirs, tmp_path, heldout_ids, dropped, match):
    from safetensors.torch import load_file, save_file

    compressed["llama"].save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if dropped not in k}, tmp_path / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(load_tiny(tiny_base_dirs["llama"]), tmp_path).eval()
    with pytest.raises(RuntimeError, match=match):  # not a model computing with unfilled tensors
        logits(model, heldout_ids)


def test_newer_format_is_refused(compressed, tmp_path):
    compressed["llama"].save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["format_version"] = 99
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="newer rana_hf"):
        RaNAConfig.from_pretrained(tmp_path)


def test_loading_without_import_fails_loudly(compressed, tmp_path):
    """Without `import rana_hf`, PEFT cannot know the method: the load must fail, never give a dense model."""
    compressed["llama"].save_pretrained(tmp_path)
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"try:\n    AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "except Exception as error:\n    print(type(error).__name__, error); sys.exit(3)\n"
        "sys.exit(0)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "RANA_HF" in result.stdout  # the missing method is named after the package to import


def test_balanced_qkv_basis(tiny_base_dirs, calibration_ids, heldout_ids, tmp_path):
    model = compress(load_tiny(tiny_base_dirs["gemma3_text"]), small_config(balance_qkv=True), calibration_ids)
    assert abs(measure_flops(model, heldout_ids)["reduction"] - 0.44) < 0.06
    expected = logits(model, heldout_ids)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, heldout_ids), expected)

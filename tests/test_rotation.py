"""A rotated residual stream (`rotation`, `RaNAConfig.residual_rotation`): the same function, the turns counted, every
way of saving and loading, the original weights back on unload, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tiny_models import (
    SMALL_CALIBRATION,
    TINY_CONFIGS,
    VOCAB,
    assert_reloads_the_same,
    generate_before_and_after_prepare,
    load_tiny,
    token_batch,
)
from transformers import AutoModelForCausalLM, LlamaConfig

from rana_hf import RaNAConfig, calibrate, compress, measure_flops, rotation
from rana_hf.api import parameter_counts
from rana_hf.evaluation import dense_mode

ARCHITECTURES = ("llama", "llama_biases", "mistral", "qwen2")


def _config(name: str):
    if name == "llama_biases":  # o and down with biases: the writers' biases turn with them
        return LlamaConfig(**TINY_CONFIGS["llama"]().to_dict() | {"attention_bias": True, "mlp_bias": True})
    return TINY_CONFIGS[name]()


@pytest.fixture(scope="module")
def rotatable_dirs(tmp_path_factory):
    """Tiny random models whose norm weights are not ones (so folding them is tested), saved to folders."""
    dirs = {}
    for name in ARCHITECTURES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(name))
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "norm" in key or key.endswith(".bias"):
                    parameter.uniform_(0.3, 1.7)
        path = tmp_path_factory.mktemp(f"rotatable-{name}")
        model.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def _compress(model, mode="layer", **overrides):
    settings = dict(method="teal", flop_reduction=0.3, residual_rotation=mode, **SMALL_CALIBRATION) | overrides
    return compress(model, RaNAConfig(**settings), calibration=token_batch(16, 64, seed=1))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_rotated_model_is_the_same_function(rotatable_dirs, name):
    base = load_tiny(rotatable_dirs[name])
    ids = token_batch(2, 32, seed=3)
    with torch.no_grad():
        dense = base(ids).logits
    adapted = _compress(base)
    turns = rotation.modules_of(adapted)
    assert len(turns) == base.config.num_hidden_layers and all(turn.folded for turn in turns)
    norms = [m.input_layernorm.weight for m in adapted.base_model.model.model.layers]
    assert all(torch.equal(w, torch.ones_like(w)) for w in norms)  # the norms' weights went into the readers
    with torch.no_grad(), dense_mode(adapted):
        assert torch.allclose(adapted(ids).logits, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["auto", "rana", "compensated", "rotated"])
def test_every_method_plans_on_the_rotated_stream(rotatable_dirs, tmp_path, method):
    """The rotated stream is a model-level switch: every method (auto's trials included, which inject and unload
    plans on the rotated model) plans on top of it, and its adapter reloads to the same logits."""
    base = load_tiny(rotatable_dirs["llama"])
    adapted = _compress(base, method=method, allocation="global")
    assert len(rotation.modules_of(adapted)) == base.config.num_hidden_layers
    ids = token_batch(2, 16, seed=9)
    assert measure_flops(adapted, ids)["reduction"] == pytest.approx(0.3, abs=0.08)
    with torch.no_grad():
        logits = adapted(ids).logits
    adapted.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_tiny(rotatable_dirs["llama"]), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_unload_puts_the_original_weights_back_exactly(rotatable_dirs):
    base = load_tiny(rotatable_dirs["llama_biases"])
    original = {key: value.clone() for key, value in base.state_dict().items()}
    restored = _compress(base).unload()
    assert not rotation.modules_of(restored)
    state = restored.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[key], value) for key, value in original.items())
    ids = token_batch(2, 16, seed=4)
    with torch.no_grad():  # no turn is left behind
        assert torch.equal(restored(ids).logits, load_tiny(rotatable_dirs["llama_biases"])(ids).logits)


def test_a_deep_copy_is_rotated_on_its_own(rotatable_dirs):
    import copy

    adapted = _compress(load_tiny(rotatable_dirs["llama"]))
    twin = copy.deepcopy(adapted)
    ids = token_batch(2, 16, seed=10)
    with torch.no_grad():
        logits = adapted(ids).logits
        assert torch.equal(twin(ids).logits, logits)
        restored = twin.unload()  # the copy's weights and hooks only
        assert torch.equal(adapted(ids).logits, logits)
        assert torch.allclose(restored(ids).logits, load_tiny(rotatable_dirs["llama"])(ids).logits)


@pytest.mark.parametrize("mode", ["layer", "model"])
def test_the_turns_are_counted_in_the_budget_and_measured(rotatable_dirs, mode):
    base = load_tiny(rotatable_dirs["llama"])
    width, layers = base.config.hidden_size, base.config.num_hidden_layers
    adapted = _compress(base, mode, budget_mode="topk")  # topk: the planned FLOPs hold exactly on any text
    ids = token_batch(4, 32, seed=5)
    report = measure_flops(adapted, ids)
    turns = {name: count for name, count in report["per_module"].items() if name.startswith(rotation.ATTRIBUTE)}
    assert len(turns) == (layers + 1 if mode == "layer" else 2)
    assert all(count["actual"] == 2 * ids.numel() * width * width for count in turns.values())
    assert all(count["dense"] == 0 for count in turns.values())
    assert report["reduction"] == pytest.approx(0.3, abs=0.02)  # the turns included: the plan paid for them
    counts = parameter_counts(adapted)
    assert counts["adapted"] - counts["dense"] == len(rotation.modules_of(adapted)) * width * width


def test_a_basis_per_layer_turns_the_stream_between_layers(rotatable_dirs):
    base = load_tiny(rotatable_dirs["llama"])
    layer_turns = rotation.modules_of(_compress(base, "layer"))
    bases = [turn.basis for turn in layer_turns]
    assert all(torch.allclose(q.T @ q, torch.eye(q.shape[0]), atol=1e-5) for q in bases)  # orthogonal
    assert not torch.allclose(bases[0], bases[1])


@pytest.mark.parametrize("mode", ["layer", "model"])
def test_every_way_of_loading_gives_the_same_model(rotatable_dirs, tmp_path, mode):
    base = load_tiny(rotatable_dirs["llama_biases"])
    adapted = _compress(base, mode)
    assert_reloads_the_same(adapted, rotatable_dirs["llama_biases"], tmp_path, token_batch(4, 32, seed=6))
    with open(tmp_path / "adapter_config.json") as handle:
        saved = json.load(handle)
    assert saved["residual_rotation"] == mode and saved["format_version"] == 3  # format 2 readers must refuse it
    with open(tmp_path / "standalone" / "config.json") as handle:
        assert json.load(handle)["quantization_config"]["format_version"] == 3
    names = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert sum(rotation.ATTRIBUTE in name for name in names) == len(rotation.modules_of(adapted))


def test_a_prepared_rotated_model_generates_the_same_tokens(rotatable_dirs):
    adapted = _compress(load_tiny(rotatable_dirs["llama"]))
    reference, prepared = generate_before_and_after_prepare(adapted, token_batch(1, 10, seed=8))
    assert all(turn._decode is not None for turn in rotation.modules_of(adapted))
    assert torch.equal(prepared, reference)


def test_a_rotated_adapter_refuses_another_base(rotatable_dirs, tmp_path):
    adapted = _compress(load_tiny(rotatable_dirs["llama"]))
    assert set(adapted.peft_config["default"].base_fingerprint) <= set(adapted.peft_config["default"].plan)
    adapted.save_pretrained(tmp_path)
    other = load_tiny(rotatable_dirs["llama"])
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.5)
    with pytest.raises(ValueError, match="calibrated on another base model"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not rotation.modules_of(other)


def test_an_adapter_without_its_bases_refuses_to_run(rotatable_dirs, tmp_path):
    _compress(load_tiny(rotatable_dirs["llama"])).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = {key: value for key, value in load_file(weights).items() if rotation.ATTRIBUTE not in key}
    save_file(tensors, weights, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(load_tiny(rotatable_dirs["llama"]), tmp_path)
    with pytest.raises(RuntimeError, match="was not loaded"):
        loaded(token_batch(1, 8, seed=0))


def test_statistics_must_match_the_rotation(rotatable_dirs):
    base = load_tiny(rotatable_dirs["llama"])
    config = RaNAConfig(method="teal", flop_reduction=0.3, **SMALL_CALIBRATION)
    statistics = calibrate(base, config, token_batch(16, 64, seed=1))
    config.residual_rotation = "layer"
    with pytest.raises(ValueError, match="residual_rotation"):
        compress(base, config, statistics=statistics)
    rotated_config = RaNAConfig(method="teal", flop_reduction=0.3, residual_rotation="layer", **SMALL_CALIBRATION)
    original = {key: value.clone() for key, value in base.state_dict().items()}
    statistics = calibrate(base, rotated_config, token_batch(16, 64, seed=1))
    assert len(statistics.bases) == base.config.num_hidden_layers
    assert all(torch.equal(value, original[key]) for key, value in base.state_dict().items())  # put back
    assert not rotation.modules_of(base)
    compress(base, rotated_config, statistics=statistics)  # the same statistics serve the rotated config


def test_a_budget_the_turns_alone_exceed_is_refused_before_any_change(rotatable_dirs):
    base = load_tiny(rotatable_dirs["llama"])
    original = {key: value.clone() for key, value in base.state_dict().items()}
    with pytest.raises(ValueError, match="turns the stream"):
        _compress(base, flop_reduction=0.9)
    assert not rotation.modules_of(base)
    assert all(torch.equal(value, original[key]) for key, value in base.state_dict().items())


def test_gemma_is_refused_with_the_reason(tiny_base_dirs):
    base = load_tiny(tiny_base_dirs["gemma3_text"])
    with pytest.raises(ValueError, match="does not commute with a rotation"):
        _compress(base)
    assert not rotation.modules_of(base)


def test_an_unknown_rotation_is_refused():
    with pytest.raises(ValueError, match="residual_rotation must be one of"):
        RaNAConfig(residual_rotation="global")


def test_fine_tuning_leaves_the_bases_fixed(rotatable_dirs):
    from rana_hf.training import make_trainable

    adapted = _compress(load_tiny(rotatable_dirs["llama"]))
    make_trainable(adapted, base_weights=True)
    assert not any(p.requires_grad for n, p in adapted.named_parameters() if "rana_hf_rotation" in n)
    adapted.train()
    ids = token_batch(2, 16, seed=7)
    loss = adapted(input_ids=ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None for p in adapted.parameters() if p.requires_grad)
    assert VOCAB == adapted.config.vocab_size


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotated_stream_on_cuda_decodes_and_reloads(rotatable_dirs, tmp_path, dtype):
    """In half precision on the GPU: the rotation folded on the device, decode preparation (the kernels) generates
    what the reference path generates, and the adapter reloads onto a fresh base to the same logits."""
    pytest.importorskip("triton")
    from rana_hf.inference import prepare_for_decode

    base = load_tiny(rotatable_dirs["llama"], dtype=dtype).cuda()
    ids = token_batch(2, 16, seed=8).cuda()
    with torch.no_grad():
        dense = base(ids).logits.float()
    adapted = _compress(base)
    assert all(turn.basis.device.type == "cuda" for turn in rotation.modules_of(adapted))
    with torch.no_grad(), dense_mode(adapted):  # the same function, to half precision's rounding
        error = float((adapted(ids).logits.float() - dense).norm() / dense.norm())
    assert error < 0.02, error
    with torch.no_grad():
        logits = adapted(ids).logits
    adapted.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_tiny(rotatable_dirs["llama"], dtype=dtype).cuda(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    model = adapted.base_model.model
    with torch.no_grad():
        reference = model.generate(ids[:1, :8], **settings)
        prepare_for_decode(adapted)
        prepared = model.generate(ids[:1, :8], **settings)
    assert torch.equal(prepared, reference)

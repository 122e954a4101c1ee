"""Layer-by-layer calibration (`LayerSweep`) and calibration of a model offloaded by accelerate."""

from __future__ import annotations

import pytest
import torch
from tiny_models import SMALL_CALIBRATION, load_tiny, token_batch
from transformers import AutoModelForCausalLM

from rana_hf import RaNAConfig, compress
from rana_hf.calibration import LayerSweep, collect_output_fisher, collect_stats
from rana_hf.offload import is_offloaded


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_layer_by_layer_statistics_and_gradients_match_the_full_forward(tiny_base_dirs, arch):
    # Gemma 3 alternates sliding-window and full attention: each layer must get its own mask from the probe.
    model = load_tiny(tiny_base_dirs[arch])
    chunks = token_batch(6, 48, seed=3)  # batches of 4 and 2: masks recorded per batch shape
    modules = _linears(model)
    streams = {name: (module, True) for name, module in modules.items()}
    whole = collect_stats(model, chunks, streams, sample_tokens=64, batch_size=4)
    swept = collect_stats(model, chunks, streams, sample_tokens=64, batch_size=4, layer_by_layer=True)
    for name in modules:
        assert swept[name].tokens == whole[name].tokens == chunks.numel()
        torch.testing.assert_close(swept[name].covariance, whole[name].covariance, rtol=1e-6, atol=1e-6)
        assert swept[name].sample.shape[1] == modules[name].in_features
    fisher_whole = collect_output_fisher(model, chunks[:2], modules)
    fisher_swept = collect_output_fisher(model, chunks[:2], modules, layer_by_layer=True)
    for name in modules:
        assert fisher_whole[name] > 0
        assert fisher_swept[name] == pytest.approx(fisher_whole[name], rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert not any(isinstance(m, torch.nn.ModuleList) and type(m[0]).__name__ == "_Probe" for m in model.modules())


def test_layer_sweep_replays_the_model_tail(tiny_base_dirs):
    model = load_tiny(tiny_base_dirs["gemma3_text"])  # final logit soft-capping lives in the CausalLM forward
    ids = token_batch(2, 32, seed=4)
    sweep = LayerSweep(model)
    with torch.no_grad():
        hidden, kwargs = sweep.capture(ids)
        for index in range(len(sweep.layers)):
            hidden = sweep.run_layer(index, hidden, kwargs[index])
        torch.testing.assert_close(sweep.replay_logits(ids, hidden), model(input_ids=ids).logits)


def _offloaded(path, tmp_path):
    """The tiny model with layer 0 offloaded to disk and the rest on the CPU (accelerate's hooks, meta weights)."""
    probe = AutoModelForCausalLM.from_pretrained(path)
    device_map = {f"model.{name}": "cpu" for name, _ in probe.model.named_children() if name != "layers"}
    device_map.update({f"model.layers.{i}": "disk" if i == 0 else "cpu" for i in range(len(probe.model.layers))})
    device_map["lm_head"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path)).eval()
    assert is_offloaded(model) and model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    return model


@pytest.mark.parametrize("method,allocation_mode", [("rana", "global"), ("teal", "global")])
def test_offloaded_model_compresses_like_the_loaded_one(
    tiny_base_dirs, tmp_path, calibration_ids, method, allocation_mode
):
    path = tiny_base_dirs["llama"]
    kwargs = dict(
        method=method,
        allocation=allocation_mode,
        flop_reduction=0.4,
        **SMALL_CALIBRATION,
    )
    offloaded = compress(_offloaded(path, tmp_path), RaNAConfig(**kwargs), calibration_ids)  # layer by layer: auto
    loaded = compress(load_tiny(path), RaNAConfig(**kwargs, layer_by_layer=True), calibration_ids)
    assert offloaded.peft_config["default"].plan == loaded.peft_config["default"].plan
    ids = token_batch(2, 32, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_targets_outside_the_layers_are_refused_clearly(tiny_base_dirs, calibration_ids):
    model = load_tiny(tiny_base_dirs["llama"])
    config = RaNAConfig(
        method="teal",
        target_modules=["down_proj", "lm_head"],
        layer_by_layer=True,
        calibration_tokens=1024,
        calibration_seq_len=64,
    )
    with pytest.raises(ValueError, match="includes the output head 'lm_head'"):  # the head is never a target
        compress(model, config, calibration_ids)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # nothing was changed

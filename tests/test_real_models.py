"""Tests of `rana_hf.real_models`: the materialised folders are plain transformers checkpoints that generate text.

The first run builds the cache (about 20 s for SmolLM2, 1 min for Gemma 3); later runs only load the folders.
"""

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rana_hf.real_models import MARKER_FILE, REAL_MODELS, real_model_path


@pytest.fixture(scope="module", params=sorted(REAL_MODELS))
def real_model(request):
    path = real_model_path(request.param)
    model = AutoModelForCausalLM.from_pretrained(path)  # plain load: no gguf_file, no quantization config
    tokenizer = AutoTokenizer.from_pretrained(path)
    return request.param, Path(path), model.eval(), tokenizer


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="unknown real model"):
        real_model_path("not-a-model")


@pytest.mark.real
def test_folder_is_plain_hf_checkpoint(real_model):
    name, path, model, _ = real_model
    for file_name in ("config.json", "model.safetensors", "tokenizer.json", MARKER_FILE):
        assert (path / file_name).is_file(), f"{file_name} missing from {path}"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == [REAL_MODELS[name].architecture]
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32


@pytest.mark.real
def test_cached_path_returns_at_once(real_model):
    name, path, _, _ = real_model
    start = time.perf_counter()
    assert real_model_path(name) == str(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.real
def test_greedy_generation_is_english(real_model):
    _, _, model, tokenizer = real_model
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert new_text.strip(), "the model generated no text"
    assert sum(char.isalpha() for char in new_text) >= 5, f"expected words, got {new_text!r}"

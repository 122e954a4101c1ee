"""Tiny standalone RaNA checkpoints for the vLLM tests (run where the `vllm` extra is installed)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tiny_models import token_batch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from rana_hf import RaNAConfig, compress, save_compressed
from rana_hf.adapters import rotated

# vLLM's CPU attention takes head sizes of 32 and more; 4 query heads over 2 key/value heads, so that tensor
# parallelism 4 replicates k and v. `initializer_range` well above the default makes greedy decoding of a random model
# pick clear winners (no near-ties between HF's and vLLM's float orders).
_COMMON = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.15,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),  # q/k/v biases
    # tanh-GELU MLP; untied embeddings: with tied ones a random Gemma 3 repeats its last prompt token
    "gemma3_text": lambda: Gemma3TextConfig(
        **_COMMON,
        head_dim=32,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    ),
}
# Per method, the allocation and FLOP reduction the tests compress with (rana: the paper's uniform allocation; CATS
# keeps attention and the gate projections dense, so it cannot reach the default reduction of the targeted FLOPs;
# rotated: forced to rotate, one router for q/k/v and one shared by gate and up, which a random model's inputs would
# not choose).
METHODS = {"teal": ("global", 0.44), "rana": ("uniform", 0.44), "cats": ("global", 0.3), "rotated": ("uniform", 0.44)}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer over the 256 byte values (ids 0-255) with BOS 1 and EOS 2, for prompts as text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"<0x{i:02X}>" if i < 3 else chr(i) if 32 <= i < 127 else f"<0x{i:02X}>": i for i in range(256)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<0x00>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<0x00>", bos_token="<0x01>", eos_token="<0x02>", pad_token="<0x00>"
    )


def make_checkpoint(folder: Path, arch: str, method: str) -> Path:
    """Compress a tiny random model of `arch` with `method` (float32) and save it as a standalone checkpoint."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    config = RaNAConfig(
        method=method,
        allocation=METHODS[method][0],
        flop_reduction=METHODS[method][1],
        calibration_tokens=1024,
        calibration_seq_len=64,
        threshold_sample_tokens=1024,
    )
    forced = rotated.forced() if method == "rotated" else contextlib.nullcontext()
    with forced:
        model = compress(base, config, calibration=token_batch(16, 64, seed=1))
    return save_compressed(model, folder, tokenizer=byte_tokenizer())


def dense_base(arch: str):
    """The random base model `make_checkpoint` compresses (same seed)."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def make_mixed_checkpoint(folder: Path, arch: str = "llama") -> Path:
    """A `rana` checkpoint edited so that vLLM's fused linears hold parts of different kinds in its last layer: q and
    k rank adapters behind one router with v left dense (`qkv_proj`), gate a rank adapter beside up as a TEAL-style
    input adapter (`gate_up_proj`), as `method="auto"` may plan them."""
    make_checkpoint(folder, arch, "rana")
    base = dict(dense_base(arch).named_parameters())
    layer = "model.layers.1"
    config = json.loads((folder / "config.json").read_text())
    plan = config["quantization_config"]["rana_config"]["plan"]
    tensors = load_file(str(folder / "rana_model.safetensors"))
    v, up = f"{layer}.self_attn.v_proj", f"{layer}.mlp.up_proj"
    assert plan[v]["role"] == "member" and plan[up]["kind"] == "rank"
    plan[v] = {"kind": "dense", "in_features": plan[v]["in_features"], "out_features": plan[v]["out_features"]}
    for key in [key for key in tensors if key.startswith((f"{v}.", f"{up}."))]:
        del tensors[key]
    tensors[f"{v}.weight"] = base[f"{v}.weight"].detach().clone()
    plan[up] = {
        "kind": "neuron",
        "importance": "magnitude",
        "keep_fraction": 0.5,
        "in_features": plan[up]["in_features"],
        "out_features": plan[up]["out_features"],
    }
    tensors[f"{up}.base_layer.weight"] = base[f"{up}.weight"].detach().clone()
    tensors[f"{up}.rana_hf_threshold.default"] = torch.full((plan[up]["in_features"],), 0.7)
    save_file(tensors, str(folder / "rana_model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder

"""Tiny random decoder models of four architectures and token batches, for the fast tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# Calibration settings small enough for the tiny models and their tests (1,024 tokens in chunks of 64).
SMALL_CALIBRATION = dict(
    calibration_tokens=1024, calibration_seq_len=64, threshold_sample_tokens=1024, fisher_tokens=256
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "gemma3_text": lambda: Gemma3TextConfig(
        **_COMMON, head_dim=16, sliding_window=32, layer_types=["sliding_attention", "full_attention"]
    ),
}


def load_tiny(path: str, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def assert_reloads_the_same(adapted, base_dir: str, folder, ids: torch.Tensor) -> None:
    """Save `adapted` (a compressed tiny model of the base in `base_dir`) as an adapter in `folder` and as a
    standalone checkpoint in `folder/standalone`; each way of loading them (`AutoModelForCausalLM` on the adapter,
    `PeftModel` onto the base, the standalone folder) gives the same logits and the same measured FLOPs on `ids`."""
    from peft import PeftModel

    from rana_hf import measure_flops, save_compressed

    reduction = measure_flops(adapted, ids)["reduction"]
    adapted.save_pretrained(folder)
    for reloaded in (
        AutoModelForCausalLM.from_pretrained(folder).eval(),
        PeftModel.from_pretrained(load_tiny(base_dir), folder).eval(),
        AutoModelForCausalLM.from_pretrained(save_compressed(adapted, folder / "standalone")).eval(),
    ):
        with torch.no_grad():
            assert torch.equal(reloaded(ids[:2]).logits, adapted(ids[:2]).logits)
        assert measure_flops(reloaded, ids)["reduction"] == reduction


def generate_before_and_after_prepare(adapted, ids: torch.Tensor, new_tokens: int = 5):
    """Greedy tokens of an adapted model's reference path, then of the same model after `prepare_for_decode` (static
    cache, uncompiled): `(reference, prepared)`."""
    from rana_hf.inference import prepare_for_decode

    model = adapted.base_model.model
    settings = dict(max_new_tokens=new_tokens, do_sample=False, cache_implementation="static", disable_compile=True)
    with torch.no_grad():
        reference = model.generate(ids, **settings)
        prepare_for_decode(adapted)
        return reference, model.generate(ids, **settings)


def token_batch(num: int, seq_len: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (num, seq_len), generator=generator)


def char_tokenizer():
    """A character-level tokenizer over a-z (ids 0-25, unknown 26), for tests that need text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i for i in range(26)} | {"[UNK]": 26}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")

"""Shared fixtures: tiny random models saved to folders (so loaders can find their base), token batches."""

from __future__ import annotations

import os

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch is read when Triton is first imported
# (transformers and peft may import it), so it is set here, before anything else loads.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import TINY_CONFIGS, token_batch
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="session")
def tiny_base_dirs(tmp_path_factory):
    """One saved tiny random model per architecture (float32)."""
    dirs = {}
    for name, make_config in TINY_CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config())
        path = tmp_path_factory.mktemp(f"tiny-{name}")
        model.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


@pytest.fixture(scope="session")
def calibration_ids():
    return token_batch(16, 64, seed=1)


@pytest.fixture(scope="session")
def heldout_ids():
    return token_batch(8, 64, seed=2)


@pytest.fixture(scope="session")
def tiny_model_with_tokenizer(tmp_path_factory):
    """A tiny random Llama saved with a character-level tokenizer (BOS/EOS/pad), and a text file it can read:
    (model folder, text path), for the command line and the README's snippets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama-tok")
    characters = "abcdefghijklmnopqrstuvwxyz ,.;:!?'\n"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(characters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).save_pretrained(path)
    text = path / "text.txt"
    text.write_text("to be, or not to be: that is the question.\n" * 200)
    return str(path), str(text)

"""The README's Python snippets run as written, on a tiny model instead of SmolLM2 (the quickstart's `path = ...` line
is the one line replaced); the GPU snippet needs CUDA and runs only where there is one."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from huggingface_hub import HfApi

README = Path(__file__).resolve().parents[1] / "README.md"
PATH_LINE = re.compile(r'^path = rana_hf\.real_models\.real_model_path\("smollm2-135m"\).*$', re.MULTILINE)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_quickstart_names_its_model_on_one_replaceable_line():
    blocks = python_blocks()
    assert blocks and len(PATH_LINE.findall(blocks[0])) == 1


def test_readme_snippets_run_as_written(tiny_model_with_tokenizer, tmp_path, monkeypatch):
    model_dir, _ = tiny_model_with_tokenizer
    monkeypatch.chdir(tmp_path)  # the snippets write their folders next to where they run
    pushed = []
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kwargs: pushed.append(("repo", repo_id)))
    monkeypatch.setattr(
        HfApi,
        "create_commit",
        lambda api, repo_id, operations, **kwargs: pushed.append(("commit", [o.path_in_repo for o in operations])),
    )
    namespace: dict = {}
    blocks = python_blocks()
    for index, block in enumerate(blocks):
        if "cuda" in block and not torch.cuda.is_available():
            continue
        if index == 0:
            block = PATH_LINE.sub(f"path = {model_dir!r}", block)
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    assert namespace["reloaded"] is not None and (tmp_path / "rana-smollm2" / "adapter_config.json").is_file()
    assert ("repo", "your-name/rana-smollm2") in pushed
    assert any(kind == "commit" and "README.md" in files for kind, files in pushed)

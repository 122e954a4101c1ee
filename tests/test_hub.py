"""push_to_hub through a stand-in Hub: the pushed repo reloads offline to identical logits, its card parses back.

The stand-in replaces `HfApi.create_repo` / `HfApi.create_commit` (arguments checked against the real signatures)
and writes every `CommitOperationAdd` of a commit into a local Hub cache, in the layout huggingface_hub reads with
`HF_HUB_OFFLINE=1`. Loading then goes through transformers' and huggingface_hub's own offline resolution, with sockets
blocked.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, RepoUrl
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from test_api import small_config
from tiny_models import load_tiny
from transformers import AutoModelForCausalLM
from transformers.utils import PushToHubMixin

import rana_hf
from rana_hf import compress, measure_flops, save_compressed
from rana_hf.cli import main
from rana_hf.evaluation import perplexity
from rana_hf.hub import STANDALONE, SUMMARY_FILE, describe_checkpoint, render_model_card, template_path
from rana_hf.layers import RaNALayer

BASE_ID = "rana-hf-tests/tiny-llama"  # the tiny base model, placed in the stand-in Hub's cache under this id
REPO_ID = "someone/tiny-llama-rana"
ROOT = Path(__file__).resolve().parents[1]
# The real signatures, taken before any test patches them: the stand-in binds every call against them.
CREATE_REPO, CREATE_COMMIT = inspect.signature(HfApi.create_repo), inspect.signature(HfApi.create_commit)


class FakeHub:
    """A Hub whose repositories live in a local cache: `models--ns--name/refs/main` + `snapshots/<sha>/<files>`."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.created: list[dict] = []
        self.commits: list[dict] = []

    def _repo(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}"

    def snapshot(self, repo_id: str) -> Path:
        repo = self._repo(repo_id)
        return repo / "snapshots" / (repo / "refs" / "main").read_text()

    def files(self, repo_id: str) -> dict[str, bytes]:
        if not (self._repo(repo_id) / "refs" / "main").is_file():
            return {}
        root = self.snapshot(repo_id)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def write(self, repo_id: str, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        sha = digest.hexdigest()
        root = self._repo(repo_id) / "snapshots" / sha
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
        (self._repo(repo_id) / "refs").mkdir(parents=True, exist_ok=True)
        (self._repo(repo_id) / "refs" / "main").write_text(sha)
        return sha

    def create_repo(self, api, *args, **kwargs):
        bound = CREATE_REPO.bind(api, *args, **kwargs).arguments
        self.created.append(bound)
        return RepoUrl(f"https://huggingface.co/{bound['repo_id']}")

    def create_commit(self, api, *args, **kwargs):
        bound = CREATE_COMMIT.bind(api, *args, **kwargs).arguments
        repo_id = bound["repo_id"]
        assert any(c["repo_id"] == repo_id for c in self.created), "commit to a repository that was never created"
        files = self.files(repo_id)  # the Hub keeps the files a commit does not touch
        operations = list(bound["operations"])
        for operation in operations:
            assert isinstance(operation, CommitOperationAdd), operation
            with operation.as_file() as handle:
                files[operation.path_in_repo] = handle.read()
        sha = self.write(repo_id, files)
        self.commits.append(
            {"repo_id": repo_id, "message": bound["commit_message"], "paths": [o.path_in_repo for o in operations]}
        )
        url = f"https://huggingface.co/{repo_id}/commit/{sha}"
        return CommitInfo(commit_url=url, commit_message=bound["commit_message"], commit_description="", oid=sha)


def _no_network(*args, **kwargs):
    raise AssertionError("network access during an offline test")


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_base_dirs):
    """The stand-in Hub, holding the tiny Llama base as BASE_ID; offline mode on and sockets blocked."""
    fake = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, *args, **kwargs: fake.create_repo(api, *args, **kwargs))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, *args, **kwargs: fake.create_commit(api, *args, **kwargs))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake.cache))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    base = Path(tiny_base_dirs["llama"])
    fake.write(BASE_ID, {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()})
    return fake


@pytest.fixture(scope="module")
def adapted(tiny_base_dirs, calibration_ids, heldout_ids, tmp_path_factory):
    """A compressed tiny Llama, its saved adapter folder (base named by a local path) and measured numbers."""
    base_dir = tiny_base_dirs["llama"]
    model = compress(load_tiny(base_dir), small_config(), calibration=calibration_ids).eval()
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    results = {
        "perplexity_rana": perplexity(model, heldout_ids),
        "perplexity_dense": perplexity(load_tiny(base_dir), heldout_ids),
        "flop_reduction_measured": measure_flops(model, heldout_ids)["reduction"],
        "eval_tokens": int(heldout_ids.numel()),
    }
    return model, folder, results


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pushed_adapter_reloads_offline_to_identical_logits(hub, adapted, heldout_ids):
    model, folder, results = adapted
    assert (folder / "README.md").is_file()  # save_pretrained's card, for the folder: the pushed one names REPO_ID
    info = rana_hf.push_to_hub(str(folder), REPO_ID, base_model=BASE_ID, results=results, private=True)

    assert [c["repo_id"] for c in hub.created] == [REPO_ID]
    assert hub.created[0]["exist_ok"] is True and hub.created[0]["private"] is True
    assert len(hub.commits) == 1 and info.oid == hub.snapshot(REPO_ID).name
    assert sorted(hub.commits[0]["paths"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    pushed = hub.snapshot(REPO_ID)
    assert json.loads((pushed / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
    assert (pushed / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] != BASE_ID  # untouched

    expected = logits(model, heldout_ids)
    from_folder = AutoModelForCausalLM.from_pretrained(pushed).eval()  # base resolved as BASE_ID from the cache
    assert any(isinstance(m, RaNALayer) for m in from_folder.modules())
    assert torch.equal(logits(from_folder, heldout_ids), expected)
    from_repo_id = AutoModelForCausalLM.from_pretrained(REPO_ID).eval()
    assert torch.equal(logits(from_repo_id, heldout_ids), expected)


def test_card_is_ours_and_its_metadata_parses_back(hub, adapted):
    _, folder, results = adapted
    rana_hf.push_to_hub(folder, REPO_ID, base_model=BASE_ID, results=results)
    readme = hub.snapshot(REPO_ID) / "README.md"
    card = ModelCard.load(readme)
    data = card.data
    assert data.base_model == BASE_ID and data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert {"rana_hf", "rana", "peft", "rana-rana"} <= set(data.tags)
    assert data.model_name == REPO_ID.split("/")[1]
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics == {"perplexity": results["perplexity_rana"], "flop_reduction": results["flop_reduction_measured"]}

    text = readme.read_text()
    assert "import rana_hf" in text and f'AutoModelForCausalLM.from_pretrained("{REPO_ID}")' in text
    assert "Model Card for Model ID" not in text  # PEFT's generic card was replaced
    assert "{{" not in text and "{%" not in text
    assert "method | `rana`" in text and "allocation | `uniform`" in text and "44.0%" in text
    assert f"{results['perplexity_dense']:.3f}" in text and f"{results['perplexity_rana']:.3f}" in text
    assert f"on {results['eval_tokens']} tokens" in text
    assert "Limitations" in text and "GPU kernels" in text


def test_push_a_model_and_the_summary_of_rana_hf_compress(hub, adapted, tmp_path):
    model, folder, results = adapted
    rana_hf.push_to_hub(model, REPO_ID, base_model=BASE_ID, results=results)  # saved to a temporary folder first
    metrics = {
        r.metric_type: r.metric_value for r in ModelCard.load(hub.snapshot(REPO_ID) / "README.md").data.eval_results
    }
    assert metrics["perplexity"] == results["perplexity_rana"]

    with_summary = tmp_path / "with-summary"
    shutil.copytree(folder, with_summary)
    (with_summary / SUMMARY_FILE).write_text(json.dumps({**results, "method": "rana", "versions": {"torch": "x.y"}}))
    rana_hf.push_to_hub(with_summary, REPO_ID, base_model=BASE_ID, results={"perplexity_rana": 99.5})
    pushed = hub.snapshot(REPO_ID)
    assert (pushed / SUMMARY_FILE).is_file()
    card = ModelCard.load(pushed / "README.md")
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"perplexity": 99.5, "flop_reduction": results["flop_reduction_measured"]}  # results= wins
    assert "Environment: torch x.y" in card.text


@pytest.mark.parametrize(
    "calibration, shown, hidden",
    [
        ("default", "embedded calibration text (ten Shakespeare plays", None),
        ("/home/someone/private/notes.txt", "a local text file (`notes.txt`)", "/home/someone"),
        ("wikitext", "the `wikitext` dataset", None),
    ],
)
def test_card_names_the_calibration_text_without_local_paths(adapted, calibration, shown, hidden):
    _, folder, _ = adapted
    checkpoint = describe_checkpoint(folder, base_model=BASE_ID)
    text = render_model_card(checkpoint, REPO_ID, results={"calibration": calibration}).text
    assert shown in text and (hidden is None or hidden not in text)


def test_without_results_the_card_says_so(hub, adapted):
    _, folder, _ = adapted
    rana_hf.push_to_hub(folder, REPO_ID, base_model=BASE_ID)
    card = ModelCard.load(hub.snapshot(REPO_ID) / "README.md")
    assert card.data.eval_results is None and "No measured numbers" in card.text


def test_cli_push(hub, adapted, capsys):
    _, folder, _ = adapted
    assert main(["push", str(folder), REPO_ID, "--private", "--base-model", BASE_ID]) == 0
    assert hub.created[0]["private"] is True
    assert REPO_ID in capsys.readouterr().out
    assert main(["push", str(folder), REPO_ID]) == 2  # base model named by a local path
    assert "not a Hub model id" in capsys.readouterr().err


def _lora_folder(tiny_base_dirs, path: Path) -> Path:
    lora = get_peft_model(load_tiny(tiny_base_dirs["llama"]), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(path)
    return path


def _edited_copy(folder: Path, path: Path, name: str, edit) -> Path:
    """A copy of `folder` at `path` whose JSON file `name` went through `edit` (in place)."""
    shutil.copytree(folder, path)
    saved = json.loads((path / name).read_text())
    edit(saved)
    (path / name).write_text(json.dumps(saved))
    return path


def _edited_adapter(folder: Path, path: Path, **changes) -> Path:
    return _edited_copy(folder, path, "adapter_config.json", lambda saved: saved.update(changes))


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "is not a folder"),
        ("empty", "no adapter_config.json"),
        ("dense", "without a RaNA adapter"),
        ("lora", "'LORA' adapter, not RaNA"),
        ("no weights", "no adapter weights"),
        ("empty plan", "plan is empty"),
        ("newer format", "newer rana_hf"),
        ("local base", "not a Hub model id"),
        ("bad results", "must be a finite number"),
        ("bad repo id", "repo_id must be"),
        ("not a peft model", "PeftModel with a RaNA adapter"),
    ],
)
def test_bad_input_is_refused_before_any_request(hub, adapted, tiny_base_dirs, tmp_path, case, match):
    model, folder, _ = adapted
    target, kwargs = None, {"base_model": BASE_ID}
    if case == "missing":
        target = tmp_path / "nowhere"
    elif case == "empty":
        target = tmp_path
    elif case == "dense":
        target = tiny_base_dirs["llama"]
    elif case == "lora":
        target = _lora_folder(tiny_base_dirs, tmp_path / "lora")
    elif case == "no weights":
        target = _edited_adapter(folder, tmp_path / "a")
        (target / "adapter_model.safetensors").unlink()
    elif case == "empty plan":
        target = _edited_adapter(folder, tmp_path / "a", plan={})
    elif case == "newer format":
        target = _edited_adapter(folder, tmp_path / "a", format_version=99)
    elif case == "local base":
        target, kwargs = folder, {}
    elif case == "bad results":
        target, kwargs["results"] = folder, {"perplexity_rana": "low"}
    elif case == "bad repo id":
        target = folder
    elif case == "not a peft model":
        target = load_tiny(tiny_base_dirs["llama"])
    repo_id = "not/a/repo" if case == "bad repo id" else REPO_ID
    with pytest.raises(ValueError, match=match):
        rana_hf.push_to_hub(target, repo_id, **kwargs)
    assert hub.created == [] and hub.commits == []


def test_template_ships_with_the_package():
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    subpackages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rana_hf").rglob("__init__.py")}
    assert subpackages <= set(setuptools["packages"]), "list new rana_hf subpackages in pyproject.toml"
    assert setuptools["package-dir"]["rana_hf.model_cards"] == "model_cards"
    assert setuptools["package-data"]["rana_hf.model_cards"] == ["*.md"]
    assert template_path() == ROOT / "model_cards" / "rana_adapter.md"
    assert "{{ card_data }}" in template_path().read_text()


# Standalone checkpoints (rana_hf.save_compressed): the whole model in one repository, no base model to resolve.


@pytest.fixture(scope="module")
def standalone_folder(adapted, tmp_path_factory):
    model, _, _ = adapted
    return save_compressed(model, tmp_path_factory.mktemp("standalone"))


def test_pushed_standalone_reloads_offline_to_identical_logits(hub, adapted, standalone_folder, heldout_ids):
    model, _, results = adapted
    rana_hf.push_to_hub(standalone_folder, REPO_ID, base_model=BASE_ID, results=results)
    files = ["README.md", "config.json", "generation_config.json", "rana_model.safetensors"]
    assert sorted(hub.commits[0]["paths"]) == files
    pushed = hub.snapshot(REPO_ID)
    weights = "rana_model.safetensors"
    assert (pushed / weights).read_bytes() == (standalone_folder / weights).read_bytes()

    expected = logits(model, heldout_ids)
    for source in (pushed, REPO_ID):  # the folder, and the repo id resolved in the Hub cache (HF_HUB_OFFLINE=1)
        loaded = AutoModelForCausalLM.from_pretrained(source).eval()
        assert any(isinstance(m, RaNALayer) for m in loaded.modules())
        assert torch.equal(logits(loaded, heldout_ids), expected)

    card = ModelCard.load(pushed / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.base_model == BASE_ID and data.base_model_relation == "quantized"
    assert {"rana_hf", "rana", "standalone", "rana-rana"} <= set(data.tags)
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics == {"perplexity": results["perplexity_rana"], "flop_reduction": results["flop_reduction_measured"]}
    text = card.text
    assert "import rana_hf" in text and f'AutoModelForCausalLM.from_pretrained("{REPO_ID}")' in text
    assert "standalone RaNA checkpoint" in text and "MB of safetensors weights" in text and "{{" not in text
    assert "adapter_config.json" not in text and "Limitations" in text
    assert "finds no weights file it knows and raises, whatever its arguments" in " ".join(text.split())


def test_push_models_as_standalone(hub, adapted, standalone_folder, heldout_ids):
    model, _, _ = adapted
    rana_hf.push_to_hub(model, REPO_ID, checkpoint_format=STANDALONE)  # a PeftModel, saved with save_compressed
    pushed = hub.snapshot(REPO_ID)
    assert json.loads((pushed / "config.json").read_text())["model_type"] == "rana_hf"
    card = ModelCard.load(pushed / "README.md")
    assert card.data.base_model is None  # named by a local path: the card names no base model
    loaded = AutoModelForCausalLM.from_pretrained(standalone_folder)
    rana_hf.push_to_hub(loaded, "someone/again")  # a model loaded from a standalone checkpoint
    again = AutoModelForCausalLM.from_pretrained("someone/again")
    assert torch.equal(logits(again, heldout_ids), logits(model, heldout_ids))
    with pytest.raises(ValueError, match="no dense weights to pair an adapter with"):
        rana_hf.push_to_hub(loaded, REPO_ID, checkpoint_format="adapter")


def test_cli_push_standalone(hub, standalone_folder, capsys):
    assert main(["push", str(standalone_folder), REPO_ID]) == 0  # no base model needed
    assert REPO_ID in capsys.readouterr().out
    assert "rana_model.safetensors" in hub.commits[0]["paths"]


def _edited_standalone(folder: Path, path: Path, edit) -> Path:
    return _edited_copy(folder, path, "config.json", edit)


@pytest.mark.parametrize(
    "case, match",
    [
        ("base model type", "without that model type it would load without rana_hf"),
        ("newer format", "standalone format 99"),
        ("no weights", "no weights"),
        ("bad base model", "base_model must be a Hub model id"),
    ],
)
def test_bad_standalone_input_is_refused_before_any_request(hub, standalone_folder, tmp_path, case, match):
    kwargs = {}
    if case == "base model type":
        target = _edited_standalone(standalone_folder, tmp_path / "s", lambda c: c.update(model_type="llama"))
    elif case == "newer format":
        target = _edited_standalone(
            standalone_folder, tmp_path / "s", lambda c: c["quantization_config"].update(format_version=99)
        )
    elif case == "no weights":
        target = _edited_standalone(standalone_folder, tmp_path / "s", lambda c: None)
        (target / "rana_model.safetensors").unlink()
    else:
        target, kwargs["base_model"] = standalone_folder, "/a/local/path"
    with pytest.raises(ValueError, match=match):
        rana_hf.push_to_hub(target, REPO_ID, **kwargs)
    assert hub.created == [] and hub.commits == []


def test_standalone_template_ships_with_the_package():
    assert template_path(STANDALONE) == ROOT / "model_cards" / "rana_standalone.md"
    assert "{{ card_data }}" in template_path(STANDALONE).read_text()


# PEFT's own calls on a RaNA model: `model.save_pretrained(folder)` writes the RaNA card as README.md and
# `model.push_to_hub(repo_id)` uploads it (the push_to_hub PEFT inherits from transformers would upload a generic
# card), for the model `compress` returns and for the ones PEFT's loaders return; LoRA models keep PEFT's behaviour.


def _compressed_from_the_hub(calibration_ids):
    """A RaNA model compressed from BASE_ID as the (stand-in) Hub serves it: its adapter names a Hub base model."""
    base = AutoModelForCausalLM.from_pretrained(BASE_ID).eval()
    return compress(base, small_config(), calibration=calibration_ids).eval()


def _assert_rana_card(text: str, name: str, base_model: str | None = BASE_ID) -> ModelCard:
    card = ModelCard(text)
    assert card.data.base_model == base_model and card.data.library_name == "peft"
    assert {"rana_hf", "rana-rana"} <= set(card.data.tags)
    assert f"# {name}\n" in card.text and "import rana_hf" in card.text and "method | `rana`" in card.text
    assert "Model Card for Model ID" not in text and "{{" not in text  # not PEFT's generic card, fully rendered
    return card


def test_peft_save_pretrained_writes_the_rana_card(hub, calibration_ids, tmp_path):
    model = _compressed_from_the_hub(calibration_ids)
    model.save_pretrained(tmp_path / "rana-tiny")
    _assert_rana_card((tmp_path / "rana-tiny" / "README.md").read_text(), "rana-tiny")
    loaders = {
        "PeftModel.from_pretrained": lambda: PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(BASE_ID), tmp_path / "rana-tiny"
        ),
        "AutoPeftModelForCausalLM": lambda: AutoPeftModelForCausalLM.from_pretrained(tmp_path / "rana-tiny"),
    }
    for name, load in loaders.items():
        load().save_pretrained(tmp_path / name)
        _assert_rana_card((tmp_path / name / "README.md").read_text(), name)


def test_save_pretrained_card_of_a_local_base_names_no_base(adapted, tmp_path):
    model, _, _ = adapted  # compressed from a local folder: adapter_config.json names a path
    model.save_pretrained(tmp_path / "local")
    text = (tmp_path / "local" / "README.md").read_text()
    card = _assert_rana_card(text, "local", base_model=None)
    assert "the base model that `adapter_config.json` names" in card.text and "None" not in card.text
    assert "No measured numbers" in card.text


def test_save_pretrained_keeps_a_readme_someone_wrote(adapted, tmp_path):
    model, _, _ = adapted
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("# My adapter\n\nNotes written by hand.\n")
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    assert "Notes written by hand." in text and "Rendered by rana_hf" not in text


def test_a_card_that_cannot_be_rendered_does_not_fail_the_save(adapted, tmp_path, caplog):
    model, _, _ = adapted
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / SUMMARY_FILE).write_text(json.dumps({"perplexity_rana": "low"}))
    with caplog.at_level("WARNING", logger="rana_hf.hub"):
        model.save_pretrained(folder)
    assert (folder / "adapter_model.safetensors").is_file()
    assert "could not be rendered" in caplog.text and "must be a finite number" in caplog.text
    assert "Rendered by rana_hf" not in (folder / "README.md").read_text()  # PEFT's card stays


def test_peft_push_to_hub_uploads_the_rana_card(hub, calibration_ids, heldout_ids):
    model = _compressed_from_the_hub(calibration_ids)
    assert type(model).push_to_hub is PushToHubMixin.push_to_hub  # an override on this model only
    model.push_to_hub(REPO_ID, private=True, commit_message="tiny RaNA")
    assert hub.created[0]["private"] is True and hub.commits[0]["message"] == "tiny RaNA"
    assert sorted(hub.commits[0]["paths"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = _assert_rana_card((hub.snapshot(REPO_ID) / "README.md").read_text(), REPO_ID.split("/")[1])
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}")' in card.text

    expected = logits(model, heldout_ids)
    loaders = {
        "peft-loaded": lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_ID), REPO_ID),
        "auto-peft-loaded": lambda: AutoPeftModelForCausalLM.from_pretrained(REPO_ID),
    }
    for name, load in loaders.items():
        loaded = load().eval()
        assert torch.equal(logits(loaded, heldout_ids), expected)
        loaded.push_to_hub(f"someone/{name}")
        _assert_rana_card((hub.snapshot(f"someone/{name}") / "README.md").read_text(), name)


def test_push_to_hub_refuses_what_it_cannot_honour_before_any_request(hub, adapted):
    model, _, _ = adapted
    with pytest.raises(ValueError, match="does not take create_pr, revision"):
        model.push_to_hub(REPO_ID, revision="dev", create_pr=True, base_model=BASE_ID)
    with pytest.raises(ValueError, match="not a Hub model id"):  # the base is a local path, as rana_hf.push_to_hub
        model.push_to_hub(REPO_ID)
    assert hub.created == [] and hub.commits == []
    model.push_to_hub(REPO_ID, base_model=BASE_ID)  # its options pass through
    assert ModelCard.load(hub.snapshot(REPO_ID) / "README.md").data.base_model == BASE_ID


def test_push_to_hub_of_a_loaded_standalone_model_uploads_the_rana_card(hub, standalone_folder):
    loaded = AutoModelForCausalLM.from_pretrained(standalone_folder)
    loaded.push_to_hub(REPO_ID)
    card = ModelCard.load(hub.snapshot(REPO_ID) / "README.md")
    assert {"rana_hf", "standalone"} <= set(card.data.tags) and "import rana_hf" in card.text
    assert "rana_model.safetensors" in hub.commits[0]["paths"]


def test_lora_models_keep_peft_s_card_and_push_to_hub(hub, adapted, tiny_base_dirs, tmp_path):
    lora = _lora_folder(tiny_base_dirs, tmp_path / "lora")  # in a process that has made RaNA models
    text = (lora / "README.md").read_text()
    assert "Model Card for Model ID" in text and "rana_hf" not in text
    model = get_peft_model(load_tiny(tiny_base_dirs["llama"]), LoraConfig(target_modules=["q_proj"]))
    assert "push_to_hub" not in vars(model) and type(model).push_to_hub is PushToHubMixin.push_to_hub

"""Bad input and interrupted work: a clear error before anything changes, and the user's model exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_api import small_config
from tiny_models import VOCAB, char_tokenizer, load_tiny

from rana_hf import RaNAConfig, api, compress
from rana_hf.config import FORMAT_VERSION
from rana_hf.tuner import RaNAModel


def snapshot(model: torch.nn.Module) -> dict:
    """Everything `compress` could change on a model: its modules (which objects, where), parameters (objects,
    values, requires_grad), training flags, hooks and a `peft_config`."""
    return {
        "modules": [(name, type(module), id(module)) for name, module in model.named_modules()],
        "parameters": [(name, id(p), p.requires_grad, p.detach().clone()) for name, p in model.named_parameters()],
        "training": [module.training for module in model.modules()],
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        "peft_config": "peft_config" in model.__dict__,
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert [(n, i, g) for n, i, g, _ in after["parameters"]] == [(n, i, g) for n, i, g, _ in before["parameters"]]
    for (name, _, _, value), (_, _, _, old) in zip(after["parameters"], before["parameters"], strict=True):
        assert torch.equal(value, old), name
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"] and not after["peft_config"]


@pytest.fixture
def model(tiny_base_dirs):
    model = load_tiny(tiny_base_dirs["llama"])
    model.lm_head.weight.requires_grad_(False)  # a user's own flags must come back as they were, not all True
    model.train()
    return model


class Interrupted(Exception):
    pass


def _raise(error):
    def fail(*args, **kwargs):
        raise error

    return fail


def _after_calls(function, calls: int, error):
    """`function`, which raises `error` on its `calls`-th call (an interruption halfway through a loop)."""
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise error
        return function(*args, **kwargs)

    return wrapped


STAGES = {
    "statistics": ("collect_stats", lambda original, error: _after_calls(original, 1, error)),
    "allocation": ("planning.plan_units", lambda original, error: _raise(error)),
    "injection": ("RaNAModel._create_and_replace", lambda original, error: _after_calls(original, 3, error)),
    "filling": ("_fill", lambda original, error: _raise(error)),
    "refit": ("refit_thresholds", lambda original, error: _raise(error)),
}


@pytest.mark.parametrize("error", [KeyboardInterrupt(), Interrupted("injected failure")], ids=["ctrl-c", "exception"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_interrupted_compress_leaves_the_model_as_it_was(model, calibration_ids, monkeypatch, stage, error):
    target, make = STAGES[stage]
    if target.startswith("RaNAModel."):  # halfway through PEFT's injection: two linears replaced, then the failure
        name = target.split(".", 1)[1]
        monkeypatch.setattr(RaNAModel, name, make(getattr(RaNAModel, name), error))
    elif target.startswith("planning."):
        monkeypatch.setattr(api.planning, "plan_units", make(api.planning.plan_units, error))
    else:
        monkeypatch.setattr(api, target, make(getattr(api, target), error))
    before = snapshot(model)
    with pytest.raises(type(error)):
        compress(model, small_config(), calibration=calibration_ids)
    assert_untouched(model, before)
    monkeypatch.undo()
    assert compress(model, small_config(), calibration=calibration_ids) is not None  # not refused afterwards


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("allocation", "Global", "allocation must be one of"),
        ("method", "rank", "method must be one of"),
        ("flop_reduction", 1.5, r"flop_reduction must be in \(0, 1\)"),
        ("flop_reduction", "0.4", "flop_reduction must be a number"),
        ("calibration_tokens", 0, "calibration_tokens must be a positive integer"),
        ("budget_mode", "exact", "budget_mode must be one of"),
        ("refit_passes", -1, "refit_passes must be an integer >= 0"),
        ("format_version", "2", "format_version must be an integer"),
    ],
)
def test_a_config_changed_after_construction_is_checked_before_any_work(
    model, calibration_ids, monkeypatch, field, value, message
):
    config = small_config()
    setattr(config, field, value)
    monkeypatch.setattr(api, "collect_stats", _raise(AssertionError("calibration must not start")))
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=message):
        compress(model, config, calibration=calibration_ids)
    assert_untouched(model, before)


def test_numpy_numbers_are_numbers():
    assert RaNAConfig(flop_reduction=np.float32(0.44)).flop_reduction == pytest.approx(0.44)
    assert RaNAConfig(flop_reduction=np.float64(0.3)).flop_reduction == 0.3


@pytest.mark.parametrize("version", ["2", 2.0, None, True])
def test_a_damaged_format_version_is_named(version):
    with pytest.raises(TypeError, match="format_version must be an integer"):
        RaNAConfig(format_version=version)
    with pytest.raises(ValueError, match="newer rana_hf"):
        RaNAConfig(format_version=FORMAT_VERSION + 1)


def test_config_that_is_not_a_rana_config(model, calibration_ids):
    before = snapshot(model)
    with pytest.raises(TypeError, match="config must be a RaNAConfig"):
        compress(model, {"flop_reduction": 0.4}, calibration=calibration_ids)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "targets,message",
    [
        (["q_proj", "typo_proj"], r"entries \['typo_proj'\] match no nn.Linear"),
        (["lm_head"], "includes the output head 'lm_head'"),
        (".*", "includes the output head 'lm_head'"),
        (["nothing_here"], "matches no nn.Linear in this model"),
    ],
)
def test_targets_that_name_nothing_or_the_head_are_refused_before_calibration(
    model, calibration_ids, monkeypatch, targets, message
):
    monkeypatch.setattr(api, "collect_stats", _raise(AssertionError("calibration must not start")))
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        compress(model, small_config(target_modules=targets), calibration=calibration_ids)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "calibration,message",
    [
        ([], "calibration is empty"),
        (["   ", "\n\t "] * 40, "has no content"),
        (["[UNK]" * 600], "has no content"),  # special tokens only (this tokenizer's end-of-text stand-in)
        (torch.full((16, 64), VOCAB + 5), f"vocabulary has {VOCAB} ids"),
        (torch.full((16, 64), -1), f"vocabulary has {VOCAB} ids"),
        ({"text": ["abc"]}, "calibration must be a list of strings"),
    ],
    ids=["empty", "whitespace", "special-only", "ids-too-large", "negative-ids", "dict"],
)
def test_calibration_without_usable_tokens_is_refused_before_work(model, monkeypatch, calibration, message):
    monkeypatch.setattr(api, "collect_stats", _raise(AssertionError("calibration must not start")))
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        compress(model, small_config(), calibration=calibration, tokenizer=char_tokenizer())
    assert_untouched(model, before)


def test_compress_inside_inference_mode_says_so(model, calibration_ids):
    before = snapshot(model)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inside torch.inference_mode"):
        compress(model, small_config(), calibration=calibration_ids)
    assert_untouched(model, before)


@pytest.mark.parametrize("parameter", ["lm_head.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"])
def test_nan_anywhere_in_the_model_is_refused_before_work(model, calibration_ids, monkeypatch, parameter):
    with torch.no_grad():
        model.get_parameter(parameter)[0, ...] = float("nan")
    monkeypatch.setattr(api, "collect_stats", _raise(AssertionError("calibration must not start")))
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN/inf"):
        compress(model, small_config(allocation="global"), calibration=calibration_ids)
    # snapshot() compares values with torch.equal, which is False for NaN == NaN: compare the rest
    after = snapshot(model)
    assert after["modules"] == before["modules"] and after["training"] == before["training"]
    assert not after["peft_config"]


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError("disk full")], ids=["ctrl-c", "os-error"])
def test_a_save_that_fails_halfway_leaves_the_folder_as_it_was(tiny_base_dirs, calibration_ids, tmp_path, error):
    from rana_hf import save_compressed
    from rana_hf.integrations import standalone

    rana = compress(load_tiny(tiny_base_dirs["llama"]), small_config(), calibration=calibration_ids)
    folder = save_compressed(rana, tmp_path / "out")
    (folder / "notes.txt").write_text("the user's own file")
    before = _tree(folder)
    save_file = standalone.save_file

    def fail_after_writing(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)  # the weights are written, then the failure
        raise error

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(standalone, "save_file", fail_after_writing)
        with pytest.raises(type(error)):
            save_compressed(rana, folder)
    assert _tree(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_staged_directory_replaces_written_files_keeps_others_and_drops_stale_shards(tmp_path):
    from rana_hf.files import staged_directory

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    (folder / "model-00001-of-00002.safetensors").write_text("stale shard")
    (folder / "config.json").write_text("old")
    with staged_directory(folder, replace=["model-*-of-*.safetensors"]) as staging:
        assert staging.parent == tmp_path and not any(staging.iterdir())
        (staging / "config.json").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "a.json").write_text("a")
    assert _tree(folder) == {"config.json": b"new", "keep.txt": b"mine", "sub/a.json": b"a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"), staged_directory(tmp_path / "file"):
        pass


def test_an_adapter_refuses_another_base_of_the_same_shapes(tiny_base_dirs, calibration_ids, tmp_path):
    from peft import PeftModel
    from tiny_models import TINY_CONFIGS
    from transformers import AutoModelForCausalLM

    rana = compress(load_tiny(tiny_base_dirs["llama"]), small_config(), calibration=calibration_ids)
    rana.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(123)  # the same architecture and shapes, other weights
    other = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).eval()
    before = snapshot(other)
    with pytest.raises(ValueError, match="calibrated on another base model"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    assert [m for _, _, m in snapshot(other)["modules"]] == [m for _, _, m in before["modules"]]
    # the documented override: clear the fingerprint and pass the config
    config = RaNAConfig.from_pretrained(tmp_path / "adapter")
    config.base_fingerprint = None
    assert PeftModel.from_pretrained(other, tmp_path / "adapter", config=config) is not None
    # the right base in another dtype is accepted
    PeftModel.from_pretrained(load_tiny(tiny_base_dirs["llama"], dtype=torch.bfloat16), tmp_path / "adapter")

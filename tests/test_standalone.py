"""Standalone compressed checkpoints: save_compressed -> AutoModelForCausalLM.from_pretrained -> identical logits.

Also: the file is smaller than dense when rank adapters replace weights, loading without rana_hf fails loudly (in a
clean interpreter), bad checkpoints are refused before loading, Trainer fine-tunes a loaded model and checkpoints it
in the same format, and rana_hf's own functions work on it (or refuse clearly).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_api import small_config
from tiny_models import TINY_CONFIGS, char_tokenizer, load_tiny, token_batch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import rana_hf
from rana_hf import compress, measure_flops, refit_thresholds, save_compressed
from rana_hf.adapters import RaNALinear, RaNANeuronLinear
from rana_hf.evaluation import compare_to_dense
from rana_hf.inference import prepare_for_decode
from rana_hf.integrations import register, standalone
from rana_hf.layers import RaNALayer

ARCHS = sorted(TINY_CONFIGS)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def file_tensors(folder: Path) -> dict[str, tuple]:
    with safe_open(str(folder / standalone.WEIGHTS_NAME), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


@pytest.fixture(scope="module")
def saved(tiny_base_dirs, calibration_ids, tmp_path_factory):
    """Per architecture: the compressed model (paper's RaNA: rank + neuron adapters) and its standalone folder."""
    out = {}
    for arch in ARCHS:
        model = compress(load_tiny(tiny_base_dirs[arch]), small_config(), calibration=calibration_ids).eval()
        folder = save_compressed(model, tmp_path_factory.mktemp(f"standalone-{arch}"))
        out[arch] = (model, folder)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_float32_identical_logits(saved, heldout_ids, arch):
    model, folder = saved[arch]
    names = sorted(p.name for p in folder.iterdir())
    assert "config.json" in names and "rana_model.safetensors" in names
    assert "model.safetensors" not in names  # the name transformers would load without rana_hf
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickle
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "rana_hf" and "transformers_weights" not in config
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "rana" and quantization["format_version"] == 2
    assert quantization["weights_file"] == "rana_model.safetensors"
    assert quantization["base_model_type"] == arch and quantization["rana_config"]["plan"]

    stored = file_tensors(folder)
    ranks = [m for m in model.modules() if isinstance(m, RaNALinear)]
    neurons = [m for m in model.modules() if isinstance(m, RaNANeuronLinear)]
    assert ranks and neurons
    for layer in ranks:  # only the RaNA tensors of rank adapters: no dense weight
        assert f"{layer.module_name}.base_layer.weight" not in stored
        assert f"{layer.module_name}.weight" not in stored
        assert stored[f"{layer.module_name}.rana_hf_A.default"] == (layer.out_features, layer.rank)
        if layer.role != "member":
            assert stored[f"{layer.module_name}.rana_hf_B.default"] == (layer.rank, layer.in_features)
    for layer in neurons:  # input masks run on the original weight: kept, with per-neuron thresholds
        assert stored[f"{layer.module_name}.base_layer.weight"] == (layer.out_features, layer.in_features)
        assert stored[f"{layer.module_name}.rana_hf_threshold.default"] == (layer.in_features,)

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded).__name__ == config["architectures"][0]  # the usual transformers class
    assert type(loaded.config).model_type == arch
    assert torch.equal(logits(loaded, heldout_ids), logits(model, heldout_ids))
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("rana_hf_A" in name or "rana_hf_B" in name for name in trainable)


def _cast_like_the_loader(model, dtype):
    """The in-memory model with its parameters in `dtype`; buffers (thresholds, rotary frequencies) stay float32, as
    transformers and the standalone loader keep them."""
    cast = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in cast.parameters():
            parameter.data = parameter.data.to(dtype)
    return cast


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_bfloat16_loading(saved, heldout_ids, arch):
    model, folder = saved[arch]
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == (torch.float32 if "rana_hf_threshold" in name else torch.bfloat16), name
    expected = logits(_cast_like_the_loader(model, torch.bfloat16), heldout_ids)
    assert torch.equal(logits(loaded, heldout_ids), expected)
    # and the adapter format loaded in bfloat16 computes the same model
    adapter_dir = folder.parent / f"{folder.name}-adapter"
    model.save_pretrained(adapter_dir)
    from_adapter = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.bfloat16)
    assert torch.equal(logits(from_adapter, heldout_ids), expected)


def test_half_precision_adapter_is_the_same_model_whichever_way_it_loads(tiny_base_dirs, calibration_ids, tmp_path):
    """A model compressed in bfloat16 holds `A` and `B` in bfloat16 (PEFT would upcast adapter weights to float32:
    RaNA's replace the weight, so they keep its dtype); PEFT's loader and the one-call `Auto*` load give it back bit
    for bit."""
    model = compress(load_tiny(tiny_base_dirs["llama"], dtype=torch.bfloat16), small_config(), calibration_ids)
    adapted = {n: p.dtype for n, p in model.named_parameters() if "rana_hf_A" in n or "rana_hf_B" in n}
    assert adapted and set(adapted.values()) == {torch.bfloat16}
    ids = token_batch(2, 16, seed=5)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel

    base = load_tiny(tiny_base_dirs["llama"], dtype=torch.bfloat16)
    assert torch.equal(logits(PeftModel.from_pretrained(base, tmp_path / "adapter"), ids), expected)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.bfloat16)
    assert torch.equal(logits(auto, ids), expected)
    standalone_dir = save_compressed(model, tmp_path / "standalone")
    loaded = AutoModelForCausalLM.from_pretrained(standalone_dir, dtype=torch.bfloat16)
    assert torch.equal(logits(loaded, ids), expected)


def test_target_modules_as_a_set(saved, heldout_ids, tmp_path):
    model, _ = saved["llama"]
    config = model.peft_config["default"]
    listed = config.target_modules
    try:
        config.target_modules = set(listed)  # what PEFT makes of lists longer than 20 names
        loaded = AutoModelForCausalLM.from_pretrained(save_compressed(model, tmp_path / "set"))
    finally:
        config.target_modules = listed
    assert torch.equal(logits(loaded, heldout_ids), logits(model, heldout_ids))


def test_other_methods_round_trip(tiny_base_dirs, calibration_ids, heldout_ids, tmp_path):
    for name, config in (
        ("teal", small_config(method="teal", allocation="global")),
        ("cats", small_config(method="cats", allocation="global", flop_reduction=0.3)),  # gates keep W
        ("topk", small_config(budget_mode="topk")),
    ):
        model = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration=calibration_ids).eval()
        loaded = AutoModelForCausalLM.from_pretrained(save_compressed(model, tmp_path / name))
        assert torch.equal(logits(loaded, heldout_ids), logits(model, heldout_ids)), name
        assert measure_flops(loaded, heldout_ids) == measure_flops(model, heldout_ids), name
        layers = {m.module_name: m.top_k for m in loaded.modules() if isinstance(m, RaNALayer)}
        assert layers == {m.module_name: m.top_k for m in model.modules() if isinstance(m, RaNALayer)}


def test_file_is_smaller_than_dense_when_ranks_allow(tiny_base_dirs, calibration_ids, tmp_path):
    # A high budget with every rank capped at the parameter count of the weight it replaces (A and B hold fewer
    # numbers than W): the checkpoint must be smaller than the dense one.
    config = small_config(flop_reduction=0.6, no_larger_than_dense=True)
    model = compress(load_tiny(tiny_base_dirs["llama"]), config, calibration=calibration_ids)
    folder = save_compressed(model, tmp_path / "small")
    dense_bytes = (Path(tiny_base_dirs["llama"]) / "model.safetensors").stat().st_size
    standalone_bytes = (folder / standalone.WEIGHTS_NAME).stat().st_size
    assert standalone_bytes < dense_bytes, (standalone_bytes, dense_bytes)


# Every plain transformers loader a user might try on a standalone folder without `import rana_hf`, including the
# `ignore_mismatched_sizes=True` that transformers' own shape-mismatch error suggests: each must raise, none may
# return a model with random or missing weights (transformers only warns about those).
PLAIN_LOADERS = {
    "AutoModelForCausalLM": "AutoModelForCausalLM.from_pretrained(folder)",
    "AutoModelForCausalLM, ignore_mismatched_sizes": "AutoModelForCausalLM.from_pretrained(folder, **ims)",
    "AutoModel, ignore_mismatched_sizes": "AutoModel.from_pretrained(folder, **ims)",
    "LlamaForCausalLM": "LlamaForCausalLM.from_pretrained(folder)",
    "LlamaForCausalLM, ignore_mismatched_sizes": "LlamaForCausalLM.from_pretrained(folder, **ims)",
    "LlamaModel, ignore_mismatched_sizes": "LlamaModel.from_pretrained(folder, **ims)",
    "LlamaForCausalLM, no safetensors": "LlamaForCausalLM.from_pretrained(folder, use_safetensors=False, **ims)",
    "Auto with the folder's LlamaConfig": (
        "AutoModelForCausalLM.from_pretrained(folder, config=LlamaConfig.from_pretrained(folder), **ims)"
    ),
    "pipeline": "pipeline('text-generation', model=folder, tokenizer=tokenizer)",
}
_PLAIN_LOADING_SCRIPT = """
import json, sys
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel, pipeline
folder, tokenizer, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ims = {"ignore_mismatched_sizes": True}
outcome = {}
for name, call in cases.items():
    try:
        eval(call)
        outcome[name] = "LOADED"
    except Exception as err:
        outcome[name] = type(err).__name__ + ": " + str(err)[:300]
assert "rana_hf" not in sys.modules
print(json.dumps(outcome))
"""


def _load_without_rana_hf(folder: Path, tokenizer_dir: str, cases: dict[str, str], cwd: Path) -> dict[str, str]:
    """`{case: "LOADED" or "<exception>: <message>"}`, each loader run in a clean interpreter (no rana_hf)."""
    command = [sys.executable, "-c", _PLAIN_LOADING_SCRIPT, str(folder), tokenizer_dir, json.dumps(cases)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_rana_hf_every_plain_loader_raises(saved, tiny_model_with_tokenizer, heldout_ids, tmp_path):
    model, folder = saved["llama"]
    outcome = _load_without_rana_hf(folder, tiny_model_with_tokenizer[0], PLAIN_LOADERS, tmp_path)
    assert set(outcome) == set(PLAIN_LOADERS)
    loaded = {name: message for name, message in outcome.items() if message == "LOADED"}
    assert not loaded, f"loaded without rana_hf (random weights): {sorted(loaded)}"
    for name, message in outcome.items():
        if name.startswith(("Auto", "pipeline")) and "LlamaConfig" not in name:
            assert "model type `rana_hf`" in message, (name, message)
        else:  # a concrete class reads no model type: no weights file it knows of
            assert message.startswith("OSError") and "model.safetensors" in message, (name, message)
    # and with rana_hf (this process), the same folder is the same model
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder), heldout_ids), logits(model, heldout_ids))


def test_a_concrete_class_is_refused_with_rana_hf_too(saved):
    """Only the `Auto` classes read the `rana_hf` model type that names the weights file; a concrete class finds no
    weights and raises instead of loading a model without them."""
    _, folder = saved["llama"]
    from transformers import LlamaForCausalLM

    with pytest.raises(OSError, match="no file named model.safetensors"):
        LlamaForCausalLM.from_pretrained(folder)


def _as_format_1(folder: Path, path: Path) -> Path:
    """A copy of a standalone folder in the layout of standalone format 1 (rana_hf before format 2): the weights in
    `model.safetensors`, no `weights_file` in quantization_config."""
    shutil.copytree(folder, path)
    (path / standalone.WEIGHTS_NAME).rename(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    del config["quantization_config"]["weights_file"]
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_format_1_checkpoints_still_load_and_save_as_format_2(saved, heldout_ids, tiny_model_with_tokenizer, tmp_path):
    model, folder = saved["llama"]
    old = _as_format_1(folder, tmp_path / "format-1")
    loaded = AutoModelForCausalLM.from_pretrained(old)
    expected = logits(model, heldout_ids)
    assert torch.equal(logits(loaded, heldout_ids), expected)
    # without rana_hf, a concrete class hits the sentinel (an empty tensor under a RaNA layer's plain-linear name)
    cases = {"LlamaForCausalLM": PLAIN_LOADERS["LlamaForCausalLM"]}
    outcome = _load_without_rana_hf(old, tiny_model_with_tokenizer[0], cases, tmp_path)
    assert (
        outcome["LlamaForCausalLM"].startswith("RuntimeError")
        and "ignore_mismatched_sizes" in outcome["LlamaForCausalLM"]
    )
    loaded.save_pretrained(old)  # saved again in place: format 2, and format 1's model.safetensors is gone
    names = {p.name for p in old.iterdir()}
    assert "rana_model.safetensors" in names and "model.safetensors" not in names
    assert json.loads((old / "config.json").read_text())["quantization_config"]["format_version"] == 2
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(old), heldout_ids), expected)


def _copy(folder: Path, path: Path) -> Path:
    shutil.copytree(folder, path)
    return path


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / standalone.WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(folder / standalone.WEIGHTS_NAME), metadata={"format": "pt"})


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing tensor", r"missing RaNA tensors \(1\): model.layers.1.self_attn.q_proj.rana_hf_B.default"),
        ("wrong shape", r"wrong shapes \(1\): model.layers.0.mlp.gate_proj.rana_hf_A.default"),
        ("integer tensor", "not floating point: model.layers.0.mlp.down_proj.rana_hf_threshold.default: I32"),
        ("newer format", "written by a newer rana_hf .standalone format 99"),
        ("newer adapter format", "newer rana_hf .format 99"),
        ("unknown base type", "model type 'not-a-model'"),
        ("unsupported dtype", "RaNA layers run in float32, float16, bfloat16; got dtype=torch.float64"),
        ("weights file elsewhere", "weights_file of a standalone RaNA checkpoint .format 2. must be"),
        ("weights file in format 1", "weights_file is not part of standalone format 1"),
    ],
)
def test_bad_checkpoints_are_refused_before_loading(saved, tmp_path, case, match):
    _, folder = saved["llama"]
    bad = _copy(folder, tmp_path / "bad")
    kwargs = {}
    if case == "missing tensor":
        _edit_tensors(bad, lambda t: t.pop("model.layers.1.self_attn.q_proj.rana_hf_B.default"))
    elif case == "wrong shape":
        key = "model.layers.0.mlp.gate_proj.rana_hf_A.default"
        _edit_tensors(bad, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    elif case == "integer tensor":
        key = "model.layers.0.mlp.down_proj.rana_hf_threshold.default"
        _edit_tensors(bad, lambda t: t.__setitem__(key, t[key].int()))
    elif case == "newer format":
        _edit_config(bad, lambda c: c["quantization_config"].update(format_version=99))
    elif case == "newer adapter format":
        _edit_config(bad, lambda c: c["quantization_config"]["rana_config"].update(format_version=99))
    elif case == "unknown base type":
        _edit_config(bad, lambda c: c["quantization_config"].update(base_model_type="not-a-model"))
    elif case == "unsupported dtype":
        kwargs["dtype"] = torch.float64
    elif case == "weights file elsewhere":
        _edit_config(bad, lambda c: c["quantization_config"].update(weights_file="../other/model.safetensors"))
    elif case == "weights file in format 1":
        _edit_config(bad, lambda c: c["quantization_config"].update(format_version=1))
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(bad, **kwargs)


def test_save_compressed_refuses_what_it_cannot_write(tiny_base_dirs, saved, tmp_path):
    with pytest.raises(ValueError, match="needs a RaNA model"):
        save_compressed(load_tiny(tiny_base_dirs["llama"]), tmp_path / "dense")
    lora = get_peft_model(load_tiny(tiny_base_dirs["llama"]), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no RaNA adapter"):
        save_compressed(lora, tmp_path / "lora")
    assert not (tmp_path / "dense").exists() and not (tmp_path / "lora").exists()


def test_rana_functions_on_a_loaded_model(saved, heldout_ids, calibration_ids):
    model, folder = saved["llama"]
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert measure_flops(loaded, heldout_ids) == measure_flops(model, heldout_ids)  # plan read from config.json
    with pytest.raises(RuntimeError, match="standalone RaNA checkpoint"):  # no dense weights to compare with
        compare_to_dense(loaded, heldout_ids)
    before = {n: b.clone() for n, b in loaded.named_buffers() if "rana_hf_threshold" in n}
    refit_thresholds(loaded, calibration_ids[:4])
    assert any(not torch.equal(b, before[n]) for n, b in loaded.named_buffers() if "rana_hf_threshold" in n)
    ids = token_batch(2, 12, seed=7)
    expected = logits(loaded, ids[:, :1])
    assert prepare_for_decode(loaded)["layers"] > 0  # decode steps of 2 tokens take the kernel op path
    torch.testing.assert_close(logits(loaded, ids[:, :1]), expected, rtol=1e-5, atol=1e-5)


def test_teal_checkpoint_keeps_dense_weights_for_comparison(tiny_base_dirs, calibration_ids, heldout_ids, tmp_path):
    model = compress(load_tiny(tiny_base_dirs["llama"]), small_config(method="teal"), calibration=calibration_ids)
    loaded = AutoModelForCausalLM.from_pretrained(save_compressed(model, tmp_path / "teal"))
    assert compare_to_dense(loaded, heldout_ids) == compare_to_dense(model, heldout_ids)


def test_save_pretrained_of_a_loaded_model_writes_the_standalone_format(saved, heldout_ids, tmp_path):
    model, folder = saved["gemma3_text"]  # tied embeddings
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded.save_pretrained(tmp_path / "again")
    save_compressed(loaded, tmp_path / "again2")
    for path in (tmp_path / "again", tmp_path / "again2"):
        config = json.loads((path / "config.json").read_text())
        # transformers_weights (the loaded config names its weights file) would let transformers find the weights
        assert config["model_type"] == "rana_hf" and "transformers_weights" not in config
        assert file_tensors(path) == file_tensors(folder)
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(path), heldout_ids), logits(model, heldout_ids))


def test_sharded_checkpoint_round_trip(saved, heldout_ids, tmp_path):
    model, _ = saved["llama"]
    folder = save_compressed(model, tmp_path / "sharded", max_shard_size=100_000)
    assert (folder / "rana_model.safetensors.index.json").is_file()
    assert len(list(folder.glob("rana_model-*-of-*.safetensors"))) > 1
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["weights_file"] == (
        "rana_model.safetensors.index.json"
    )
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder), heldout_ids), logits(model, heldout_ids))


def test_trainer_fine_tunes_a_loaded_model_and_checkpoints_it(saved, calibration_ids, heldout_ids, tmp_path):
    _, folder = saved["llama"]
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded.train()
    trainable = {n: p.detach().clone() for n, p in loaded.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in loaded.named_parameters() if not p.requires_grad}
    data = [{"input_ids": row, "labels": row} for row in calibration_ids[:8]]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
    )
    Trainer(model=loaded, args=args, train_dataset=data).train()
    for name, before in trainable.items():
        assert not torch.equal(loaded.get_parameter(name), before), f"{name} did not train"
    for name, before in frozen.items():
        assert torch.equal(loaded.get_parameter(name), before), f"{name} changed"
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "rana_hf"
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    loaded.eval()
    assert torch.equal(logits(reloaded, heldout_ids), logits(loaded, heldout_ids))


def test_registration_is_idempotent_and_guarded(monkeypatch):
    register()
    register()  # again: nothing to do
    assert isinstance(AutoConfig.for_model("rana_hf"), standalone.RaNAStandaloneConfig)
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "rana", type("OtherQuantizer", (), {}))
    with pytest.raises(RuntimeError, match="already has a quantization method 'rana'"):
        register()


def test_standalone_config_reads_as_the_base_config(saved):
    _, folder = saved["llama"]
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, LlamaConfig)
    assert isinstance(config.quantization_config, dict) and config.quantization_config["quant_method"] == "rana"
    assert rana_hf.save_compressed is save_compressed


def test_cli_compress_standalone(tmp_path, capsys):
    from rana_hf.cli import main

    model_dir = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).save_pretrained(model_dir)
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be that is the question\n" * 200)
    out = tmp_path / "out"
    args = ["compress", "--model", str(model_dir), "--calibration", str(text), "--eval-text", str(text)]
    args += ["--out", str(out), "--standalone", "--calibration-tokens", "2048", "--seq-len", "64"]
    args += ["--eval-tokens", "512", "--flop-reduction", "0.3", "--method", "rana", "--allocation", "uniform"]
    assert main(args) == 0
    assert "standalone checkpoint written to" in capsys.readouterr().out
    assert (out / "rana_summary.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, RaNALinear) for m in loaded.modules())

"""`rana-hf compress` and `rana-hf demo` end to end on a tiny model with a character-level tokenizer."""

from __future__ import annotations

import argparse
import json
import os
import time

import pytest
import torch
from tiny_models import char_tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from rana_hf.cli import main
from rana_hf.config import PAPER_TARGETS
from rana_hf.layers import RaNALayer


def test_compress_command(tiny_model_with_tokenizer, tmp_path, capsys):
    model_dir, text = tiny_model_with_tokenizer
    out = tmp_path / "adapter"
    args = ["compress", "--model", model_dir, "--calibration", text, "--eval-text", text, "--out", str(out)]
    args += ["--calibration-tokens", "2048", "--seq-len", "64", "--eval-tokens", "512", "--flop-reduction", "0.3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "perplexity RaNA" in printed and "FLOP reduction measured" in printed
    summary = json.loads((out / "rana_summary.json").read_text())
    assert abs(summary["flop_reduction_measured"] - 0.3) < 0.06
    assert summary["perplexity_rana"] > 0 and summary["perplexity_dense"] > 0
    readme = (out / "README.md").read_text()  # the RaNA card, named after the folder, with the measured numbers
    assert "# adapter\n" in readme and f"{summary['perplexity_rana']:.3f}" in readme and "import rana_hf" in readme
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, RaNALayer) for m in reloaded.modules())


def test_demo_command(tiny_model_with_tokenizer, tmp_path, capsys):
    model_dir, text = tiny_model_with_tokenizer
    out = tmp_path / "demo"
    args = ["demo", "--model", model_dir, "--calibration", text, "--out", str(out)]
    args += ["--calibration-tokens", "2048", "--seq-len", "64", "--eval-tokens", "512"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reloaded logits identical to the compressed model: True" in printed
    assert "greedy generation of the reloaded RaNA model" in printed
    assert printed.index("output folder: " + str(out)) < printed.index("[1/6] load")  # the header comes first
    labels = ["[2/6] dense perplexity on 512 held-out tokens", "[3/6] compress", "[4/6] adapted model", "[5/6] save"]
    labels.append("[6/6] reload with AutoModelForCausalLM")
    positions = [printed.index(label) for label in labels]
    assert positions == sorted(positions) and printed.count("done in") == 6
    assert f"adapter saved in {out}" in printed and f"AutoModelForCausalLM.from_pretrained({str(out)!r})" in printed
    summary = json.loads((out / "rana_summary.json").read_text())
    dense, adapted = summary["perplexity_dense"], summary["perplexity_rana"]
    reading = printed[printed.index("What this means:") :]
    assert f"from {dense:.2f} (dense) to {adapted:.2f} (adapted), {100 * (adapted / dense - 1):+.1f}%" in reading
    assert f"skipped {summary['flop_reduction_measured']:.1%} of the FLOPs" in reading
    assert "targeted linears (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)" in reading
    assert "no wall-clock speed-up is expected here" in reading and "prepare_for_decode" in reading
    assert "rana-hf bench" in reading and "rana-hf finetune" in reading


def test_every_option_has_help_and_shows_its_default():
    """Each option of the main parser and of each subcommand, as `--help` prints it: help text, and its default
    (a flag's is "off"; a required option has none)."""
    from rana_hf.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"compress", "demo", "eval", "curves", "bench", "finetune", "push"}
    for name, sub in [("rana-hf", parser), *subparsers.choices.items()]:
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            shown = formatter._expand_help(action)  # the text `--help` prints for it
            assert action.help and shown.strip(), (name, action.option_strings)
            assert action.required or "(default: " in shown, (name, action.option_strings, shown)
            assert "".join(shown.split()) in "".join(sub.format_help().split()), (name, shown)  # wrapping aside


def test_python_eval_text_is_standard_library_source():
    """`--eval-text python`: held-out chunks of another domain, the standard library's own source."""
    import sysconfig

    from rana_hf.cli._common import heldout_chunks
    from rana_hf.data import PYTHON_MODULES, python_source

    text = python_source()
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), encoding="utf-8") as handle:
        assert text.startswith(handle.read().strip())
    assert text.count("\n\n\n") >= len(PYTHON_MODULES) - 1 and "class ArgumentParser" in text
    chunks = heldout_chunks("python", char_tokenizer(), seq_len=64, max_tokens=256)
    assert chunks.shape == (4, 64)


def test_size_cap_and_pdl_options():
    from rana_hf.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval", "--model", "m"]).size_cap == "model"  # RaNAConfig's default
    assert parser.parse_args(["eval", "--model", "m", "--size-cap", "none"]).size_cap == "none"
    assert parser.parse_args(["compress", "--model", "m", "--out", "o", "--no-larger-than-dense"]).size_cap == "layer"
    assert parser.parse_args(["demo", "--size-cap", "layer"]).size_cap == "layer"
    assert parser.parse_args(["bench"]).pdl and not parser.parse_args(["bench", "--no-pdl"]).pdl


@pytest.mark.parametrize("command", ["compress", "demo", "eval", "curves", "bench", "finetune", "push"])
def test_subcommand_help_exits_0_and_explains_the_choices(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    if command in ("compress", "demo", "finetune"):
        for method in ("teal:", "rana:", "cats:", "svd:", "auto:", "uniform:", "global:", "threshold:", "topk:"):
            assert method in shown, method
        assert "(default: teal)" in shown and "(default: off)" in shown


def test_python_m_rana_hf_cli_help():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "rana_hf.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: rana-hf" in done.stdout and "demo" in done.stdout


def test_bad_flop_reduction_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--model", "x", "--out", "y", "--flop-reduction", "1.5"])
    assert "must be in (0, 1)" in capsys.readouterr().err


def test_eval_command_table_json_and_plot(tiny_model_with_tokenizer, tmp_path, capsys):
    model_dir, text = tiny_model_with_tokenizer
    out = tmp_path / "eval"
    args = ["eval", "--model", model_dir, "--calibration", text, "--eval-text", f"{text},python", "--out", str(out)]
    args += ["--calibration-tokens", "2048", "--seq-len", "64", "--eval-tokens", "256"]
    args += ["--methods", "rana,teal:global,cats,auto:global", "--flop-reduction", "0.3,0.9"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "| method | allocation | target |" in printed.out
    assert "\non python: dense perplexity" in printed.out  # the second text: the same plans, a table of its own
    report = json.loads((out / "rana_eval.json").read_text())
    rows = {(r["method"], r["allocation"], r["flop_reduction_target"]): r for r in report["rows"]}
    assert len(rows) == 8
    for key in [("rana", "uniform", 0.3), ("teal", "global", 0.3), ("cats", "uniform", 0.3), ("auto", "global", 0.3)]:
        row = rows[key]
        assert abs(row["flop_reduction_measured"] - 0.3) < 0.08, (key, row["flop_reduction_measured"])
        assert row["perplexity"] > 0 and row["kl_to_dense"] >= 0 and 0 < row["top1_agreement"] <= 1
        assert sum(row["adapters"].values()) > 0  # units per chosen adapter kind
        other = row["other_texts"]["python"]
        assert other["perplexity"] > 0 and other["kl_to_dense"] >= 0 and 0 < other["flop_reduction_measured"] < 1
    assert report["other_texts"]["python"]["dense_perplexity"] > 0 and report["eval_tokens"] == 256
    assert set(rows[("rana", "uniform", 0.3)]["adapters"]) <= {"rank", "mlp", "neuron", "dense"}
    assert "cannot reach" in rows[("cats", "uniform", 0.9)]["error"]  # says so instead of missing the target
    assert (out / "rana_eval.png").stat().st_size > 10_000


def test_eval_times_calibration_per_token_count(tiny_model_with_tokenizer, tmp_path, capsys):
    model_dir, text = tiny_model_with_tokenizer
    out = tmp_path / "eval-tokens"
    args = ["eval", "--model", model_dir, "--calibration", text, "--eval-text", text, "--out", str(out)]
    args += ["--calibration-tokens", "1024,2048", "--seq-len", "64", "--eval-tokens", "256"]
    args += ["--methods", "teal:global", "--flop-reduction", "0.3"]
    assert main(args) == 0
    assert "calibration tokens | calibration s | compress s" in capsys.readouterr().out
    report = json.loads((out / "rana_eval.json").read_text())
    assert [c["tokens"] for c in report["calibrations"]] == [1024, 2048]
    assert [r["calibration_tokens"] for r in report["rows"]] == [1024, 2048]
    assert all(r["calibration_seconds"] > 0 and r["compress_seconds"] > 0 for r in report["rows"])


def test_eval_with_a_rotated_residual_stream(tiny_model_with_tokenizer, tmp_path, capsys):
    model_dir, text = tiny_model_with_tokenizer
    out = tmp_path / "eval-rotated"
    args = ["eval", "--model", model_dir, "--calibration", text, "--eval-text", text, "--out", str(out)]
    args += ["--calibration-tokens", "1024", "--seq-len", "64", "--eval-tokens", "256"]
    args += ["--methods", "teal:global", "--flop-reduction", "0.3", "--residual-rotation", "layer"]
    assert main(args) == 0
    assert "residual stream rotated per layer" in capsys.readouterr().out
    report = json.loads((out / "rana_eval.json").read_text())
    assert report["residual_rotation"] == "layer"
    (row,) = report["rows"]
    assert abs(row["flop_reduction_measured"] - 0.3) < 0.08  # the turns measured with the masks


def test_compare_methods_from_python(tiny_model_with_tokenizer):
    """`rana_hf.sweep.compare_methods` without the CLI: one calibration pass, a row per method and target, an error
    row for a target the method cannot reach, and the model dense again afterwards."""
    from rana_hf.calibration import calibration_chunks
    from rana_hf.sweep import compare_methods

    model_dir, text_file = tiny_model_with_tokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    text = open(text_file).read()
    chunks = calibration_chunks([text], tokenizer, seq_len=64, max_tokens=256)
    seen = []
    report = compare_methods(
        model,
        tokenizer,
        [text],
        chunks,
        [("teal", "global"), ("cats", "uniform")],
        [0.3, 0.9],
        calibration_tokens=[1024],
        config_kwargs={"calibration_seq_len": 64},
        on_row=lambda row, partial: seen.append(row),
    )
    rows = {(r["method"], r["flop_reduction_target"]): r for r in report["rows"]}
    assert seen == report["rows"] and len(rows) == 4 and report["calibrations"][0]["tokens"] == 1024
    assert abs(rows[("teal", 0.3)]["flop_reduction_measured"] - 0.3) < 0.08 and rows[("teal", 0.3)]["perplexity"] > 0
    assert "cannot reach" in rows[("cats", 0.9)]["error"]
    assert report["eval_tokens"] == 256 and report["dense_perplexity"] > 0
    assert not any(isinstance(m, RaNALayer) for m in model.modules())
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        compare_methods(model, tokenizer, [text], chunks, [("teal", "global")], [1.5])


def test_finetune_command(tiny_model_with_tokenizer, tmp_path, capsys):
    model_dir, text = tiny_model_with_tokenizer
    out = tmp_path / "finetuned"
    args = ["finetune", "--model", model_dir, "--calibration", text, "--eval-text", text, "--out", str(out)]
    args += ["--calibration-tokens", "2048", "--seq-len", "64", "--eval-tokens", "256", "--method", "rana"]
    args += ["--allocation", "uniform", "--max-steps", "3", "--train-seq-len", "32", "--learning-rate", "1e-2"]
    assert main(args) == 0
    assert "of the gap recovered" in capsys.readouterr().out
    tuned = json.loads((out / "rana_summary.json").read_text())["finetune"]
    assert tuned["steps"] == 3 and tuned["perplexity_after"] > 0
    assert abs(tuned["flop_reduction_measured_after"] - 0.44) < 0.08  # thresholds refit after training
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, RaNALayer) for m in reloaded.modules())


def test_finetune_command_with_lora_on_teal(tiny_model_with_tokenizer, tmp_path, capsys):
    """The default method owns no weights: `--lora-r` trains a LoRA adapter on its layers, saved beside it."""
    from peft import PeftModel

    model_dir, text = tiny_model_with_tokenizer
    out = tmp_path / "finetuned"
    args = ["finetune", "--model", model_dir, "--calibration", text, "--eval-text", text, "--out", str(out)]
    args += ["--calibration-tokens", "2048", "--seq-len", "64", "--eval-tokens", "256", "--lora-r", "4"]
    args += ["--max-steps", "3", "--train-seq-len", "32", "--learning-rate", "1e-2", "--dense-baseline"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "LoRA adapter" in printed and "the same LoRA on the dense model" in printed
    tuned = json.loads((out / "rana_summary.json").read_text())["finetune"]
    assert tuned["lora_r"] == 4 and 0 < tuned["trainable_parameters"]
    assert tuned["dense_baseline"]["perplexity_after"] > 0
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), tuned["lora_folder"], "tuned")
    assert any(isinstance(m, RaNALayer) for m in reloaded.modules())
    assert any("lora_A" in name for name, _ in reloaded.named_parameters())


def test_finetune_command_trains_the_masked_weights(tiny_model_with_tokenizer, tmp_path, capsys):
    """`--train-weights`: teal's masked linears train and --out holds a standalone checkpoint with them."""
    model_dir, text = tiny_model_with_tokenizer
    out = tmp_path / "finetuned"
    args = ["finetune", "--model", model_dir, "--calibration", text, "--eval-text", text, "--out", str(out)]
    args += ["--calibration-tokens", "2048", "--seq-len", "64", "--eval-tokens", "256", "--train-weights"]
    args += ["--max-steps", "3", "--train-seq-len", "32", "--learning-rate", "1e-2"]
    assert main(args) == 0
    assert "fine-tuned standalone checkpoint" in capsys.readouterr().out
    tuned = json.loads((out / "rana_summary.json").read_text())["finetune"]
    assert tuned["train_base_weights"] and tuned["trainable_parameters"] > 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "rana_hf"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    name = next(n for n, m in reloaded.named_modules() if isinstance(m, RaNALayer))
    trained = dict(reloaded.named_modules())[name].base_layer.weight
    assert not torch.equal(trained, dict(base.named_modules())[name].weight)  # the trained weights travelled


def test_curves_command(tiny_model_with_tokenizer, tmp_path, capsys):
    model_dir, text = tiny_model_with_tokenizer
    out = tmp_path / "curves"
    args = ["curves", "--model", model_dir, "--calibration", text, "--calibration-tokens", "2048", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| down_proj | neuron |" in printed and "| q_proj | compensated |" in printed
    report = json.loads((out / "rana_curves.json").read_text())
    assert report["kinds"] == ["rank", "neuron", "magnitude", "compensated"]
    assert "| q_proj | rotated_free |" in printed
    for entry in report["linears"].values():
        assert set(entry["curves"]) == {*report["kinds"], "rotated_free"}
        for kind, curve in entry["curves"].items():
            shares = [share for share, _ in curve]
            errors = [error for _, error in curve]
            assert curve and all(0 < share < 1 for share in shares) and shares == sorted(shares), kind
            assert all(0 <= error for error in errors) and errors[0] >= errors[-1], kind  # more MACs, less error
        assert entry["curves"]["magnitude"][0][1] <= 1.0  # a mask keeping some inputs errs less than dropping all
    summary = report["summary"]["q_proj"]
    assert summary["magnitude"][0] >= summary["magnitude"][2]  # 0.4 of the MACs errs more than 0.72
    with pytest.raises(SystemExit, match="unknown --kinds"):
        main(["curves", "--model", model_dir, "--kinds", "rank,nope"])


def test_rotated_reference_curve_does_not_depend_on_the_input_basis():
    """The free-rotation reference masks the input in its principal axes: rotating input and weight together (any
    orthogonal `R`) changes nothing."""
    from rana_hf.sweep import _dropped_error, _rotated_curve

    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(24, 24, generator=generator, dtype=torch.float64)
    sample = torch.randn(512, 24, generator=generator, dtype=torch.float64) @ mixing
    weight = torch.randn(16, 24, generator=generator, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(24, 24, generator=generator, dtype=torch.float64)).Q
    energy = float((sample @ weight.T).pow(2).sum(1).mean())
    curve = _rotated_curve(sample, weight, energy)
    turned = _rotated_curve(sample @ rotation, weight @ rotation, energy)
    assert [share for share, _ in curve] == [share for share, _ in turned]
    torch.testing.assert_close(torch.tensor([e for _, e in turned]), torch.tensor([e for _, e in curve]))
    errors = [error for _, error in curve]
    assert errors == sorted(errors, reverse=True) and 0 < errors[-1] < errors[0] <= 1
    full = _dropped_error(sample, weight, torch.ones_like(sample, dtype=torch.bool))
    assert abs(full - energy) < 1e-9 * energy  # dropping every input loses the whole output


def test_bench_host_overhead_runs_on_the_cpu(tmp_path, capsys):
    """`rana-hf bench --host-overhead`: the compiled decode step's host time, dense and adapted, without a GPU."""
    assert main(["bench", "--host-overhead", "--layers", "2", "--methods", "teal:global", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "rana_host.json").read_text())
    assert set(report["host"]) == {"dense", "teal:global"}
    for rows in report["host"].values():
        assert [row["batch"] for row in rows] == [1, 2] and all(row["host_us"] > 0 for row in rows)
    out = capsys.readouterr().out
    assert "| teal:global | 1 |" in out and "adapted: q_proj, k_proj, v_proj, gate_proj, up_proj, down_proj" in out


def test_bench_table_without_generate_numbers(capsys):
    """`rana-hf bench --no-generate` rows carry loop timings only; the table prints them with nan for generate."""
    from rana_hf.cli.bench import print_bench

    loop = {"batch": 1, "loop_step_ms": 5.0, "loop_tokens_per_s": 200.0, "loop_host_ms": 0.7}
    adapted = {"batch": 1, "loop_step_ms": 4.0, "loop_tokens_per_s": 250.0, "loop_host_ms": 0.9}
    dense = {"weight_bytes": 13e9, "memory_bytes": 13.5e9, "prefill_512_ms": 25.0, "decode": [loop]}
    row = {"bytes_per_step": 7.5e9, "flop_reduction_measured": 0.44, "prefill_512_ms": 30.0, "memory_bytes": 13.6e9}
    row["prefill_512_host_ms"] = 29.5
    row["prefill_512_compiled_ms"] = 16.0
    report = {
        "gpu": "test",
        "copy_GBps": 4200.0,
        "versions": {},
        "decode": [{"dtype": "float16", "layers": 32, "dense": dense, "teal:global": row | {"decode": [adapted]}}],
    }
    print_bench(report)
    out = capsys.readouterr().out
    assert "| teal:global | 1 | nan | nan | 250.0 | 1.25 |" in out
    # prefill GPU and host time, compiled prefill; no greedy_generate timing
    assert "| 30.0 | 29.5 | 16.0 | 13.60 | nan | nan |" in out
    assert "| 25.0 | nan | nan | 13.50 |" in out  # a report without host time or compiled prefill prints nan
    assert "GPU kernel time" not in out
    report["decode"][0]["teal:global"]["prefill_512_profile"] = {"kernel_ms": 15.9, "top": []}
    dense["prefill_512_profile"] = {"kernel_ms": 15.4, "top": []}
    print_bench(report)
    assert "prefill 512, GPU kernel time: dense 15.4 ms, teal:global 15.9 ms" in capsys.readouterr().out
    top = [{"name": "nvjet_sm90_gemm", "us": 900.0, "calls": 56}, {"name": "rmsnorm", "us": 30.0, "calls": 17}]
    dense["step_profile"] = [{"batch": 1, "kernel_us": 1178.1, "kernels": 165, "top": top}]
    print_bench(report)
    out = capsys.readouterr().out
    assert "GPU kernels per step (`--profile-step`)" in out
    assert "| dense | 1 | 1178.1 | 165 | nvjet_sm90_gemm 900.0; rmsnorm 30.0 |" in out


def test_loop_step_runs_the_compiled_step_on_the_cpu(tiny_base_dirs, monkeypatch):
    """The bench's decode loop (`_loop_step_seconds`), CUDA events stubbed: it compiles the step once, warms up and
    times `new_tokens` steps at successive positions."""
    from tiny_models import load_tiny

    from rana_hf import benchmark as bench

    class Event:
        def __init__(self, enable_timing=False):
            self.at = 0.0

        def record(self):
            self.at = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    model = load_tiny(tiny_base_dirs["llama"])
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        gpu, host = bench._loop_step_seconds(model, ids, new_tokens=3, warmup=2)
    assert gpu > 0 and host > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one compile for warm-up and timed steps


def test_profile_step_runs_on_the_cpu(tiny_base_dirs):
    """`--profile-step`'s profile of the compiled step: on the CPU it compiles and runs, and finds no GPU kernels."""
    from tiny_models import load_tiny

    from rana_hf.benchmark import profile_step

    model = load_tiny(tiny_base_dirs["llama"])
    rows = profile_step(model, batch_sizes=(2,), prompt_len=8, steps=2)
    assert rows == [{"batch": 2, "kernel_us": 0, "kernels": 0, "top": []}]


def test_storage_bytes_counts_shared_storage_once():
    from rana_hf.benchmark import storage_bytes

    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(4, 8, bias=False))
    assert storage_bytes(model) == (32 + 32) * 4
    model[1].weight = torch.nn.Parameter(model[0].weight.t())  # a view of the first weight: no second storage
    model.register_buffer("scale", torch.ones(3))
    assert storage_bytes(model) == 32 * 4 + 3 * 4


def test_profile_prefill_reports_host_ops_on_the_cpu(tiny_base_dirs):
    from tiny_models import load_tiny

    from rana_hf.benchmark import profile_prefill

    profiled = profile_prefill(load_tiny(tiny_base_dirs["llama"]), tokens=16, top=4)
    assert profiled["kernel_ms"] == 0 and profiled["top"] == []  # no GPU kernels on the CPU
    assert profiled["host_ms"] > 0 and len(profiled["top_host"]) == 4
    assert any("linear" in op["name"] or "mm" in op["name"] for op in profiled["top_host"])


def test_bench_runs_dense_then_each_method_with_the_same_steps(tmp_path, monkeypatch, capsys):
    """`rana-hf bench`'s orchestration on the CPU, GPU timings stubbed: each model is timed by decode, then prefill
    (host time, memory after a forward, a profile); the adapted model is calibrated, measured and prepared first."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rana_hf import benchmark as bench
    from rana_hf.kernels.ops import kernels_available

    calls = []

    def random_model(shape, dtype, num_hidden_layers=2, seed=0):
        assert shape == "llama-2-7b"
        torch.manual_seed(seed)
        shape = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4)
        config = LlamaConfig(**shape, num_key_value_heads=4, num_hidden_layers=num_hidden_layers)
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()

    def bench_decode(model, batch_sizes, new_tokens, generate):
        calls.append(("decode", any("RaNA" in type(m).__name__ for m in model.modules())))
        return [
            {"batch": b, "loop_step_ms": 5.0, "loop_tokens_per_s": 200.0 * b, "loop_host_ms": 1.0} for b in batch_sizes
        ]

    def bench_prefill(model, compiled=False):
        calls.append(("compiled " * compiled + "prefill", any("RaNA" in type(m).__name__ for m in model.modules())))
        return {"ms": 20.0 if compiled else 30.0, "host_ms": 0.1 if compiled else 29.0}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stub GPU")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 1e9)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 4e12)
    monkeypatch.setattr(bench, "random_model", random_model)
    monkeypatch.setattr(bench, "bench_decode", bench_decode)
    monkeypatch.setattr(bench, "bench_prefill", bench_prefill)
    step_rows = lambda model, batch_sizes: [{"batch": b, "kernel_us": 0, "kernels": 0, "top": []} for b in batch_sizes]  # noqa: E731
    monkeypatch.setattr(bench, "profile_step", step_rows)
    kernels_available.cache_clear()  # is_available is patched: nothing may cache its answer
    try:
        args = ["bench", "--no-kernels", "--no-generate", "--dtypes", "float32", "--methods", "teal:global"]
        args += ["--batch-sizes", "1,2", "--layers", "2", "--calibration-tokens", "1024", "--profile-prefill"]
        args += ["--profile-step"]
        assert main(args + ["--out", str(tmp_path)]) == 0
    finally:
        kernels_available.cache_clear()
    # decode before prefill for each model; the adapted model's prompt also through its dense weights
    assert calls == [
        *[("decode", False), ("prefill", False), ("compiled prefill", False)],
        *[("decode", True), ("prefill", True), ("compiled prefill", True), ("prefill", True)],
    ]
    entry = json.loads((tmp_path / "rana_bench.json").read_text())["decode"][0]
    for name in ("dense", "teal:global"):
        row = entry[name]
        assert row["prefill_512_ms"] == 30.0 and row["prefill_512_host_ms"] == 29.0 and row["memory_bytes"] == 1e9
        assert row["prefill_512_compiled_ms"] == 20.0 and [r["batch"] for r in row["step_profile"]] == [1, 2]
        assert row["parameter_bytes"] > 0 and row["prefill_512_profile"]["host_ms"] > 0
        assert [d["batch"] for d in row["decode"]] == [1, 2]
    adapted = entry["teal:global"]
    assert adapted["prefill_512_dense_prefill_ms"] == 30.0 and abs(adapted["flop_reduction_measured"] - 0.44) < 0.1
    assert adapted["layers"] > 0 and adapted["parameter_bytes"] >= entry["dense"]["parameter_bytes"]
    # the speed goals' set by default: q/k/v, gate, up, down (no o_proj), 2 layers
    assert entry["targets"] == list(PAPER_TARGETS) and adapted["layers"] <= 2 * len(PAPER_TARGETS)
    out = capsys.readouterr().out
    assert "| teal:global | 2 | nan | nan | 400.0 | 1.00 |" in out
    assert "2 layers, adapted: q_proj, k_proj, v_proj, gate_proj, up_proj, down_proj" in out


def test_bench_target_modules_option():
    from rana_hf.cli.bench import bench_targets

    assert bench_targets("paper") == list(PAPER_TARGETS) and "o_proj" not in PAPER_TARGETS
    assert bench_targets("default") is None  # the presets (with o_proj)
    assert bench_targets("q_proj, o_proj") == ["q_proj", "o_proj"]
    with pytest.raises(SystemExit, match="target-modules"):
        bench_targets(" , ")


def test_bench_registers_compiles_the_kernel_without_a_gpu(tmp_path):
    """`rana-hf bench --registers`: the kernel built for sm_90 on the CPU, registers and spills read from its cubin."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler, not the interpreter
    args = ["bench", "--registers", "--batch-sizes", "1", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "rana_hf.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "rana_registers.json").read_text())["rows"]
    assert [(r["block_k"], r["glu"]) for r in rows] == [(bk, glu) for bk in (16, 32, 64) for glu in (False, True)]
    assert all(0 < r["registers"] <= 255 and r["stack_bytes"] >= 0 for r in rows)
    # the default 32-row tile needs more than the 255 registers a thread can have at one token; 16 rows do not
    by_rows = {r["block_k"]: r for r in rows if not r["glu"]}
    assert by_rows[32]["stack_bytes"] > 0 and by_rows[16]["stack_bytes"] == 0
    assert "| 16 | 1 | False |" in done.stdout

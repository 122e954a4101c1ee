"""Standalone RaNA checkpoints served by vLLM on the CPU: `LLM(model=folder)` gives transformers' greedy tokens,
`vllm serve folder` answers an OpenAI completion request, and bad checkpoints are refused before serving starts.

Each vLLM engine runs in its own subprocess (vLLM starts its engine once per process), bounded in time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

for _name, _value in (("VLLM_HOST_IP", "127.0.0.1"), ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_name, _value)  # vLLM in this process: loopback only, no usage statistics
pytest.importorskip("vllm", reason="the vllm extra is not installed")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from vllm_checkpoints import dense_base, make_checkpoint, make_mixed_checkpoint  # noqa: E402

from rana_hf.integrations.vllm.config import SUPPORTED_MODEL_TYPES  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPTS = [[1, 5, 9, 33, 70], [200, 3, 17], [42, 42, 42, 42, 42, 42]]
NEW_TOKENS = 12
ENGINE_ARGS = dict(dtype="float32", max_model_len=128, max_num_seqs=4, skip_tokenizer_init=True)
_GENERATE = """
import json, sys
from vllm import LLM, SamplingParams

def main():
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["folder"], **args["engine"])
    params = SamplingParams(max_tokens=args["new_tokens"], temperature=0, ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)

if __name__ == "__main__":
    main()
"""


def vllm_env() -> dict[str, str]:
    """vLLM's processes talk over 127.0.0.1 only (left to itself vLLM finds the host's address by routing towards a
    public one), send no usage statistics and ask no Hub."""
    env = dict(os.environ)
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_HOST_IP="127.0.0.1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def vllm_generate(folder: Path, tmp_path: Path, env: dict[str, str] | None = None, **engine):
    script = tmp_path / "generate.py"
    script.write_text(_GENERATE)
    args = {"folder": str(folder), "engine": ENGINE_ARGS | engine, "prompts": PROMPTS, "new_tokens": NEW_TOKENS}
    return subprocess.run(
        [sys.executable, str(script), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env or vllm_env(),
        cwd=tmp_path,
    )


def tokens_of(result: subprocess.CompletedProcess) -> list[list[int]]:
    lines = [line for line in result.stdout.splitlines() if line.startswith("TOKENS ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("TOKENS "))


def hf_greedy(model) -> list[list[int]]:
    """Greedy continuations by transformers, one prompt at a time (argmax over the whole sequence, no stop token:
    vLLM is asked to ignore EOS, and `generate`'s `min_new_tokens` would forbid it instead)."""
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            for _ in range(NEW_TOKENS):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
            out.append(ids[0, len(prompt) :].tolist())
    return out


CHECKPOINTS = (("llama", "teal"), ("llama", "rana"), ("qwen2", "rana"), ("llama", "mixed"), ("gemma3_text", "rana"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for arch, method in CHECKPOINTS:
        folder = tmp_path_factory.mktemp(f"serve-{arch}-{method}")
        out[arch, method] = (
            make_mixed_checkpoint(folder, arch) if method == "mixed" else make_checkpoint(folder, arch, method)
        )
    return out


# eager mode, and once through vLLM's torch.compile (the masks as rana_hf's custom ops); qwen2 has q/k/v biases;
# mixed: fused linears whose parts differ in kind (a dense v beside q and k rank adapters, gate rank and up TEAL-style)
@pytest.mark.parametrize(
    "arch,method,eager",
    [
        ("llama", "teal", True),
        ("llama", "rana", False),
        ("qwen2", "rana", True),
        ("llama", "mixed", True),
        ("gemma3_text", "rana", True),
    ],
)
def test_vllm_gives_the_greedy_tokens_of_transformers(folders, tmp_path, arch, method, eager):
    folder = folders[arch, method]
    expected = hf_greedy(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    served = tokens_of(vllm_generate(folder, tmp_path, enforce_eager=eager))
    assert served == expected
    # and the RaNA layers are what vLLM ran: the dense base model says something else
    assert hf_greedy(dense_base(arch)) != served


def test_real_tensor_parallelism_2_gives_the_same_tokens(folders, tmp_path):
    """Two vLLM worker processes (gloo all-reduce over 127.0.0.1), each with half of every linear: the row-parallel
    rank adapters (o_proj) all-reduce their codes for real."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism 2 on the CPU needs two cores")
    folder = folders["llama", "rana"]
    env = vllm_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # workers are processes of their own
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cpus[0]}|{cpus[1]}"  # one core per worker (vLLM binds by NUMA node)
    result = vllm_generate(folder, tmp_path, env=env, enforce_eager=True, tensor_parallel_size=2)
    assert tokens_of(result) == hf_greedy(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    plan = json.loads((folder / "config.json").read_text())["quantization_config"]["rana_config"]["plan"]
    assert plan["model.layers.0.self_attn.o_proj"]["kind"] == "rank"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_vllm_serve_answers_a_completion_request(folders, tmp_path):
    folder = folders["llama", "rana"]
    port = free_port()
    # `vllm serve`'s server. The `vllm` command of vllm-cpu 0.32.0 fails before parsing anything (it asks
    # importlib.metadata for the version of a package named `vllm`, which vllm-cpu is not); the module runs the same.
    server_module = "vllm.entrypoints.openai.api_server"
    command = [sys.executable, "-m", server_module, "--model", str(folder), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--dtype", "float32"]
    command += ["--max-model-len", "128", "--max-num-seqs", "4", "--enforce-eager"]
    log = (tmp_path / "serve.log").open("w")
    env = vllm_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs its engine in a process of its own
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("vllm serve did not become healthy in 420 s:\n" + (tmp_path / "serve.log").read_text()[-3000:])
        body = {
            "model": str(folder),
            "prompt": PROMPTS[0],
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    choice = answer["choices"][0]
    assert answer["usage"]["completion_tokens"] == NEW_TOKENS
    expected = hf_greedy(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())[0]
    assert choice["token_ids"] == expected


# Bad checkpoints: refused with a message naming the problem, before serving starts.


def damaged_copy(folder: Path, tmp_path: Path, config_edit=None, tensor_edit=None) -> Path:
    target = tmp_path / "damaged"
    target.mkdir()
    for item in folder.iterdir():
        if item.is_file():
            (target / item.name).write_bytes(item.read_bytes())
    if config_edit is not None:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    if tensor_edit is not None:
        tensors = load_file(str(target / "rana_model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(target / "rana_model.safetensors"), metadata={"format": "pt"})
    return target


def _newer_format(config):
    config["quantization_config"]["format_version"] = 99


def _unsupported_model(config):
    config["quantization_config"]["base_model_type"] = "phi3"


def _topk(config):
    config["quantization_config"]["rana_config"]["budget_mode"] = "topk"


def _rotated_stream(config):
    config["quantization_config"]["rana_config"]["residual_rotation"] = "layer"


def _missing(tensors):
    del tensors["model.layers.1.self_attn.k_proj.rana_hf_A.default"]


def _wrong_shape(tensors):
    name = "model.layers.0.mlp.gate_proj.rana_hf_B.default"
    tensors[name] = tensors[name][:-1].clone()


BAD = {
    "newer format": (_newer_format, None, "newer rana_hf"),
    "unsupported model": (
        _unsupported_model,
        None,
        f"serves {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints; this one is built on 'phi3'",
    ),
    "topk budget": (_topk, None, "budget_mode='threshold' only"),
    "rotated residual stream": (_rotated_stream, None, "carries its residual stream rotated"),
    "missing tensor": (None, _missing, "missing RaNA tensors (1): model.layers.1.self_attn.k_proj.rana_hf_A.default"),
    "wrong shape": (None, _wrong_shape, "wrong shapes (1): model.layers.0.mlp.gate_proj.rana_hf_B.default"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_are_refused_when_the_config_is_read(folders, tmp_path, case):
    from vllm.model_executor.layers.quantization import get_quantization_config

    import rana_hf.integrations.vllm as plugin

    plugin.register()
    config_edit, tensor_edit, message = BAD[case]
    folder = damaged_copy(folders["llama", "rana"], tmp_path, config_edit, tensor_edit)
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError) as error:
        quantization = get_quantization_config("rana").from_config(config["quantization_config"])
        quantization.maybe_update_config(str(folder), hf_config=AutoConfig.from_pretrained(folder))
    assert message in str(error.value)


@pytest.mark.parametrize("case", ["newer format", "missing tensor"])
def test_bad_checkpoints_stop_vllm_before_it_serves(folders, tmp_path, case):
    config_edit, tensor_edit, message = BAD[case]
    folder = damaged_copy(folders["llama", "rana"], tmp_path, config_edit, tensor_edit)
    result = vllm_generate(folder, tmp_path, enforce_eager=True)
    assert result.returncode != 0 and "TOKENS" not in result.stdout
    assert message in result.stderr, result.stderr[-3000:]
    assert "Engine core initialization" not in result.stderr  # refused while reading the config, not in the engine

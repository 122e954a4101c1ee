"""RaNA parts inside vLLM's real parallel linears, under simulated tensor parallelism, against the reference forward.

For each tensor-parallel size (1, 2, 4) and rank, vLLM's own `QKVParallelLinear`, `MergedColumnParallelLinear` and
`RowParallelLinear` are built with a patched rank and world size, loaded through vLLM's loaders from the standalone
checkpoint's tensors (renamed by the integration's weight mapper and vLLM's Llama stacking map), and run on the
activations the reference model (transformers, `AutoModelForCausalLM.from_pretrained(folder)`) feeds those linears.
Column-parallel ranks must give their slice of the reference outputs; row-parallel ranks' outputs summed must give the
whole output. A row-parallel rank adapter's all-reduce of its codes is simulated: a first pass records every rank's
partial codes, the second hands each rank their sum.
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch

for _name, _value in (("VLLM_HOST_IP", "127.0.0.1"), ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_name, _value)  # vLLM in this process: loopback only, no usage statistics
vllm = pytest.importorskip("vllm", reason="the vllm extra is not installed")

import vllm.model_executor.layers.linear as vllm_linear  # noqa: E402
import vllm.model_executor.parameter as vllm_parameter  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import token_batch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor.models.llama import LlamaModel  # noqa: E402
from vllm_checkpoints import make_checkpoint, make_mixed_checkpoint  # noqa: E402

from rana_hf.integrations.vllm import linear as rana_linear  # noqa: E402
from rana_hf.integrations.vllm.config import RaNAVllmConfig  # noqa: E402

pytestmark = pytest.mark.vllm

LAYER = "model.layers.1"
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
CASES = [(arch, method) for arch in ("llama", "qwen2") for method in ("teal", "rana", "cats")]
# mixed part kinds; a tanh-GELU gate; a router shared by gate and up (and q/k/v)
CASES += [("llama", "mixed"), ("gemma3_text", "cats"), ("llama", "rotated")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per (arch, method): the folder, the reference model loaded from it, its tensors and its vLLM config."""
    out = {}
    for arch, method in CASES:
        folder = tmp_path_factory.mktemp(f"vllm-{arch}-{method}")
        if method == "mixed":  # fused linears whose parts differ in kind
            make_mixed_checkpoint(folder, arch)
        else:
            make_checkpoint(folder, arch, method)
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        config = RaNAVllmConfig.from_config(reference.config.quantization_config.to_dict())
        config.packed_modules_mapping = dict(PACKED)
        config.maybe_update_config(str(folder), hf_config=reference.config)
        out[arch, method] = (folder, reference, load_file(str(folder / "rana_model.safetensors")), config)
    return out


@contextlib.contextmanager
def tensor_parallel(rank: int, size: int):
    """vLLM's layers built inside see this tensor-parallel rank and world size (no process group)."""
    patches = [
        mock.patch.object(module, name, return_value=value)
        for module in (vllm_linear, vllm_parameter)
        for name, value in (("get_tensor_model_parallel_rank", rank), ("get_tensor_model_parallel_world_size", size))
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def build_layer(kind: str, hf_config, config: RaNAVllmConfig):
    hidden, heads, kv_heads = hf_config.hidden_size, hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    qkv_bias = hf_config.model_type == "qwen2"
    prefix = f"{LAYER}.self_attn.{kind}" if kind in ("qkv_proj", "o_proj") else f"{LAYER}.mlp.{kind}"
    if kind == "qkv_proj":
        layer = vllm_linear.QKVParallelLinear(
            hidden, head_dim, heads, kv_heads, bias=qkv_bias, quant_config=config, prefix=prefix
        )
    elif kind == "gate_up_proj":
        size = hf_config.intermediate_size
        layer = vllm_linear.MergedColumnParallelLinear(
            hidden, [size, size], bias=False, quant_config=config, prefix=prefix
        )
    else:
        size = heads * head_dim if kind == "o_proj" else hf_config.intermediate_size
        layer = vllm_linear.RowParallelLinear(size, hidden, bias=False, quant_config=config, prefix=prefix)
    return layer, prefix


def load(layer, prefix: str, tensors: dict, config: RaNAVllmConfig) -> None:
    """Load the layer's tensors as vLLM's Llama loader does: mapped names, the fused layer's own `load_weights`."""
    mapper = config.get_checkpoint_weight_mapper() | LlamaModel.hf_to_vllm_mapper
    parent = prefix.rpartition(".")[0]
    for name, tensor in tensors.items():
        mapped = mapper._map_name_with_shard(name)
        if mapped is None or not mapped[0].startswith(prefix + "."):
            continue
        attr, shard_id = mapped[0][len(prefix) + 1 :], mapped[1]
        assert name.startswith(parent + ".")
        tensor = tensor.clone()
        if shard_id is not None:
            tensor.shard_id = shard_id
            list(layer.load_weights([(attr, tensor)]))
        else:
            param = getattr(layer, attr)
            param.weight_loader(param, tensor)
    layer.quant_method.process_weights_after_loading(layer)


def layer_inputs(reference, names: list[str]) -> dict[str, torch.Tensor]:
    """The [tokens, in] activations the reference model feeds the linears `names` on a short random text."""
    captured, hooks = {}, []
    for name in names:
        module = reference.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(lambda m, args, n=name: captured.setdefault(n, args[0])))
    with torch.no_grad():
        reference(input_ids=token_batch(1, 9, seed=5))
    for hook in hooks:
        hook.remove()
    return {name: x.reshape(-1, x.shape[-1]).clone() for name, x in captured.items()}


def run_ranks(kind: str, checkpoint, tp: int, x: torch.Tensor) -> list[torch.Tensor]:
    """Each rank's output of vLLM's layer `kind` (row-parallel: on its input columns, codes all-reduced)."""
    _, reference, tensors, config = checkpoint
    layers = []
    with set_current_vllm_config(VllmConfig()):
        for rank in range(tp):
            with tensor_parallel(rank, tp):
                layer, prefix = build_layer(kind, reference.config, config)
                load(layer, prefix, tensors, config)
            layers.append(layer)
    row = isinstance(layers[0], vllm_linear.RowParallelLinear)

    def forward(rank: int, layer) -> torch.Tensor:
        if row:
            width = x.shape[-1] // tp
            bias = layer.bias if rank == 0 else None  # as RowParallelLinear.forward: the bias once
            return layer.quant_method.apply(layer, x[:, rank * width : (rank + 1) * width], bias)
        return layer(x)[0]

    partials: dict[int, list[torch.Tensor]] = {rank: [] for rank in range(tp)}
    current = {"rank": 0, "call": 0}

    def record(codes):
        partials[current["rank"]].append(codes.clone())
        return codes

    def summed(codes):
        call = current["call"]
        current["call"] += 1
        return sum(partials[rank][call] for rank in range(tp))

    with torch.no_grad():
        with mock.patch.object(rana_linear, "_all_reduce", record):
            for rank, layer in enumerate(layers):
                current["rank"] = rank
                forward(rank, layer)
        outputs = []
        with mock.patch.object(rana_linear, "_all_reduce", summed):
            for rank, layer in enumerate(layers):
                current["call"] = 0
                outputs.append(forward(rank, layer))
    if row and tp > 1 and any(layers[0].rana_groups):
        assert all(len(partials[rank]) == len(layers[0].rana_groups) for rank in range(tp))
    return outputs


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("arch,method", CASES)
def test_fused_column_parallel_layers_match_the_reference(checkpoints, arch, method, tp):
    checkpoint = checkpoints[arch, method]
    reference, plan = checkpoint[1], checkpoint[3].plan
    hf_config = reference.config
    kv_replicas = max(1, tp // hf_config.num_key_value_heads)
    adapted = set()
    for kind, parent in (("qkv_proj", f"{LAYER}.self_attn"), ("gate_up_proj", f"{LAYER}.mlp")):
        names = [f"{parent}.{part}" for part in PACKED[kind]]
        x = layer_inputs(reference, names[:1])[names[0]]
        with torch.no_grad():
            full = [reference.get_submodule(name)(x) for name in names]
        outputs = run_ranks(kind, checkpoint, tp, x)
        for rank, output in enumerate(outputs):
            pieces = []
            for index, whole in enumerate(full):
                replicas = 1 if kind == "gate_up_proj" or index == 0 else kv_replicas  # k and v heads replicate
                width = whole.shape[-1] * replicas // tp
                shard = rank // replicas
                pieces.append(whole[:, shard * width : (shard + 1) * width])
            torch.testing.assert_close(output, torch.cat(pieces, dim=-1), rtol=1e-4, atol=1e-5)
        if {plan[name]["kind"] for name in names if name in plan} - {"dense", "follower"}:
            adapted.add(kind)
    assert adapted == ({"gate_up_proj"} if method == "cats" else {"qkv_proj", "gate_up_proj"})  # cats: attention dense


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("arch,method", [case for case in CASES if case[1] != "cats"])  # cats leaves these dense
def test_row_parallel_layers_match_the_reference(checkpoints, arch, method, tp):
    checkpoint = checkpoints[arch, method]
    reference = checkpoint[1]
    for kind, name in (("o_proj", f"{LAYER}.self_attn.o_proj"), ("down_proj", f"{LAYER}.mlp.down_proj")):
        x = layer_inputs(reference, [name])[name]
        with torch.no_grad():
            expected = reference.get_submodule(name)(x)
        outputs = run_ranks(kind, checkpoint, tp, x)
        torch.testing.assert_close(sum(outputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,method", CASES)
def test_the_masks_change_the_outputs(checkpoints, arch, method):
    """The comparisons above are not dense against dense: the reference RaNA layers differ from their unmasked form."""
    _, reference, tensors, config = checkpoints[arch, method]
    changed, adapted = 0, 0
    if method == "mixed":
        assert {config.plan[f"{LAYER}.self_attn.v_proj"]["kind"], config.plan[f"{LAYER}.mlp.up_proj"]["kind"]} == {
            "dense",
            "neuron",
        }
    if method == "rotated":  # one router shared by gate and up, one by q, k and v
        assert config.plan[f"{LAYER}.mlp.up_proj"]["owner"] == f"{LAYER}.mlp.gate_proj"
        assert config.plan[f"{LAYER}.self_attn.v_proj"]["owner"] == f"{LAYER}.self_attn.q_proj"
    for name, entry in config.plan.items():
        if not name.startswith(LAYER + ".") or entry["kind"] not in ("neuron", "rank", "gated"):
            continue
        router = config.plan[entry.get("owner", name)]
        if entry["kind"] == "rank" and router["mean_kept"] >= router["rank"]:  # truncated, every component kept
            continue  # (a rotation can spend its budget so): no mask to see
        adapted += 1
        x = layer_inputs(reference, [name])[name]
        with torch.no_grad():
            output = reference.get_submodule(name)(x)
            if entry["kind"] == "rank":
                owner = entry.get("owner", name)
                codes = x @ tensors[f"{owner}.rana_hf_B.default"].T
                unmasked = codes @ tensors[f"{name}.rana_hf_A.default"].T
            else:
                unmasked = x @ tensors[f"{name}.base_layer.weight"].T
        if "bias" in dict(reference.get_submodule(name).base_layer.named_parameters()):
            unmasked = unmasked + reference.get_submodule(name).base_layer.bias
        changed += not torch.allclose(output, unmasked, rtol=1e-3, atol=1e-4)
    assert adapted and changed == adapted


def test_loaders_refuse_a_wrong_shape_and_a_missing_tensor(checkpoints):
    """Where vLLM cannot check the folder first (a Hub name), the layers' loaders name the bad tensor."""
    _, reference, tensors, config = checkpoints["llama", "rana"]
    name = f"{LAYER}.self_attn.q_proj.rana_hf_B.default"
    with set_current_vllm_config(VllmConfig()), tensor_parallel(0, 1):
        layer, prefix = build_layer("qkv_proj", reference.config, config)
        bad = dict(tensors)
        bad[name] = bad[name][:, :-1]
        with pytest.raises(ValueError, match=rf"{name.replace('.default', '')} has shape .* expected from the plan"):
            load(layer, prefix, bad, config)
        layer, prefix = build_layer("qkv_proj", reference.config, config)
        missing = {key: value for key, value in tensors.items() if not key.startswith(f"{LAYER}.self_attn.v_proj.")}
        with pytest.raises(ValueError, match=rf"got no {LAYER}.self_attn.v_proj.rana_hf_A from the checkpoint"):
            load(layer, prefix, missing, config)


def test_a_layer_kind_the_integration_cannot_run_is_refused(monkeypatch):
    """A RaNA layer kind added to the registry later is refused by name, never served as a dense linear."""
    from rana_hf.adapters import ENTRIES
    from rana_hf.adapters.base import EntryKind

    class Future(EntryKind):
        name = "future"

    monkeypatch.setitem(ENTRIES, "future", Future())
    with pytest.raises(ValueError, match="'future' layer, which rana_hf's vLLM integration cannot run"):
        rana_linear.part_kind("model.layers.0.mlp.up_proj", {"kind": "future"})
    assert rana_linear.part_kind("model.layers.0.mlp.up_proj", {"kind": "follower"}) == rana_linear.DENSE

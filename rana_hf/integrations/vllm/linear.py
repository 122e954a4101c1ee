"""RaNA layers inside vLLM's linears: `RaNALinearMethod` (a `LinearMethodBase`).

A vLLM linear may fuse several original linears (`qkv_proj` = q, k, v; `gate_up_proj` = gate, up): each is a *part*
with the kind its plan entry gives it, computed with the same maths as the reference forwards in `rana_hf.adapters`:

- dense (untargeted, `dense` or CATS `follower` entries): `y = W x`;
- input (`neuron` entries, TEAL-style or weighted): `y = W (keep * x)`, `keep_i = |x_i| >= threshold[i]`;
- gated (CATS-style gate): `g = W x`, zeroed where `|act(g)| < threshold`;
- rank (the paper's adapter): `y = A (keep * B x)`, `keep_j = |(B x)_j| >= threshold`. Parts that share one router
  (q, k and v: the owner holds `B` and the threshold, members only their `A`) compute `B x` once.

Tensor parallelism, as vLLM shards the layer (`tp_rank`, `tp_size` of the layer):
- column-parallel layers split the output: `W` and `A` by rows (k/v follow vLLM's head replication), `B` and the
  thresholds are replicated; every rank computes the whole `B x` of its routers.
- row-parallel layers (o_proj, down_proj) split the input: `W`'s columns and an input part's thresholds alike (no
  communication); a rank part's `B` by columns, so each rank holds partial codes, all-reduced (`[tokens, r]`) before
  the mask; `A` is split by its `r` columns (ranks take `ceil(r / tp)` each, the last fewer) and the layer's own
  all-reduce sums the partial outputs.

Parameters are created at full per-rank size and filled by loaders that check each tensor's shape against the plan
(a clear error naming the tensor) and record what arrived; `process_weights_after_loading` refuses a layer with a
tensor that never came, then lays the parts out for `apply` (which runs under `torch.compile`: the masks go through
the `rana_hf::masked_inputs` custom op).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

from ...kernels.ops import masked_inputs
from ...tuner import injected
from .. import standalone

DENSE, INPUT, GATED, RANK = "dense", "input", "gated", "rank"
# Plan entry kind -> part kind, for the entries that put a RaNA layer in place of a linear; entries that leave the
# linear as it is (`tuner.injected` false: dense, CATS followers) are dense parts. A new injected kind must be added
# here (and to `RaNALinearMethod.apply`): `part_kind` refuses it rather than serve it as a dense linear.
_KINDS = {"neuron": INPUT, "gated": GATED, "rank": RANK}
_CHECKPOINT_NAMES = {"A": "rana_hf_A", "B": "rana_hf_B", "threshold": "rana_hf_threshold", "weight": "base_layer"}


def _all_reduce(codes: torch.Tensor) -> torch.Tensor:
    """Sum a row-parallel rank part's partial codes over the tensor-parallel group (patched in the layer tests)."""
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(codes)


def part_kind(name: str, entry: dict) -> str:
    """The part kind of plan entry `name` (dense where the plan leaves the linear as it is)."""
    if not injected(entry):
        return DENSE
    if entry["kind"] not in _KINDS:
        raise ValueError(
            f"plan entry {name!r} is a {entry['kind']!r} layer, which rana_hf's vLLM integration cannot run yet; "
            "load the checkpoint with transformers (`AutoModelForCausalLM`) instead"
        )
    return _KINDS[entry["kind"]]


def expected_tensors(plan: dict[str, dict]) -> dict[str, tuple[int, ...]]:
    """`{checkpoint tensor name: shape}` of every RaNA layer in `plan`, as `save_compressed` writes them."""
    suffix = f".{standalone.ADAPTER_NAME}"
    out: dict[str, tuple[int, ...]] = {}
    for name, entry in plan.items():
        kind = part_kind(name, entry)
        rows, cols = entry["out_features"], entry["in_features"]
        if kind == RANK:
            out[f"{name}.rana_hf_A{suffix}"] = (rows, entry["rank"])
            if entry["role"] != "member":
                out[f"{name}.rana_hf_B{suffix}"] = (entry["rank"], cols)
                out[f"{name}.rana_hf_threshold{suffix}"] = ()
        elif kind in (INPUT, GATED):
            out[f"{name}.base_layer.weight"] = (rows, cols)
            out[f"{name}.rana_hf_threshold{suffix}"] = (cols,) if kind == INPUT else ()
    return out


@dataclass
class Part:
    """One original linear inside a vLLM linear, on this tensor-parallel rank.

    Attributes:
        name: its module name in the checkpoint (e.g. `model.layers.0.self_attn.k_proj`).
        shard_id: vLLM's shard id in the fused layer (`"q"`, `1`, ...), None in an unfused one.
        kind: `dense`, `input`, `gated` or `rank`.
        out_features, in_features: its full shape (all ranks).
        rows: (start, size) of its output rows held by this rank.
        cols: (start, size) of its input columns held by this rank.
        rank, role, owner: rank parts: components, `own`/`owner`/`member`, the owner's index among the parts.
        codes: rank parts of a row-parallel layer: (start, size) of the components whose `A` columns this rank holds.
    """

    name: str
    shard_id: str | int | None
    kind: str
    out_features: int
    in_features: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    rank: int = 0
    role: str = ""
    owner: int = -1
    codes: tuple[int, int] = (0, 0)

    def sizes(self) -> dict[str, tuple[int, ...]]:
        """This rank's shape of each RaNA tensor the part holds (`weight`: its rows of the layer's dense weight)."""
        out: dict[str, tuple[int, ...]] = {}
        if self.kind == RANK:
            out["A"] = (self.rows[1], self.codes[1])
            if self.role != "member":
                out["B"] = (self.rank, self.cols[1])
                out["threshold"] = (1,)
        elif self.kind != DENSE:
            out["threshold"] = (self.cols[1],) if self.kind == INPUT else (1,)
        if self.kind != RANK:
            out["weight"] = (self.rows[1], self.cols[1])
        return out

    def full_shape(self, tensor: str) -> tuple[int, ...]:
        """The shape of the part's tensor in the checkpoint (all ranks)."""
        if tensor == "A":
            return (self.out_features, self.rank)
        if tensor == "B":
            return (self.rank, self.in_features)
        if tensor == "threshold":
            return (self.in_features,) if self.kind == INPUT else ()
        return (self.out_features, self.in_features)

    def local(self, tensor: str, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the part's full checkpoint tensor."""
        if tensor == "A":
            return loaded.narrow(0, *self.rows).narrow(1, *self.codes)
        if tensor == "B":
            return loaded.narrow(1, *self.cols)
        if tensor == "threshold":
            return loaded.narrow(0, *self.cols) if self.kind == INPUT else loaded.reshape(1)
        return loaded.narrow(0, *self.rows).narrow(1, *self.cols)


def _parallel_style(layer: nn.Module) -> str:
    if isinstance(layer, RowParallelLinear):
        return "row"
    if isinstance(layer, ColumnParallelLinear):
        return "column"
    if isinstance(layer, ReplicatedLinear):
        return "replicated"
    raise ValueError(f"rana_hf's vLLM integration has no RaNA form of {type(layer).__name__}")


def _parts(config, prefix: str, names: list[str], layer: nn.Module, output_partition_sizes: list[int]) -> list[Part]:
    """The parts of vLLM linear `prefix` on this rank, checked against the plan."""
    style = _parallel_style(layer)
    tp_rank, tp_size = (layer.tp_rank, layer.tp_size) if style != "replicated" else (0, 1)
    full_outputs = getattr(layer, "output_sizes", [layer.output_size])
    if isinstance(layer, QKVParallelLinear):  # its output_sizes count k/v heads replicated past their number
        kv_heads = layer.total_num_kv_heads
        full_outputs = [
            layer.total_num_heads * layer.head_size,
            kv_heads * layer.head_size,
            kv_heads * layer.v_head_size,
        ]
    if len(names) != len(output_partition_sizes) or len(full_outputs) != len(names):
        raise ValueError(
            f"vLLM's {prefix!r} has {len(output_partition_sizes)} parts, the packed-modules mapping names {names}"
        )
    shard_ids: list = [None]
    if isinstance(layer, QKVParallelLinear):
        shard_ids = ["q", "k", "v"]
    elif len(names) > 1:
        shard_ids = list(range(len(names)))
    in_size = layer.input_size
    in_part = in_size // tp_size if style == "row" else in_size
    cols = (tp_rank * in_part if style == "row" else 0, in_part)
    parts = []
    for index, (name, size) in enumerate(zip(names, output_partition_sizes, strict=True)):
        entry = config.plan.get(name) or {"kind": "dense", "out_features": full_outputs[index], "in_features": in_size}
        kind = part_kind(name, entry) if name in config.plan else DENSE
        if (entry["out_features"], entry["in_features"]) != (full_outputs[index], in_size):
            raise ValueError(
                f"the plan of {name!r} is for shape {(entry['out_features'], entry['in_features'])} (out, in); vLLM's "
                f"{prefix!r} holds it as {(full_outputs[index], in_size)}: config.json and the plan do not match"
            )
        if kind == GATED and style != "column":
            raise ValueError(f"{name!r}: a CATS-style gate must be column-parallel in vLLM; {prefix!r} is not")
        shard_rank = tp_rank
        if isinstance(layer, QKVParallelLinear) and index > 0:
            shard_rank = tp_rank // layer.num_kv_head_replicas  # k and v heads are replicated past their count
        rows = (shard_rank * size if style == "column" else 0, size)
        part = Part(name, shard_ids[index], kind, entry["out_features"], in_size, rows, cols)
        if kind == RANK:
            part.rank, part.role = entry["rank"], entry["role"]
            chunk = math.ceil(part.rank / tp_size) if style == "row" else part.rank
            start = min(tp_rank * chunk, part.rank) if style == "row" else 0
            part.codes = (start, min(chunk, part.rank - start))
            if part.role == "member":
                if entry.get("owner") not in names:
                    raise ValueError(
                        f"{name!r} reads the router of {entry.get('owner')!r}, which vLLM's {prefix!r} does not hold; "
                        "rana_hf's vLLM integration serves routers shared inside one fused linear (q/k/v) only"
                    )
                part.owner = names.index(entry["owner"])
            else:
                part.owner = index
        parts.append(part)
    for part in parts:
        if part.kind == RANK and part.role == "member":
            owner = parts[part.owner]
            if owner.kind != RANK or owner.role != "owner" or owner.rank != part.rank:
                raise ValueError(f"{part.name!r}: its router owner {owner.name!r} is not a rank adapter of its rank")
    return parts


class RaNALinearMethod(LinearMethodBase):
    """The RaNA parts of one vLLM linear (see the module docstring).

    Args:
        config: the `RaNAVllmConfig` (plan, model activation).
        prefix: vLLM's name of the linear (`model.layers.0.self_attn.qkv_proj`).
        names: the original linears it holds, in vLLM's shard order.
    """

    def __init__(self, config, prefix: str, names: list[str]) -> None:
        super().__init__()
        self.config = config
        self.prefix = prefix
        self.names = names

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        layer_loader = extra_weight_attrs.pop("weight_loader")
        parts = _parts(self.config, self.prefix, self.names, layer, output_partition_sizes)
        if any(p.cols[1] != input_size_per_partition for p in parts):
            raise ValueError(f"{self.prefix!r}: input partition {input_size_per_partition} differs from the plan's")
        layer.rana_parts = parts
        layer.rana_loaded = set()  # (tensor, part index) pairs that arrived
        layer.rana_act = self.config.hidden_act
        if any(p.kind != RANK for p in parts):  # the layer's dense weight (rank parts leave their rows unused)
            weight = nn.Parameter(
                torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
                requires_grad=False,
            )
            set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs})
            set_weight_attrs(weight, {"weight_loader": self._weight_loader(layer, layer_loader)})
            layer.register_parameter("weight", weight)
        # The RaNA tensors of all parts, flat, one after the other (parts' shapes differ: gate and up have their own
        # ranks); `process_weights_after_loading` views them per part.
        for tensor, dtype in (("A", params_dtype), ("B", params_dtype), ("threshold", torch.float32)):
            numel = sum(math.prod(p.sizes()[tensor]) for p in parts if tensor in p.sizes())
            if not any(tensor in p.sizes() for p in parts):
                continue
            param = nn.Parameter(torch.empty(numel, dtype=dtype), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._rana_loader(layer, tensor)})
            layer.register_parameter(f"rana_{tensor}", param)

    def _part_index(self, layer: nn.Module, shard_id, what: str) -> int:
        parts = layer.rana_parts
        for index, part in enumerate(parts):
            if part.shard_id == shard_id:
                return index
        raise ValueError(
            f"{self.prefix!r}: {what} arrived for shard {shard_id!r}; the layer's parts are "
            f"{[p.shard_id for p in parts]} (a checkpoint with fused q/k/v or gate/up tensors is not a RaNA "
            "checkpoint)"
        )

    def _check(self, part: Part, tensor: str, loaded: torch.Tensor) -> None:
        name = f"{part.name}.{_CHECKPOINT_NAMES[tensor]}"
        if tensor not in part.sizes():
            raise ValueError(
                f"the checkpoint has {name}, but the plan makes {part.name!r} a {part.kind} part, which holds none"
            )
        expected = part.full_shape(tensor)
        if tuple(loaded.shape) != expected:
            raise ValueError(
                f"{name} has shape {list(loaded.shape)} in the checkpoint, {list(expected)} expected from the plan; "
                "the checkpoint is damaged: save the model again with `rana_hf.save_compressed`"
            )

    def _weight_loader(self, layer: nn.Module, layer_loader):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            if loaded.numel() == 0:
                return  # `standalone._sentinel`: the plain-linear name of an adapted linear, empty
            index = self._part_index(layer, shard_id, "a dense weight")
            part = layer.rana_parts[index]
            if part.kind == RANK:
                raise ValueError(
                    f"the checkpoint has a dense weight for {part.name!r}, which the plan makes a rank adapter "
                    "(A and B replace its weight); config.json and the weights do not match"
                )
            self._check(part, "weight", loaded)
            if len(layer.rana_parts) > 1:
                layer_loader(param, loaded, shard_id)
            else:
                layer_loader(param, loaded)
            layer.rana_loaded.add(("weight", index))

        return load

    def _rana_loader(self, layer: nn.Module, tensor: str):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            index = self._part_index(layer, shard_id, f"rana_hf_{tensor}")
            part = layer.rana_parts[index]
            self._check(part, tensor, loaded)
            view = _views(layer, tensor, param.data)[index]
            view.copy_(part.local(tensor, loaded).reshape(view.shape))
            layer.rana_loaded.add((tensor, index))

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        parts: list[Part] = layer.rana_parts
        missing = [
            f"{part.name}.{_CHECKPOINT_NAMES[tensor]}"
            for index, part in enumerate(parts)
            for tensor in part.sizes()
            if (tensor, index) not in layer.rana_loaded
        ]
        if missing:
            raise ValueError(
                f"vLLM's {self.prefix!r} got no {', '.join(missing)} from the checkpoint; the standalone RaNA "
                "checkpoint is incomplete: save the model again with `rana_hf.save_compressed`"
            )
        views = {
            tensor: _views(layer, tensor, getattr(layer, f"rana_{tensor}").data)
            for tensor in ("A", "B", "threshold")
            if hasattr(layer, f"rana_{tensor}")
        }
        weight = layer.weight.data if hasattr(layer, "weight") else None
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + part.rows[1])
        # The compute layout replaces the loading layout: contiguous buffers per part (module state that
        # torch.compile traces), the loading parameters removed.
        buffers: dict[str, torch.Tensor] = {}
        inputs = [i for i, p in enumerate(parts) if p.kind == INPUT]
        if inputs:
            buffers["rana_input_threshold"] = torch.stack([views["threshold"][i] for i in inputs])  # [S, n]
        for index, part in enumerate(parts):
            if part.kind != RANK:
                buffers[f"rana_w{index}"] = weight[offsets[index] : offsets[index + 1]].contiguous()
            if part.kind == GATED:
                buffers[f"rana_tau{index}"] = views["threshold"][index].reshape(1, 1).clone()
            if part.kind == RANK and part.role != "member":
                group = [i for i, p in enumerate(parts) if p.kind == RANK and p.owner == index]
                buffers[f"rana_b{index}"] = views["B"][index].contiguous()
                buffers[f"rana_tau{index}"] = views["threshold"][index].reshape(1, 1).expand(1, part.rank).clone()
                buffers[f"rana_a{index}"] = torch.cat([views["A"][i] for i in group]).contiguous()
        for name in ("weight", "rana_A", "rana_B", "rana_threshold"):
            if name in layer._parameters:
                del layer._parameters[name]
        for name, tensor in buffers.items():
            layer.register_buffer(name, tensor, persistent=False)
        layer.rana_inputs = inputs
        layer.rana_groups = {
            index: [i for i, p in enumerate(parts) if p.kind == RANK and p.owner == index]
            for index, part in enumerate(parts)
            if part.kind == RANK and part.role != "member"
        }
        layer.rana_row_parallel = isinstance(layer, RowParallelLinear) and layer.tp_size > 1

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: [..., n / tp (row-parallel) or n] -> [..., this rank's outputs]
        parts: list[Part] = layer.rana_parts
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [T, n]
        outs: list[torch.Tensor | None] = [None] * len(parts)
        if layer.rana_inputs:
            masked = masked_inputs(x, layer.rana_input_threshold)  # [S, T, n]
            for slot, index in enumerate(layer.rana_inputs):
                outs[index] = F.linear(masked[slot], getattr(layer, f"rana_w{index}"))
        for index, part in enumerate(parts):
            if part.kind == DENSE:
                outs[index] = F.linear(x, getattr(layer, f"rana_w{index}"))
            elif part.kind == GATED:
                gate = F.linear(x, getattr(layer, f"rana_w{index}"))
                keep = _activation(layer.rana_act, gate).abs().float() >= getattr(layer, f"rana_tau{index}")
                outs[index] = gate * keep
        for owner, group in layer.rana_groups.items():
            down = getattr(layer, f"rana_b{owner}")
            codes = F.linear(x.to(down.dtype), down)  # [T, r] (row-parallel: this rank's partial sum)
            if layer.rana_row_parallel:
                codes = _all_reduce(codes)
            codes = masked_inputs(codes, getattr(layer, f"rana_tau{owner}"))[0]
            start, size = parts[owner].codes
            if size != codes.shape[-1]:
                codes = codes.narrow(-1, start, size)  # row-parallel: the components whose A columns this rank holds
            result = F.linear(codes, getattr(layer, f"rana_a{owner}"))  # [T, rows of the group's parts]
            offset = 0
            for index in group:
                outs[index] = result.narrow(-1, offset, parts[index].rows[1])
                offset += parts[index].rows[1]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if bias is not None:
            out = out + bias
        return out.to(x.dtype).reshape(*lead, out.shape[-1])


def _views(layer: nn.Module, tensor: str, flat: torch.Tensor) -> list[torch.Tensor | None]:
    """Per part, its view of the flat parameter `rana_<tensor>` (None for parts without that tensor)."""
    views: list[torch.Tensor | None] = []
    offset = 0
    for part in layer.rana_parts:
        shape = part.sizes().get(tensor)
        if shape is None:
            views.append(None)
            continue
        numel = math.prod(shape)
        views.append(flat[offset : offset + numel].view(shape))
        offset += numel
    return views


def _activation(name: str | None, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"CATS-style gates need a SiLU or tanh-GELU MLP activation, the model has {name!r}")

"""Decode mode: RaNA layers hold their weights in the kernels' layout, and the dense weights they replace are freed.

`prepare_for_decode(model)` re-lays every adapted linear once, in place:
- an input (neuron) adapter keeps `W` only as `Wt = W^T` (each input's column one contiguous row), and its weight
  becomes a view of it;
- a rank adapter keeps `A` only as `At = A^T` (each component one contiguous row; q, k and v sharing a router are
  stacked side by side, so one launch computes all three), `A` becomes a view of it, and the dense weight it replaces
  is freed.
No tensor is stored twice, so the model takes no more memory than before and, with rank adapters, less. A step of at
most `kernel_tokens` tokens (default `DECODE_KERNEL_TOKENS`) then runs the `rana_hf::masked_gemv` op (the Triton
kernel on CUDA in float16 and bfloat16; the torch reference elsewhere); longer inputs (prefill, larger batches) run the
reference forward on the same tensors. The down projection of a gated MLP computes its input `act(gate) * up` inside
the kernel's load.

This is for inference: the adapters cannot be switched off afterwards (their dense weights are gone); save the model
before preparing it.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import rotation
from .adapters import MEMBER, OWNER, RaNACompensatedLinear, RaNALinear, RaNANeuronLinear
from .kernels.ops import (
    ACT_NONE,
    DECODE_KERNEL_TOKENS,
    MAX_KERNEL_TOKENS,
    activation_code,
    masked_gemv,
    masked_inputs,
    reserve_workspace,
)
from .layers import RaNALayer, active_counter
from .offload import module_weight

# Layers laid out as input adapters (`W^T` rows, masked input; a compensated layer adds its term after the product)
_MASKED = (RaNANeuronLinear, RaNACompensatedLinear)

# Launches shared by several layers (a rank adapter's owner and its members; input adapters stacked by input): the
# owner leaves its whole output here under the group's id, for its input; each member takes its columns from it when it
# is called on that same input, and the last member removes it. Only this module-level dict and integer ids link the
# layers: a layer holding references to other modules makes `torch.compile` guard every alias of them on each call,
# in Python (seen: ~20 such guards per Llama layer; `rana-hf bench --host-overhead` times the host's part of a step).
_PENDING: dict[int, tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...]]] = {}  # id: (input, output(s))
_GROUP_IDS = itertools.count()
_SERIALS = itertools.count()  # `DecodeState.plan`'s last field: no two plans ever made are equal


# Positions in `DecodeState.plan`: the fields a prepared layer's forward reads, in one tuple.
(
    _ADAPTER,
    _DTYPE,
    _MAX_TOKENS,
    _DENSE_PREFILL,
    _TAKES,
    _CLEARS,
    _GROUP,
    _INDEX,
    _START,
    _END,
    _ACTIVATION,
    _BIAS,
    _ROUTER_GROUP,
    _ROUTER_TAKES,
    _ROUTER_START,
    _ROUTER_END,
    _SERIAL,
) = range(17)

# Rank adapters compute their router codes `B x` of a decode step with the masked-GEMV kernel on `B^T`, every input
# kept (threshold 0), and rank adapters of one input with routers of their own (gate and up) stack their `B^T` side by
# side: one launch for both routers, where cuBLAS's GEMV took a split-K product and its reduction per router. False:
# each router's codes through `F.linear` (cuBLAS); set before `prepare_for_decode` to compare the two. Measured on an
# H200 (8 layers of the Llama-2-7B shape, float16, batch 1): 978 against 1029 us of kernel time per step.
ROUTER_KERNEL = True

# Two rank adapters of one input with routers of their own (gate and up, whose codes one router launch computes) also
# read their kept components of `A` in one launch: their `A^T` laid one after the other in one flat tensor, the
# kernel's row segments (each its own codes and weight). False: one launch per layer; set before `prepare_for_decode`.
FUSED_RANK_LAUNCH = True


@dataclass(slots=True)  # no instance dict: `torch.compile` then need not check it for each method it calls
class DecodeState:
    """A layer's decode-mode tensors.

    Attributes:
        wt: [K, N] rows of the kernel's weight (`W^T` or the stacked `A^T`), unit stride along N.
        threshold: [K] float32 per-row thresholds on `|input|`.
        router: the rank adapter's `B` [r, n] (None for an input adapter).
        bias: the linear's bias, or None.
        columns: output columns of the owner's launch that are this layer's (`(start, end)`).
        group: id of the launch this layer shares with others (see `_PENDING`), or None.
        takes: a member: it takes its columns of the owner's output when there is one for its input.
        clears: the group's last member: it removes the owner's output once taken.
        index: the layer's place in its group (its part of an owner's prefill output).
        stacked: input adapters stacked with siblings, owner only: (stacked `W^T` [K, sum N], thresholds [S, K],
            segment widths), computed by one launch.
        activation: down projection only: the kernel's activation code when the MLP fuses its input into the load.
        max_tokens: steps of at most this many tokens take the kernel; larger ones (prefill, larger batches) the
            layer's torch forward, or for input adapters `prefill_forward`.
        dense_prefill: input adapters only: steps of more than `max_tokens` tokens run the dense weight.
        adapter: the adapter prepared.
        routers: rank adapter whose router computes a router group's codes: (stacked `B^T` [n, sum r], thresholds
            [n], all zero: every input kept), one launch for the group's codes.
        router_group: id of the launch of router codes this layer shares (see `_PENDING`), or None.
        router_takes: a later member of a router group: it takes its codes from the first one's launch.
        router_columns: the columns of the router group's codes that are this layer's (`(start, end)`).
        fused: the first of two rank adapters whose masked reads of `A` one launch computes (gate and up): (their `A^T`
            flat, one after the other; their thresholds, concatenated; their widths; their ranks).
        compensation: a compensated layer's low-rank term for the inputs its mask drops: (`B` [r, n], `A` [m, r]),
            added to the masked product (`U V ((1 - keep) * x)`, see `adapters.compensated`).
        plan: the fields above, with the weights' dtype, that the forward reads (positions `_ADAPTER` ... `_BIAS`;
            `_BIAS`: whether there is a bias), one tuple of constants. `torch.compile` guards such a tuple as one
            value, where it guards each field of an object it reads apart: measured on the CPU with 192 objects of 11
            fields, 106 against 47 µs of guard time per call. `settle()` makes it, after construction and after any
            change of another field (assignment calls it). Its last field is a serial number that no other plan ever
            had: a compiled step that guards the plan of each state it reads is valid for exactly those tensors, so
            `decode_guard_filter` can leave the tensors' own guards out.
    """

    wt: torch.Tensor
    threshold: torch.Tensor
    router: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    columns: tuple[int, int] = (0, 0)
    group: int | None = None
    takes: bool = False
    clears: bool = False
    index: int = 0
    stacked: tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None = None
    activation: int | None = None
    max_tokens: int = DECODE_KERNEL_TOKENS
    dense_prefill: bool = False
    adapter: str = "default"
    routers: tuple[torch.Tensor, torch.Tensor] | None = None
    router_group: int | None = None
    router_takes: bool = False
    router_columns: tuple[int, int] = (0, 0)
    fused: tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]] | None = None
    compensation: tuple[torch.Tensor, torch.Tensor] | None = None
    plan: tuple = ()

    def __post_init__(self):
        self.settle()

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name != "plan" and hasattr(self, "plan"):  # `plan` is the last field `__init__` sets
            self.settle()

    def settle(self) -> None:
        """Make `plan` from the fields (after any change to them)."""
        start, end = self.columns
        self.plan = (
            self.adapter,
            self.wt.dtype,
            self.max_tokens,
            self.dense_prefill,
            self.takes,
            self.clears,
            self.group,
            self.index,
            start,
            end,
            self.activation,
            self.bias is not None,
            self.router_group,
            self.router_takes,
            *self.router_columns,
            next(_SERIALS),
        )

    def decodes(self, x: torch.Tensor) -> bool:
        """A decode step: at most `max_tokens` tokens."""
        return x.numel() // x.shape[-1] <= self.plan[_MAX_TOKENS]

    def runs(self, layer: RaNALayer, x: torch.Tensor) -> bool:
        """The prepared path applies: the prepared adapter is the layer's (first) active one, adapters are on, `x` has
        the weights' dtype and nothing counts FLOPs (counting runs the reference forward).

        Reads plain attributes only (not the adapter containers that `RaNALayer._active` looks into), so that a
        compiled decode step guards as little as it can on each call."""
        names = layer._active_adapter
        first = names if isinstance(names, str) else (names[0] if names else None)
        plan = self.plan
        return (
            not layer._disable_adapters
            and first == plan[_ADAPTER]
            and x.dtype == plan[_DTYPE]
            and active_counter() is None
        )

    def forward(self, layer: RaNALayer, x: torch.Tensor) -> torch.Tensor:
        """A decode step through the kernel; an input adapter's longer input through `prefill_forward` (or its dense
        weight with `dense_prefill`). A compensated layer adds its low-rank term to the masked product (its own
        launch's or its group's)."""
        if self.decodes(x):
            y = decode_forward(layer, x)
        elif self.plan[_DENSE_PREFILL]:
            return layer.base_layer(x)
        else:
            y = prefill_forward(layer, x)
        return y + _compensation(self, x) if self.compensation is not None else y


def _finish(y: torch.Tensor, state: DecodeState) -> torch.Tensor:
    return y + state.bias if state.plan[_BIAS] else y


def _part(state: DecodeState, out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """This layer's part of its group's output: its columns of one launch (decode), or its own product (prefill)."""
    plan = state.plan
    if isinstance(out, tuple):
        return _finish(out[plan[_INDEX]], state)
    if plan[_GROUP] is None:  # a launch of its own: all of it
        return _finish(out, state)
    return _finish(out[..., plan[_START] : plan[_END]], state)


def _take(state: DecodeState, x: torch.Tensor) -> torch.Tensor | None:
    """A member's part of its owner's output for this same input, if the owner left one."""
    plan = state.plan
    pending = _PENDING.get(plan[_GROUP])
    if pending is not None and plan[_CLEARS]:  # the last member removes it in any case: nothing outlives the call
        del _PENDING[plan[_GROUP]]
    if pending is None or pending[0] is not x:
        return None
    return _part(state, pending[1])


def _share(state: DecodeState, x: torch.Tensor, out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Leave an owner's whole output for its members (on `x`); the owner's own part."""
    group = state.plan[_GROUP]
    if group is not None:
        _PENDING[group] = (x, out)
    return _part(state, out)


def _join(states: list[DecodeState]) -> None:
    """Make the layers of `states` one group: the first owns the launch, the others take their parts of it."""
    group_id = next(_GROUP_IDS)
    for index, state in enumerate(states):
        state.group, state.takes, state.clears, state.index = group_id, index > 0, index == len(states) - 1, index


def _compensation(state: DecodeState, x: torch.Tensor) -> torch.Tensor:
    """A compensated layer's low-rank term on the inputs its mask drops: `A (B ((1 - keep) * x))`, [..., m]."""
    down, up = state.compensation
    dropped = x * (x.float().abs() < state.threshold.float()).to(x.dtype)
    return F.linear(F.linear(dropped, down), up)


def decode_forward(layer: RaNALayer, x: torch.Tensor) -> torch.Tensor:
    """The decode step of a prepared layer: x [..., n] -> [..., m] (a compensated layer: its masked product)."""
    state: DecodeState = layer._decode
    takes = state.plan[_TAKES]
    if takes and (done := _take(state, x)) is not None:
        return done
    if isinstance(layer, _MASKED):
        if state.stacked is not None:  # one launch for the whole group
            wt, threshold, widths = state.stacked
            return _share(state, x, masked_gemv(x, wt, threshold, widths=widths))
        if takes:  # its owner did not run on this input: its columns alone
            return _finish(masked_gemv(x, state.wt, state.threshold), state)
        return _share(state, x, masked_gemv(x, state.wt, state.threshold))
    if state.fused is not None:  # gate and up: both routers' codes in one launch, both reads of `A` in another
        stacked, zeros = state.routers
        flat, thresholds, widths, ranks = state.fused
        codes = masked_gemv(x, stacked, zeros)  # [..., r_gate + r_up]: every input kept
        return _share(state, x, masked_gemv(codes, flat, thresholds, widths=widths, rows=ranks))
    codes = _codes(state, x)  # [..., r]
    if takes:  # its owner did not run on this input: its own columns of A alone
        return _finish(masked_gemv(codes, state.wt, state.threshold), state)
    return _share(state, x, masked_gemv(codes, state.wt, state.threshold))  # [..., sum of the members' widths]


def _codes(state: DecodeState, x: torch.Tensor) -> torch.Tensor:
    """A rank adapter's router codes `B x` in a decode step: [..., r]. The first layer of a router group launches the
    whole group's codes and leaves them (on `x`) for the others, which take their columns."""
    plan = state.plan
    group = plan[_ROUTER_GROUP]
    if group is None:
        return F.linear(x, state.router)
    if plan[_ROUTER_TAKES]:
        pending = _PENDING.pop(group, None)  # the group's last layer: nothing outlives the call
        if pending is not None and pending[0] is x:
            return pending[1][..., plan[_ROUTER_START] : plan[_ROUTER_END]]
        return F.linear(x, state.router)  # the first layer did not run on this input
    stacked, threshold = state.routers  # the group's first layer
    codes = masked_gemv(x, stacked, threshold)  # [..., sum r]: every input kept
    if stacked.shape[1] != plan[_ROUTER_END] - plan[_ROUTER_START]:
        _PENDING[group] = (x, codes)
    return codes[..., plan[_ROUTER_START] : plan[_ROUTER_END]]


def _stack_routers(group: list[RaNALinear], sharers: dict[int, list[DecodeState]], kernel_tokens: int) -> None:
    """Lay the routers `B` [r_i, n] of rank adapters that read the same input as one `B^T` [n, sum r_i] (each `B` a
    view of it, nothing stored twice): the first computes every layer's codes of a decode step in one launch.
    `sharers`: the states of every prepared layer by the id of the router they hold (an owner's members hold its
    router too, and take the view)."""
    states: list[DecodeState] = [layer._decode for layer in group]
    stacked = torch.cat([state.router.t() for state in states], dim=1).contiguous()  # [n, sum r]
    threshold = stacked.new_zeros(stacked.shape[0], dtype=torch.float32)
    group_id = next(_GROUP_IDS)
    start = 0
    for index, (layer, state) in enumerate(zip(group, states, strict=True)):
        end = start + state.router.shape[0]
        view = stacked[:, start:end].t()  # [r, n]
        layer.rana_hf_B[state.adapter] = nn.Parameter(view, requires_grad=False)  # the old copy is released
        for sharer in sharers.get(id(state.router), [state]):
            sharer.router = view
        state.router_group, state.router_takes, state.router_columns = group_id, index > 0, (start, end)
        state.routers = (stacked, threshold) if index == 0 else None
        start = end
    reserve_workspace(stacked, kernel_tokens)


def _fuse_rank_pair(pair: list[RaNALinear], kernel_tokens: int) -> None:
    """Lay the `A^T` [r_i, m_i] of two rank adapters of one router group without members (gate and up) one after the
    other in one flat tensor, and their thresholds in one [r_0 + r_1] (each layer's a view, nothing stored twice): the
    first computes both layers' masked reads of `A` in one launch of the kernel's row segments, on the router group's
    codes, and the second takes its columns."""
    states: list[DecodeState] = [layer._decode for layer in pair]
    if len({(state.wt.dtype, state.wt.device) for state in states}) != 1 or states[0].routers is None:
        return
    ranks = tuple(state.wt.shape[0] for state in states)
    widths = tuple(state.wt.shape[1] for state in states)
    flat = torch.cat([state.wt.reshape(-1) for state in states])
    thresholds = torch.cat([state.threshold for state in states])
    offset, first, start = 0, 0, 0
    for layer, state, rank, width in zip(pair, states, ranks, widths, strict=True):
        view = flat[offset : offset + rank * width].view(rank, width)
        layer.rana_hf_A[state.adapter] = nn.Parameter(view.t(), requires_grad=False)  # the old copy is released
        state.wt, state.threshold, state.columns = view, thresholds[first : first + rank], (start, start + width)
        offset, first, start = offset + rank * width, first + rank, start + width
    _join(states)
    states[0].fused = (flat, thresholds, widths, ranks)
    reserve_workspace(flat, kernel_tokens, widths, ranks)


def prefill_forward(layer: RaNALayer, x: torch.Tensor) -> torch.Tensor:
    """A prepared layer on a longer input (a prompt, a larger batch): x [..., n] -> [..., m], the same function as the
    reference forward (a compensated layer: its masked product, as an input adapter's).

    - An input adapter: one launch masks the input of every layer of its group (q/k/v or gate/up), then cuBLAS
      multiplies each (1 masking launch per group instead of 3 elementwise ones per layer).
    - A rank adapter: the router's codes `B x`, masked, then one product with the stacked `A^T` of the whole group
      (q, k and v behind one router: one GEMM instead of three), each member taking its columns; none of the
      reference forward's bookkeeping (adapter lookup, FLOP counting, the members' code cache) runs per layer.
    """
    state: DecodeState = layer._decode
    if state.plan[_TAKES] and (done := _take(state, x)) is not None:
        return done
    if isinstance(layer, RaNALinear):
        codes = _mask(F.linear(x, state.router), state.threshold)  # [..., r]
        if state.plan[_TAKES] or state.fused is not None:  # its own columns of A (a fused pair shares no product)
            return _finish(torch.matmul(codes, state.wt), state)
        return _share(state, x, torch.matmul(codes, state.wt))  # [..., sum of the members' widths]
    compiling = torch.compiler.is_compiling()
    if state.stacked is None:
        masked = _mask(x, state.threshold) if compiling else masked_inputs(x, state.threshold.reshape(1, -1))[0]
        return _finish(torch.matmul(masked, state.wt), state)
    wt, thresholds, widths = state.stacked
    if compiling:
        masked = [_mask(x, threshold) for threshold in thresholds]
    else:
        masked = masked_inputs(x, thresholds)  # [S, ..., n]: one launch
    outs, start = [], 0
    for s, width in enumerate(widths):
        outs.append(torch.matmul(masked[s], wt[:, start : start + width]))
        start += width
    return _share(state, x, tuple(outs))


def _mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """`x` with the inputs below `threshold` [n] zeroed, in x's shape: the compiled form of `masked_inputs`.

    A compiled step of more than `max_tokens` tokens masks with torch ops, which inductor fuses into the kernel that
    makes `x` (the norm, or act(gate) * up), where the opaque custom op costs a launch of its own. Each segment's mask
    has x's own shape: one [S, ..., n] tensor is a loop over other ranges than the norm's, and inductor then splits
    the norm into a reduction and a pointwise kernel (measured on an H200: 2 more kernels per decoder layer at batch
    4, 1.02x dense GPU time at 4 layers)."""
    return x * (x.float().abs() >= threshold.float()).to(x.dtype)  # = masked_inputs_reference(x, [threshold])[0]


def glu_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A gated MLP whose down projection computes `act(gate) * up` inside the kernel's load: x [..., d] -> [..., d]."""
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    down = mlp.down_proj
    state: DecodeState | None = down._decode
    if (
        state is not None
        and (act := state.plan[_ACTIVATION]) is not None
        and state.runs(down, up)
        and state.decodes(up)
    ):
        return _finish(masked_gemv(up, state.wt, state.threshold, gate, act), state)
    return down(mlp.act_fn(gate) * up)


_FUSED_MLP_CLASSES: dict[type, type] = {}


def _fuse_glu(mlp: nn.Module) -> None:
    """Make `mlp` (in place) an instance of a subclass of its class whose forward is `glu_mlp_forward`: a method of
    the class, not a function bound on the instance, which `torch.compile` would guard as an alias of the module."""
    cls = type(mlp)
    if cls not in _FUSED_MLP_CLASSES.values():
        if cls not in _FUSED_MLP_CLASSES:
            _FUSED_MLP_CLASSES[cls] = type(f"RaNAFused{cls.__name__}", (cls,), {"forward": glu_mlp_forward})
        mlp.__class__ = _FUSED_MLP_CLASSES[cls]


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # linears a module calls on the same input


def _stackable(state: DecodeState | None) -> bool:
    return state is not None and state.group is None


def _unrouted(layer: nn.Module | None) -> bool:
    """A prepared rank adapter with a router of its own (not a member) whose codes no router group computes yet."""
    return (
        isinstance(layer, RaNALinear)
        and layer.role != MEMBER
        and layer._decode is not None
        and layer._decode.router_group is None
    )


def _sibling_groups(model: nn.Module, accept: Callable[[nn.Module | None], bool]) -> Iterator[list[nn.Module]]:
    """Per module and per `SIBLINGS` set: the siblings that `accept` takes, when there are any and they share their
    input width, dtype and device (one launch can serve them). Lazy: a group stacked before the next is looked at
    is seen stacked."""
    for module in model.modules():
        for names in SIBLINGS:
            group = [m for m in (getattr(module, name, None) for name in names) if accept(m)]
            if group and len({(m.in_features, m._decode.wt.dtype, m._decode.wt.device) for m in group}) == 1:
                yield group


def _stack_inputs(group: list[RaNANeuronLinear | RaNACompensatedLinear], kernel_tokens: int) -> None:
    """Lay the `W^T` of input adapters that read the same input side by side (one [K, sum N] tensor, each weight a
    view of it, nothing stored twice): the first computes all of them in one launch, the others take their columns."""
    states: list[DecodeState] = [layer._decode for layer in group]
    stacked = torch.cat([state.wt for state in states], dim=1).contiguous()
    thresholds = torch.stack([state.threshold for state in states]).contiguous()  # [S, K]
    widths = tuple(state.wt.shape[1] for state in states)
    start = 0
    for index, (layer, state) in enumerate(zip(group, states, strict=True)):
        end = start + widths[index]
        view = stacked[:, start:end]
        layer.base_layer.weight = nn.Parameter(view.t(), requires_grad=False)  # a view: the old copy is released
        state.wt, state.threshold, state.columns = view, thresholds[index], (start, end)
        start = end
    _join(states)
    states[0].stacked = (stacked, thresholds, widths)
    reserve_workspace(stacked, kernel_tokens, widths)


@torch.no_grad()
def prepare_for_decode(
    model: nn.Module, kernel_tokens: int = DECODE_KERNEL_TOKENS, dense_prefill: bool = False
) -> dict[str, int]:
    """Re-lay the RaNA layers of `model` for the decode kernels and free the dense weights they replace (in place).

    Args:
        model: a model with a RaNA adapter (`compress` output or a loaded checkpoint), on its final device and dtype.
        kernel_tokens: steps of at most this many tokens (batch x new tokens) take the kernel, larger ones the torch
            path; at most `MAX_KERNEL_TOKENS`.
        dense_prefill: input adapters (neuron/magnitude, the default `teal`) run longer inputs (the prompt, larger
            batches) with their dense weight, at dense speed, and mask only decode steps. This changes the model's
            function: the prompt is processed by the dense model (rank adapters, whose dense weights are freed, keep
            the adapted path). Off by default.

    Returns:
        `{"layers": prepared layers, "freed_bytes": bytes of dense weights released}`.
    """
    if not 0 <= kernel_tokens <= MAX_KERNEL_TOKENS:
        raise ValueError(f"kernel_tokens must be in [0, {MAX_KERNEL_TOKENS}] (the kernel's limit): {kernel_tokens}")
    layers = [m for m in model.modules() if isinstance(m, RaNALayer)]
    if not layers:
        raise ValueError("this model has no RaNA layers; nothing to prepare")
    rotation.prepare(model)  # a rotated stream's weights in their basis before they are laid out for the kernels
    prepared, freed = 0, 0
    for layer in layers:
        if isinstance(layer._active_adapter, list):
            # PEFT hands every layer one shared list: `torch.compile` would guard each alias of it on every call. One
            # name is kept as a string (PEFT's own default form), which is one guard where a list is three.
            names = layer._active_adapter
            layer._active_adapter = names[0] if len(names) == 1 else list(names)
        if not isinstance(layer, (RaNALinear, *_MASKED)) or layer._decode is not None:
            continue  # layers without a kernel layout (CATS gates, ...) keep the reference path; prepared ones stay
        adapter_name = layer._active()
        if adapter_name is None:
            raise ValueError(f"{layer.module_name!r} has no active RaNA adapter; activate one before preparing")
        if layer.top_k is not None:
            continue  # budget_mode="topk": exact per-token counts, reference path
        if isinstance(layer, RaNALinear) and layer.role == MEMBER:
            continue  # prepared with its owner
        layer.check_filled(adapter_name)
        if isinstance(layer, _MASKED):
            weight = layer.base_layer.weight
            wt = weight.detach().t().contiguous()  # [n, m]
            layer.base_layer.weight = nn.Parameter(wt.t(), requires_grad=False)  # a view: no second copy
            threshold = layer.rana_hf_threshold[adapter_name].float().expand(layer.in_features).contiguous()
            bias = module_weight(layer.base_layer, "bias")
            state = DecodeState(
                wt,
                threshold,
                bias=bias,
                columns=(0, wt.shape[1]),
                max_tokens=kernel_tokens,
                dense_prefill=dense_prefill,
                adapter=adapter_name,
            )
            if isinstance(layer, RaNACompensatedLinear):  # its term in the weights' dtype, as the kernels take
                down = layer.rana_hf_B[adapter_name].detach().to(weight.dtype)
                up = layer.rana_hf_A[adapter_name].detach().to(weight.dtype)
                layer.rana_hf_B[adapter_name] = nn.Parameter(down, requires_grad=False)
                layer.rana_hf_A[adapter_name] = nn.Parameter(up, requires_grad=False)
                state.compensation = (down, up)
            layer._decode = state
            reserve_workspace(wt, kernel_tokens)
            prepared += 1
            continue
        group = [(layer, adapter_name)]
        if layer.role == OWNER:
            group += [
                (member, adapter_name)
                for member in layers
                if isinstance(member, RaNALinear) and member.role == MEMBER and member._owner[:1] == [layer]
            ]
        # the kernels take the model's dtype: adapters kept in float32 by whoever built them are cast once here
        dtype = layer.base_layer.weight.dtype
        ups = [member.rana_hf_A[name] for member, name in group]  # [m_i, r]
        wt = torch.cat([up.detach().t().to(dtype) for up in ups], dim=1).contiguous()  # [r, sum m_i]
        router = layer.rana_hf_B[adapter_name].detach().to(dtype)
        layer.rana_hf_B[adapter_name] = nn.Parameter(router, requires_grad=False)
        threshold = layer.rana_hf_threshold[adapter_name].float().expand(router.shape[0]).contiguous()
        start = 0
        states = []
        for member, name in group:
            width = member.out_features
            own = wt[:, start : start + width]
            member.rana_hf_A[name] = nn.Parameter(own.t(), requires_grad=False)
            bias = module_weight(member.base_layer, "bias")
            # the owner holds the group's whole `A^T` (its launch computes every member), a member its own columns
            state = DecodeState(
                wt if member is layer else own,
                threshold,
                router,
                bias,
                (start, start + width),
                max_tokens=kernel_tokens,
                adapter=adapter_name,
            )
            reserve_workspace(own, kernel_tokens)  # a member alone (its owner saw other x)
            states.append((member, state))
            freed += member.base_layer.weight.numel() * member.base_layer.weight.element_size()
            member.base_layer.weight = nn.Parameter(member.base_layer.weight.new_empty(0), requires_grad=False)
            member._dense_freed = True
            start += width
        reserve_workspace(wt, kernel_tokens)
        if len(states) > 1:
            _join([state for _, state in states])
        for member, state in states:
            member._decode = state
        prepared += len(group)
    # input adapters of one input: one launch for all of them
    for group in _sibling_groups(model, lambda m: isinstance(m, _MASKED) and _stackable(m._decode)):
        if len(group) > 1:
            _stack_inputs(group, kernel_tokens)
    if ROUTER_KERNEL:  # rank adapters of one input: one launch for their routers' codes
        sharers: dict[int, list[DecodeState]] = {}
        for layer in layers:
            if isinstance(layer, RaNALinear) and layer._decode is not None:
                sharers.setdefault(id(layer._decode.router), []).append(layer._decode)
        for group in _sibling_groups(model, _unrouted):
            _stack_routers(group, sharers, kernel_tokens)
            if FUSED_RANK_LAUNCH and len(group) == 2 and all(layer._decode.group is None for layer in group):
                _fuse_rank_pair(group, kernel_tokens)
        for layer in layers:  # a router alone on its input (o_proj): the kernel too, one launch instead of two
            if _unrouted(layer):
                _stack_routers([layer], sharers, kernel_tokens)
    for module in model.modules():
        down = getattr(module, "down_proj", None)
        state = getattr(down, "_decode", None)
        activation = getattr(module, "act_fn", None)
        code = activation_code(activation) if activation is not None else None
        if isinstance(down, RaNANeuronLinear) and state is not None and code not in (None, ACT_NONE):
            if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
                state.activation = code
                _fuse_glu(module)
    return {"layers": prepared, "freed_bytes": freed}


def set_dense_prefill(model: nn.Module, enabled: bool) -> int:
    """Switch `dense_prefill` (see `prepare_for_decode`) on or off for a prepared model; returns the layers it applies
    to (its input adapters)."""
    states = [m._decode for m in model.modules() if isinstance(m, RaNANeuronLinear) and m._decode is not None]
    for state in states:
        state.dense_prefill = enabled
    return len(states)


def decode_guard_filter(entries: list) -> list[bool]:
    """A `guard_filter_fn` for `torch.compile` (`options={"guard_filter_fn": decode_guard_filter}`): every guard is
    kept except those on what a prepared layer's `DecodeState` holds (its tensors and their tuples), which the guard on
    its `plan` already covers (a plan's serial number changes with any of its fields, and no two states share one).

    A compiled step checks its guards on the host before each call: a match of each tensor's metadata and five more
    checks; a Llama layer of rank adapters reads ten such tensors (`rana-hf bench --host-overhead` measures the host's
    time per step, docs/benchmarks.md). What the filter leaves out could only change if a state's tensors were changed
    in place (`resize_`, `set_`), which nothing here does; assigning a field makes a new plan."""
    return [not _held_by_state(entry.name) for entry in entries]


def decode_compile_options(cuda_graphs: bool = True) -> dict:
    """`torch.compile` keyword arguments for a prepared model's decode step: `fullgraph=True`, CUDA graphs (the
    option `mode="reduce-overhead"` sets; `torch.compile` takes a mode or options, not both) and
    `decode_guard_filter`. A new dict each call (`torch.compile` takes the filter out of the one it is given)."""
    options: dict = {"guard_filter_fn": decode_guard_filter}
    if cuda_graphs:
        options["triton.cudagraphs"] = True
    return {"fullgraph": True, "options": options}


def compile_config():
    """The `transformers.CompileConfig` for `model.generate` on a prepared model: its compiled decode step with
    `decode_compile_options()` (CUDA graphs, `decode_guard_filter`), where transformers' default guards every tensor
    the adapters hold on each step, on the host, while `generate` waits:

        model.generate(input_ids, cache_implementation="static", compile_config=rana_hf.inference.compile_config())
    """
    from transformers import CompileConfig

    return CompileConfig(mode=None, **decode_compile_options())


def _held_by_state(source: str) -> bool:
    """A guard's source below a prepared layer's `_decode` other than its plan (or a part of the plan)."""
    _, _, tail = source.partition("._decode.")
    return bool(tail) and not tail.startswith("plan")


def greedy_step(model: nn.Module, cache):
    """One greedy decode step over a static KV cache: (tokens [B, T], positions [T]) -> next tokens [B, 1]."""
    cache_kwargs = {_cache_argument(model): cache}

    def forward(tokens, position):
        # positions as tensors: a model that derives them from the cache's length (Gemma 3 in transformers 5.17, every
        # model from 5.2x) reads a Python int, which `torch.compile` guards on, recompiling the step at each position
        position_ids = position[None].expand(tokens.shape[0], -1)
        logits = model(
            input_ids=tokens, position_ids=position_ids, cache_position=position, use_cache=True, **cache_kwargs
        ).logits
        return logits[:, -1:].argmax(-1)

    return forward


def _cache_argument(model: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x (where `past_key_values` is deprecated, to
    be removed in 5.40), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    compile: bool | None = None,
    compile_options: dict | None = None,
    check_every: int = 16,
) -> torch.Tensor:
    """Greedy decoding that does not wait on the host between steps: a static KV cache and a compiled decode step
    (on CUDA with CUDA graphs, `mode="reduce-overhead"`), the next token chosen and fed back on the device. The host
    looks for the end of every row only each `check_every` steps. `model.generate` synchronises after every step, so
    its host time adds to each step.

    The same tokens as `model.generate(input_ids, do_sample=False, max_new_tokens=..., cache_implementation="static")`
    for prompts of one length without padding, when the model's generation config adds no logits processors
    (repetition penalties, forced or suppressed tokens). A row that has produced an end token continues with
    `pad_token_id`, and decoding stops at the step where every row has ended.

    Args:
        model: a causal LM (dense, adapted, or prepared with `prepare_for_decode`), in eval mode.
        input_ids: [batch, prompt] token ids, every row a full prompt (no padding).
        max_new_tokens: at most this many tokens per row.
        eos_token_id, pad_token_id: default to the model's generation config (pad to the first end token).
        compile: compile the decode step; default: when the input is on CUDA. The cache and step are kept on the
            model for the next call with the same batch size and settings and at most the same prompt + new tokens
            (a longer request makes a longer cache). Each new cache compiles the step again, and `torch.compile`'s
            recompile limit (8 by default) then applies.
        compile_options: `torch.compile` arguments; default `decode_compile_options()` (`fullgraph=True`, CUDA
            graphs, `decode_guard_filter`).
        check_every: steps between the host's checks for the end of every row.

    Returns:
        [batch, prompt + generated] token ids.
    """
    from transformers import StaticCache

    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt], a non-empty prompt; got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1 or check_every < 1:
        raise ValueError(f"max_new_tokens and check_every must be positive, got {max_new_tokens} and {check_every}")
    config = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else None)
    device = input_ids.device
    batch, prompt = input_ids.shape
    length = prompt + max_new_tokens
    dtype = next(model.parameters()).dtype
    compile = device.type == "cuda" if compile is None else compile
    key = (batch, dtype, device, compile, repr(compile_options))
    # (key, cache length, cache, eager forward, compiled step) on the model itself: the step refers to the model, so
    # a cache outside it (even a weak-keyed one) would keep the model alive
    entry = getattr(model, "_rana_greedy", None)
    if entry is not None and entry[0] == key and entry[1] >= length:  # a long enough cache: same graphs, no recompile
        _, length, cache, forward, step = entry
        cache.reset()
    else:  # one cache and one compiled step per model, reused while the batch and settings stay the same
        cache = StaticCache(config=model.config, max_cache_len=length)
        forward = greedy_step(model, cache)
        options = dict(compile_options) if compile_options is not None else decode_compile_options()
        step = torch.compile(forward, **options) if compile else forward
        model._rana_greedy = (key, length, cache, forward, step)
    positions = torch.arange(length, device=device)
    out = torch.empty((batch, length), dtype=input_ids.dtype, device=device)
    out[:, :prompt] = input_ids
    ends = torch.tensor(eos, device=device) if eos else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    token = forward(input_ids, positions[:prompt])  # the prompt, eagerly (the compiled step takes one token per row)
    generated = 0
    for i in range(max_new_tokens):
        if ends is not None:
            token = torch.where(finished[:, None], torch.full_like(token, pad), token)
            finished |= torch.isin(token[:, 0], ends)
        out[:, prompt + i] = token[:, 0]
        generated = i + 1
        checked = ends is not None and generated % check_every == 0
        if generated == max_new_tokens or (checked and bool(finished.all())):
            break
        token = step(token, positions[prompt + i : prompt + i + 1]).clone()  # CUDA graphs reuse their output
    if ends is not None and bool(finished.all()):  # stop where the last row ended, as `generate` does
        is_end = torch.isin(out[:, prompt : prompt + generated], ends)
        generated = int(is_end.float().argmax(dim=1).max()) + 1
    return out[:, : prompt + generated]

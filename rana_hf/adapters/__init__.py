"""Adapter kinds, the plan entries they write, and the methods built from them: the registry.

Each kind lives in its own module (`dense`, `rank`, `svd`, `neuron`, `magnitude`, `compensated`, `rotated`, `cats`,
`paper_mlp`, `split`) and exports
`KIND` (an `AdapterKind`: the statistics it needs, its options for a budget, how it materialises) and, when it
brings a layer of its own, `ENTRIES` (its `EntryKind`s: how a plan entry is checked and built). Adding a kind is one
new module plus its line in `_MODULES` below (and a `Method` if users should be able to ask for it by name); nothing
else in the package branches on kinds.

A *method* (`RaNAConfig.method`) says which kinds each role of a decoder block may take; the allocator chooses among
them from their measured error-vs-FLOPs curves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import cats, compensated, dense, magnitude, neuron, paper_mlp, rank, rotated, split, svd
from .base import DENSE, AdapterKind, EntryKind, Option, PlanContext, Unit, dense_macs
from .cats import RaNAGatedLinear
from .compensated import RaNACompensatedLinear
from .neuron import RaNANeuronLinear
from .rank import MEMBER, OWN, OWNER, RaNALinear

_MODULES = (dense, rank, svd, neuron, magnitude, compensated, rotated, cats, paper_mlp, split)
SPLIT = split.NAME

KINDS: dict[str, AdapterKind] = {module.KIND.name: module.KIND for module in _MODULES}
ENTRIES: dict[str, EntryKind] = {e.name: e for module in _MODULES for e in getattr(module, "ENTRIES", ())}


@dataclass(frozen=True)
class Method:
    """The adapter kinds a method offers each role of a decoder block (candidates, in order of preference on ties).

    Attributes:
        name: `RaNAConfig.method`.
        linear: an attention projection or any other single linear (q/k/v too, unless planned as one unit).
        mlp_in: gate and up of a gated MLP, each its own unit.
        mlp_down: down of a gated MLP (its own unit), or a down projection whose gate/up are not targeted.
        joint_qkv: q, k and v that read one input form one unit (one router, with `fuse_qkv`); else one unit each.
        joint_mlp_in: gate and up form one unit (one router); else one unit each.
        per_linear: kinds each linear of a joint unit (q/k/v, gate/up) may also take on its own, the unit's budget
            split between its linears (`adapters.split`); a linear planned alone takes them too. Empty: none.
        whole_mlp: allocation -> a kind that plans a gated MLP (gate, up, down all targeted) as one unit.
        trials: kinds planned alone and checked end to end to scale their estimated losses (`auto`); empty: none.
    """

    name: str
    linear: tuple[str, ...]
    mlp_in: tuple[str, ...]
    mlp_down: tuple[str, ...]
    joint_qkv: bool = True
    joint_mlp_in: bool = False
    per_linear: tuple[str, ...] = ()
    whole_mlp: dict[str, str] = field(default_factory=dict)
    trials: tuple[str, ...] = ()

    def kinds(self) -> set[str]:
        split_kinds = {SPLIT, *self.per_linear} if self.per_linear else set()
        return {*self.linear, *self.mlp_in, *self.mlp_down, *self.whole_mlp.values(), *self.trials, *split_kinds}


_PER_LINEAR = ("neuron", "magnitude", "rank", "compensated")
METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        # the paper: rank adapters (q/k/v behind one router), a neuron adapter on down, the MLP split grid-searched
        Method("rana", ("rank",), ("rank",), ("neuron",), whole_mlp={"uniform": "mlp"}),
        # CATS-style: MLP only, a mask on |act(gate x)|; attention stays dense
        Method("cats", (DENSE,), (DENSE,), (DENSE,), whole_mlp={"uniform": "cats", "global": "cats"}),
        # TEAL-style: a magnitude mask on the input of every targeted linear (the default)
        Method("teal", ("magnitude",), ("magnitude",), ("magnitude",), joint_qkv=False),
        # TEAL-style masks plus a data-aware low-rank term for the dropped inputs, its rank chosen per budget
        Method("compensated", ("compensated",), ("compensated",), ("compensated",), joint_qkv=False),
        # magnitude masks in the principal axes of each input (q/k/v, gate/up: one rotation each) or plain ones, the
        # estimated losses of both scaled by end-to-end trials (the diagonal error model flatters the rotation)
        Method(
            "rotated",
            ("rotated",),
            ("rotated",),
            ("magnitude",),
            joint_qkv=True,
            joint_mlp_in=True,
            per_linear=("magnitude",),
            trials=("magnitude", "rotated"),
        ),
        # static SVD: the data-aware basis at a fixed rank, no mask
        Method("svd", ("svd",), ("svd",), ("svd",)),
        # per unit the best of every kind, with measured end-to-end scales per kind: q/k/v and gate/up each behind
        # one rank router or one rotation, or each linear on its own with any kind that plans one linear
        Method(
            "auto",
            ("rank", "rotated"),
            ("rank", "rotated"),
            _PER_LINEAR,
            joint_qkv=True,
            joint_mlp_in=True,
            per_linear=_PER_LINEAR,
            trials=("magnitude", "neuron", "rank", "compensated", "rotated"),
        ),
    )
}

_unknown = sorted(kind for method in METHODS.values() for kind in method.kinds() if kind not in KINDS)
if _unknown:  # a registry error, caught at import
    raise ImportError(f"rana_hf.adapters: methods name unregistered adapter kinds {_unknown}")

__all__ = [
    "DENSE",
    "ENTRIES",
    "KINDS",
    "MEMBER",
    "METHODS",
    "OWN",
    "OWNER",
    "AdapterKind",
    "EntryKind",
    "Method",
    "Option",
    "PlanContext",
    "RaNACompensatedLinear",
    "RaNAGatedLinear",
    "RaNALinear",
    "RaNANeuronLinear",
    "SPLIT",
    "Unit",
    "dense_macs",
]

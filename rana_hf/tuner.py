"""PEFT tuner of RaNA adapters: places the layers that a calibrated plan asks for, checks shapes, unloads."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import DEFAULT_TARGET_MODULES, RaNAConfig
from .layers import MEMBER, OWN, OWNER, RaNAGatedLinear, RaNALayer, RaNALinear, RaNANeuronLinear

# Plan entry kinds: rank adapter, neuron (input-mask) adapter, kept dense, CATS-style gate, and a follower of a gate
# (up/down of a CATS MLP: not replaced, its kept work is counted by the gate).
RANK, NEURON, DENSE, GATED, FOLLOWER = "rank", "neuron", "dense", "gated", "follower"
KINDS = (RANK, NEURON, DENSE, GATED, FOLLOWER)
NOT_INJECTED = (DENSE, FOLLOWER)


def check_plan(plan: dict) -> None:
    """Validate a plan's structure (as read from JSON) before any module is touched."""
    if not isinstance(plan, dict) or not plan:
        raise ValueError("RaNAConfig.plan is empty: build the adapter with `rana_hf.compress(model, config, ...)`")
    for name, entry in plan.items():
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ValueError(
                f"plan entry {name!r} has unknown kind {kind!r}; expected one of {KINDS}. If a newer "
                "rana_hf wrote it, upgrade rana_hf."
            )
        for key in ("in_features", "out_features"):
            if not isinstance(entry.get(key), int):
                raise ValueError(f"plan entry {name!r} lacks integer {key!r}")
        if kind == RANK:
            if entry.get("role") not in (OWN, OWNER, MEMBER):
                raise ValueError(f"plan entry {name!r} has unknown role {entry.get('role')!r}")
            if not isinstance(entry.get("rank"), int) or entry["rank"] < 0:
                raise ValueError(f"plan entry {name!r} needs a rank >= 0")
            if entry["role"] == MEMBER and plan.get(entry.get("owner"), {}).get("role") != OWNER:
                raise ValueError(f"plan entry {name!r} names owner {entry.get('owner')!r}, which is not an owner")
        if kind == NEURON and entry.get("importance", "weighted") not in ("weighted", "magnitude"):
            raise ValueError(f"plan entry {name!r} has unknown importance {entry.get('importance')!r}")
        if kind == GATED:
            followers = entry.get("followers")
            if not isinstance(followers, list) or any(plan.get(f, {}).get("kind") != FOLLOWER for f in followers):
                raise ValueError(f"plan entry {name!r} (gated) needs followers that are follower entries")
        if kind == FOLLOWER and plan.get(entry.get("leader"), {}).get("kind") != GATED:
            raise ValueError(f"plan entry {name!r} names leader {entry.get('leader')!r}, which is not a gated entry")


def _top_k(entry: dict) -> int:
    """Per-token kept count of a plan entry for `budget_mode="topk"` (its planned mean, rounded)."""
    if entry["kind"] == RANK:
        return max(1, round(entry["mean_kept"]))
    width = entry["out_features"] if entry["kind"] == GATED else entry["in_features"]
    return max(1, round(entry["keep_fraction"] * width))


def build_layer(
    plan: dict, name: str, target: nn.Linear, parent: nn.Module, adapter_name: str, budget_mode: str
) -> RaNALayer:
    """The RaNA layer that plan entry `name` (rank, neuron or gated) puts in place of the linear `target`.

    Shared by the PEFT tuner and the standalone loader (`integrations.standalone`); members are attached to their
    owner by the caller, once every layer exists.
    """
    entry = plan[name]
    if entry["kind"] == NEURON:
        layer = RaNANeuronLinear(target, adapter_name)
    elif entry["kind"] == GATED:
        followers = []
        for follower in entry["followers"]:
            spec = plan[follower]
            dense = spec["in_features"] * spec["out_features"]
            per_kept = spec["in_features"] if spec.get("axis", "out") == "out" else spec["out_features"]
            followers.append((follower, dense, per_kept))
        layer = RaNAGatedLinear(target, adapter_name, getattr(parent, "act_fn", None), followers)
    elif entry["kind"] == RANK:
        layer = RaNALinear(target, adapter_name, rank=entry["rank"], role=entry["role"])
    else:
        raise ValueError(f"plan entry {name!r} of kind {entry['kind']!r} is not a RaNA layer")
    layer.module_name = name
    if budget_mode == "topk" and entry.get("role") != MEMBER:
        layer.top_k = _top_k(entry)
    return layer


class RaNAModel(BaseTuner):
    """Replaces the linears named in `RaNAConfig.plan` with RaNA layers.

    The plan comes from calibration (`rana_hf.compress`) or from a saved adapter config; `get_peft_model` with a config
    that has no plan is refused, since an uncalibrated RaNA adapter has nothing to compute.
    """

    prefix: str = "rana_hf_"
    tuner_layer_cls = RaNALayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _check_new_adapter_config(self, config: RaNAConfig) -> None:
        super()._check_new_adapter_config(config)
        if len(self.peft_config) > 1:
            raise ValueError(
                "A model holds one RaNA adapter at a time (RaNA replaces the computation of the linears it adapts). "
                "Unload the current one first (`model.unload()`)."
            )

    def _pre_injection_hook(self, model: nn.Module, config: RaNAConfig, adapter_name: str) -> None:
        if config.plan is None:
            raise ValueError(
                "This RaNAConfig has not been calibrated (plan is None). Use `rana_hf.compress(model, config, "
                "calibration=..., tokenizer=...)` instead of `get_peft_model`."
            )
        check_plan(config.plan)
        modules = dict(model.named_modules())
        for name, entry in config.plan.items():
            if entry["kind"] in NOT_INJECTED:
                continue
            module = modules.get(name)
            if module is None:
                raise ValueError(
                    f"The RaNA adapter needs module {name!r}, which this base model does not have: the adapter was "
                    "made for another architecture. Load it onto the base model it was calibrated on."
                )
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
            if not isinstance(module, nn.Linear):
                raise ValueError(f"RaNA adapts nn.Linear modules; {name!r} is a {type(module).__name__}")
            shape = (module.out_features, module.in_features)
            expected = (entry["out_features"], entry["in_features"])
            if shape != expected:
                raise ValueError(
                    f"The RaNA adapter was calibrated for {name!r} of shape {expected} (out, in), but this base "
                    f"model's module has shape {shape}. Load the adapter onto the base model it was made for."
                )

    def _create_and_replace(
        self,
        peft_config: RaNAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        entry = peft_config.plan.get(current_key)
        if entry is None or entry["kind"] in NOT_INJECTED:  # matched by name but kept as it is by the plan
            return
        if isinstance(target, RaNALayer):
            raise ValueError(f"{current_key!r} already carries a RaNA adapter; unload it first")
        new_module = build_layer(peft_config.plan, current_key, target, parent, adapter_name, peft_config.budget_mode)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if child.weight.device.type == "meta":
            # Offloaded by accelerate: the weight is a placeholder that its hook fills per call. PEFT would move our
            # tensors to `meta` too (losing them); they stay on the layer's execution device, where they were made.
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _post_injection_hook(self, model: nn.Module, config: RaNAConfig, adapter_name: str) -> None:
        modules = dict(model.named_modules())
        for name, entry in config.plan.items():
            if entry["kind"] == RANK and entry["role"] == MEMBER:
                modules[name].attach_owner(modules[entry["owner"]])

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError(
            "RaNA adapters cannot be merged into dense weights: the mask depends on each input. "
            "Use `model.unload()` to get the original model back."
        )

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self.merge_and_unload()
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

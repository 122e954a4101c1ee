"""PEFT tuner of RaNA adapters: places the layers that a calibrated plan asks for, checks shapes, unloads."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .adapters import ENTRIES
from .config import DEFAULT_TARGET_MODULES, RaNAConfig
from .layers import RaNALayer


def check_plan(plan: dict) -> None:
    """Validate a plan's structure (as read from JSON) before any module is touched."""
    if not isinstance(plan, dict) or not plan:
        raise ValueError("RaNAConfig.plan is empty: build the adapter with `rana_hf.compress(model, config, ...)`")
    for name, entry in plan.items():
        kind = entry.get("kind")
        if kind not in ENTRIES:
            raise ValueError(
                f"plan entry {name!r} has unknown kind {kind!r}; expected one of {tuple(ENTRIES)}. If a newer "
                "rana_hf wrote it, upgrade rana_hf."
            )
        for key in ("in_features", "out_features"):
            if not isinstance(entry.get(key), int):
                raise ValueError(f"plan entry {name!r} lacks integer {key!r}")
        ENTRIES[kind].check(name, entry, plan)


def injected(entry: dict) -> bool:
    """Whether a plan entry puts a RaNA layer in place of its linear."""
    return ENTRIES[entry["kind"]].injected


def build_layer(
    plan: dict, name: str, target: nn.Linear, parent: nn.Module, adapter_name: str, budget_mode: str
) -> RaNALayer:
    """The RaNA layer that plan entry `name` puts in place of the linear `target`.

    Shared by the PEFT tuner and the standalone loader (`integrations.standalone`); call `link_layers` once every layer
    exists.
    """
    entry = plan[name]
    layer = ENTRIES[entry["kind"]].build(plan, name, target, parent, adapter_name)
    layer.module_name = name
    if budget_mode == "topk":
        layer.top_k = ENTRIES[entry["kind"]].top_k(entry)
    return layer


def link_layers(plan: dict, layers: dict[str, RaNALayer]) -> None:
    """Connect the layers of a plan that work together (a shared router's members to its owner)."""
    for name, entry in plan.items():
        if injected(entry):
            ENTRIES[entry["kind"]].link(name, entry, layers)


def rana_config(model: nn.Module) -> RaNAConfig:
    """The `RaNAConfig` (with its plan) of a model carrying RaNA layers: a `PeftModel`, a model under a LoRA adapter
    (`training.add_lora`) or a model loaded from a standalone checkpoint."""
    configs = getattr(model, "peft_config", None) or {}
    for config in configs.values():
        if isinstance(config, RaNAConfig):
            return config
    stacked = getattr(model, "rana_hf_config", None)  # under a LoRA adapter (training.add_lora)
    if isinstance(stacked, RaNAConfig):
        return stacked
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if hasattr(quantization, "to_rana_config"):  # loaded from a standalone checkpoint (integrations.standalone)
        return quantization.to_rana_config()
    raise ValueError("this model has no RaNA adapter (no RaNAConfig in model.peft_config)")


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
            if not injected(entry):
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
        if entry is None or not injected(entry):  # matched by name but kept as it is by the plan
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
        link_layers(config.plan, {name: modules[name] for name, entry in config.plan.items() if injected(entry)})

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Keep the adapter's tensors in the dtype of the weights they replace.

        PEFT upcasts float16/bfloat16 adapter weights to float32 by default (`autocast_adapter_dtype=True`), which
        suits an adapter added beside the weight (LoRA). A RaNA adapter replaces the weight's computation: in float32
        its `A` and `B` would take twice the memory, run the reference path instead of the decode kernels (which take
        the model's dtype), and give other numbers than the same adapter loaded through `AutoModelForCausalLM`. The
        thresholds are float32 whatever the model's dtype."""

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

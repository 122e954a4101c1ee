"""PEFT tuner of RaNA adapters: places the layers that a calibrated plan asks for, checks shapes, unloads."""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from . import rotation
from .adapters import ENTRIES
from .config import DEFAULT_TARGET_MODULES, RaNAConfig
from .layers import RaNALayer
from .offload import module_weight


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


FINGERPRINT_LAYERS = 16  # targeted linears sampled, spread over the model
FINGERPRINT_VALUES = 8  # weight values sampled per linear


def base_fingerprint(model: nn.Module, names: list[str]) -> dict[str, list[float]]:
    """A few weight values of up to `FINGERPRINT_LAYERS` of the linears `names`, evenly strided through each weight:
    enough to tell one base model from another of the same shapes, small enough for the adapter config."""
    modules = dict(model.named_modules())
    step = max(1, len(names) / FINGERPRINT_LAYERS)
    chosen = sorted({names[int(i * step)] for i in range(min(len(names), FINGERPRINT_LAYERS))})
    out = {}
    for name in chosen:
        module = modules[name]
        weight = module_weight(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module)
        if weight is None or weight.numel() == 0 or weight.device.type == "meta":
            continue
        flat = weight.detach().reshape(-1)
        stride = max(1, flat.numel() // FINGERPRINT_VALUES)
        out[name] = [float(v) for v in flat[::stride][:FINGERPRINT_VALUES].double().cpu()]
    return out


def check_base_fingerprint(model: nn.Module, expected: dict[str, list[float]]) -> None:
    """Refuse a base model whose sampled weights differ from the ones the adapter was calibrated on. Values agree
    within 1% (the base loaded in another dtype, e.g. bfloat16 for a float32 calibration); a different model of the
    same shapes, fine-tunes of the same base included, disagrees in most of them."""
    found = base_fingerprint(model, list(expected))
    pairs = [(a, b) for name, values in expected.items() for a, b in zip(values, found.get(name, []), strict=False)]
    if not pairs:
        return
    close = sum(abs(a - b) <= 1e-2 * abs(a) + 1e-6 for a, b in pairs)
    if close < 0.9 * len(pairs):
        raise ValueError(
            f"This RaNA adapter was calibrated on another base model: {len(pairs) - close} of {len(pairs)} sampled "
            "weights of its targeted linears differ from this model's. Load it onto the base named in its "
            "adapter_config.json (`base_model_name_or_path`). To load it onto this model anyway, clear the check: "
            "`config = RaNAConfig.from_pretrained(folder); config.base_fingerprint = None; "
            "PeftModel.from_pretrained(model, folder, config=config)`."
        )


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
        config.validate()
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
        turns = rotation.modules_of(model)
        if config.residual_rotation is not None and not turns:
            rotation.decoder_parts(model)  # refused before anything changes
        if config.base_fingerprint and not turns:  # the shapes fit: are these the same weights?
            check_base_fingerprint(model, config.base_fingerprint)  # (a rotated model is the one compress rotated)
        if turns and config.residual_rotation is None:
            raise ValueError("this model's residual stream is rotated by another RaNA adapter; unload it first")
        if config.residual_rotation is not None and not turns:
            # Loading an adapter: its bases arrive with its weights, which rotate the base weights (`fold_on_load`).
            for turn in rotation.install(model, config.residual_rotation, adapter_name):
                turn.fold_on_load = True
                turn.owned_by_adapter = True

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

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's loaders (`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`, `load_adapter`) hand the
        `PeftModel` to the tuner only here: give it the `push_to_hub` that uploads the RaNA model card, as `compress`
        does. The state dict is PEFT's to remap, but for the bases of a rotated residual stream (`rotation`), which
        PEFT does not know as adapter tensors: they get the adapter's name back."""
        if isinstance(model, PeftModel):
            from .hub import use_rana_push_to_hub  # hub imports this module

            use_rana_push_to_hub(model)
        turns = {key: value for key, value in state_dict.items() if rotation.is_basis_key(key)}
        remapped = super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, {key: value for key, value in state_dict.items() if key not in turns}
        )
        return remapped | {f"{key}.{adapter_name}": value for key, value in turns.items()}

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
        model = super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if any(turn.owned_by_adapter for turn in rotation.modules_of(model)):
            rotation.remove(model)  # the original weights back, exactly, and the turns out
        return model

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection (the RaNA layers' tensors), plus the bases of a rotated residual stream: the base weights
        are rotated with them when the adapter is loaded."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return selected | {key: value for key, value in state_dict.items() if rotation.is_basis_key(key)}

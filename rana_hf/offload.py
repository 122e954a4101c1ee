"""Where a module computes and where its weights are, for models that accelerate dispatched or offloaded.

Used by the layers, the calibration and the planner alike: a model loaded with `device_map="auto"` may hold only meta
placeholders for the weights of layers offloaded to the CPU or disk, and compute them on another device.
"""

from __future__ import annotations

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: accelerate's execution device when it is dispatched/offloaded, else its parameters'
    device (the CPU for a module without real parameters)."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", [hook]):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def module_weight(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """A parameter of a linear (`weight` or `bias`), read from accelerate's offload map when the module holds only a
    meta placeholder (a layer offloaded to CPU or disk with `device_map`)."""
    tensor = getattr(module, name)
    if tensor is None or tensor.device.type != "meta":
        return tensor
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", [hook]):
        weights_map = getattr(candidate, "weights_map", None)
        if weights_map is not None and name in weights_map:
            return weights_map[name]
    raise ValueError(
        f"a targeted {name} is on the meta device and not offloaded by accelerate: load the model with its weights "
        "(device_map='auto' with offload works)"
    )


def is_offloaded(model: nn.Module) -> bool:
    """True when accelerate placed part of the model on the CPU or disk next to an accelerator (or on disk)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    places = {str(place) for place in device_map.values()}
    return "disk" in places or ("cpu" in places and len(places) > 1)

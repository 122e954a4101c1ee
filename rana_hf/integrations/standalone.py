"""Standalone compressed checkpoints: a transformers folder whose replaced linears hold only their RaNA tensors.

`save_compressed(model, folder)` writes `config.json` + `rana_model.safetensors` (no pickle): every tensor of the
model, except the dense weights that rank adapters replace (their `A`, `B`, threshold and bias are stored instead).
Neuron adapters and CATS gates compute with the original weight, so theirs is kept, with its thresholds.

Loading goes through transformers' quantizer plugin hooks: `config.json` carries
`quantization_config: {"quant_method": "rana", "format_version": ..., "base_model_type": ..., "weights_file": ...,
"rana_config": {...}}`, and after `import rana_hf`, `AutoModelForCausalLM.from_pretrained(folder)` builds the base
architecture on the meta device, `RaNAQuantizer` swaps the planned linears for RaNA layers (after checking that the
checkpoint holds every RaNA tensor with its shape), and transformers loads the weights into them.

Failing loudly without the plugin: transformers only *warns* on an unknown `quant_method`, random-initialises the
weights it does not find, and with `ignore_mismatched_sizes=True` (which its shape-mismatch error suggests) also those
whose shapes differ. So nothing that transformers loads without rana_hf is there:
- `config.json` says `"model_type": "rana_hf"`: without `import rana_hf` every `Auto*` loader (and `pipeline`) refuses
  the folder with "model type `rana_hf` ... not recognize[d]". With the import, `AutoConfig` maps `rana_hf` to
  `RaNAStandaloneConfig`, whose `from_dict` returns the base architecture's own config (`LlamaConfig`, ...), so the
  model is the usual transformers class.
- the weights are not under the names transformers looks for (`model.safetensors`, `pytorch_model.bin`, their
  indexes) but `rana_model.safetensors` (or its shards and index), which `RaNAStandaloneConfig` names to transformers
  through the config attribute `transformers_weights`. A concrete class (`LlamaForCausalLM.from_pretrained(folder)`),
  which reads no model type, finds no weights and raises, whatever its arguments. So does a concrete class after
  `import rana_hf`: load standalone checkpoints with the `Auto` classes.
Format 1 checkpoints (weights in `model.safetensors`) still load with rana_hf; without it, only their sentinel
(`_sentinel`) stops a concrete class, and `ignore_mismatched_sizes=True` gets past it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import types
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import rotation
from ..config import RaNAConfig
from ..files import staged_directory
from ..layers import RaNALayer
from ..tuner import base_fingerprint, build_layer, check_plan, injected, link_layers

logger = logging.getLogger(__name__)

QUANT_METHOD = "rana"
MODEL_TYPE = "rana_hf"  # config.json's model_type: unknown to transformers until `import rana_hf` registers it
# Version of the standalone layout (config keys, file and tensor names). 1: weights in transformers' own file names
# (`model.safetensors`); 2: weights in `rana_model*.safetensors`, named by `quantization_config.weights_file`, so that
# transformers without rana_hf finds none.
# 3: a rotated residual stream (`residual_rotation`), its weights stored rotated.
STANDALONE_FORMAT_VERSION = 3
STANDALONE_FORMAT_VERSION_UNROTATED = 2  # written without residual_rotation, so that older rana_hf still reads it
ADAPTER_NAME = "default"  # tensor names use it whatever the adapter was called in memory
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHTS_NAME = "rana_model.safetensors"
WEIGHTS_INDEX_NAME = "rana_model.safetensors.index.json"
_SHARD_PATTERN = "rana_model{suffix}.safetensors"  # shards: rana_model-00001-of-00002.safetensors
# Format 1's weight files (transformers' default names).
LEGACY_WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json")
# Weight files an earlier save may have left in the folder, removed by the next one (a format 1 `model.safetensors`
# left beside format 2 weights would be found by transformers without rana_hf).
_STALE_WEIGHTS = (
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    "rana_model-*-of-*.safetensors",
    *LEGACY_WEIGHTS_NAMES,
    "model-*-of-*.safetensors",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
_SAFETENSORS_FLOATS = ("F16", "BF16", "F32", "F64")


class RaNAQuantizationConfig(QuantizationConfigMixin):
    """`quantization_config` of a standalone RaNA checkpoint (`quant_method: "rana"`), validated when read.

    Args:
        rana_config: the `RaNAConfig` as a dict (method, budget, plan, ...).
        base_model_type: `model_type` of the base architecture (e.g. `"llama"`).
        format_version: version of the standalone layout that wrote it.
        weights_file: the weights' file in the folder (format 2 on): `rana_model.safetensors`, or the index
            `rana_model.safetensors.index.json` of its shards. Format 1 has none (transformers' default names).
        rana_hf_version: rana_hf version that wrote it (informative).
    """

    def __init__(
        self,
        rana_config: dict[str, Any] | None = None,
        base_model_type: str | None = None,
        format_version: int = STANDALONE_FORMAT_VERSION,
        weights_file: str | None = None,
        rana_hf_version: str | None = None,
        **kwargs,
    ) -> None:
        self.quant_method = QUANT_METHOD
        if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
            raise ValueError(f"quantization_config.format_version must be an integer >= 1, got {format_version!r}")
        if format_version > STANDALONE_FORMAT_VERSION:
            raise ValueError(
                f"This standalone RaNA checkpoint was written by a newer rana_hf (standalone format {format_version}; "
                f"this rana_hf reads up to {STANDALONE_FORMAT_VERSION}). Upgrade rana_hf: `pip install -U rana_hf`."
            )
        if not isinstance(rana_config, dict) or not isinstance(base_model_type, str):
            raise ValueError(
                "quantization_config of a standalone RaNA checkpoint needs 'rana_config' (a dict) and "
                "'base_model_type' (a string); save the checkpoint again with `rana_hf.save_compressed`"
            )
        if format_version >= 2 and weights_file not in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME):
            raise ValueError(
                f"quantization_config.weights_file of a standalone RaNA checkpoint (format {format_version}) must be "
                f"{WEIGHTS_NAME!r} or {WEIGHTS_INDEX_NAME!r}, got {weights_file!r}; save the checkpoint again with "
                "`rana_hf.save_compressed`"
            )
        if format_version == 1 and weights_file is not None:
            raise ValueError(
                f"quantization_config.weights_file is not part of standalone format 1 (got {weights_file!r}); "
                "save the checkpoint again with `rana_hf.save_compressed`"
            )
        self.format_version = format_version
        self.base_model_type = base_model_type
        self.weights_file = weights_file
        self.rana_config = rana_config
        self.rana_hf_version = rana_hf_version
        self.to_rana_config()  # validates (a newer adapter format, a malformed plan) before anything is built
        kwargs.pop("quant_method", None)
        if kwargs:
            logger.info("standalone RaNA quantization_config: ignoring unknown keys %s", sorted(kwargs))

    def to_rana_config(self) -> RaNAConfig:
        """The `RaNAConfig` (plan included) this checkpoint was compressed with."""
        names = {f.name for f in fields(RaNAConfig) if f.init}
        config = RaNAConfig(**{key: value for key, value in self.rana_config.items() if key in names})
        check_plan(config.plan)
        return config

    def weights_names(self) -> tuple[str, ...]:
        """The file names under which this checkpoint's weights may be (one of them is there)."""
        return (self.weights_file,) if self.weights_file else LEGACY_WEIGHTS_NAMES


class RaNAStandaloneConfig(PretrainedConfig):
    """What `AutoConfig` knows as model type `rana_hf`: it reads the folder's config as its base architecture's config.

    `from_dict` returns an instance of the base config class (`LlamaConfig`, `Gemma3TextConfig`, ...), named by
    `quantization_config.base_model_type`, with `transformers_weights` set to `quantization_config.weights_file`
    (transformers then loads the weights from that file instead of `model.safetensors`); the `rana` quantizer then
    builds the RaNA layers.
    """

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        quantization = config_dict.get("quantization_config")
        if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
            raise ValueError(
                f"config.json says model_type {MODEL_TYPE!r} but has no quantization_config with quant_method "
                f"{QUANT_METHOD!r}: not a standalone RaNA checkpoint. Save it again with `rana_hf.save_compressed`."
            )
        base_type = quantization.get("base_model_type")
        if base_type == MODEL_TYPE or base_type not in CONFIG_MAPPING:
            raise ValueError(
                f"this standalone RaNA checkpoint is built on model type {base_type!r}, which this transformers "
                "does not know; upgrade transformers, or check quantization_config.base_model_type in config.json"
            )
        base_dict = {key: value for key, value in config_dict.items() if key != "model_type"}
        weights_file = quantization.get("weights_file")
        if weights_file is not None:  # checked with the rest of quantization_config before any file is read
            base_dict["transformers_weights"] = weights_file
        return CONFIG_MAPPING[base_type].from_dict(base_dict, **kwargs)


class RaNAQuantizer(HfQuantizer):
    """transformers' loader for standalone RaNA checkpoints: RaNA layers on the meta skeleton, before weights load.

    Only documented `HfQuantizer` hooks are overridden (their internals differ between transformers releases).
    """

    requires_calibration = True  # a RaNA model comes from `rana_hf.compress`, not from quantizing at load time

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "standalone RaNA checkpoints cannot be offloaded to disk; use a device_map without 'disk'"
            )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise ValueError(f"RaNA layers run in {names}; got dtype={dtype}. Pass one of them to from_pretrained.")
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs):
        install_rana_layers(model, self.quantization_config, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs):
        for turn in rotation.modules_of(model):  # the weights were stored rotated
            if not bool(torch.isfinite(turn.basis).all()):
                raise ValueError(
                    f"the standalone checkpoint's residual rotation of decoder layer {turn.index} did not load (its "
                    "basis is missing or not finite); the checkpoint is damaged: save it again"
                )
            turn.mark_loaded()
        for name, parameter in model.named_parameters():  # the adapter format's trainable set: A and B
            parameter.requires_grad_("rana_hf_" in name and "rana_hf_rotation" not in name)
        # transformers' own save_pretrained would write this model's base model_type, i.e. a checkpoint that loads
        # without rana_hf as a dense model with random weights; this model saves as the standalone format instead
        # (Trainer checkpoints included).
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        from ..hub import use_rana_push_to_hub  # hub imports this module

        use_rana_push_to_hub(model)  # transformers' push_to_hub would upload a generic card
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        logger.warning(
            "A standalone RaNA model is saved with `rana_hf.save_compressed(model, folder)` (or its own "
            "`model.save_pretrained(folder)`), which write the rana_hf model type that keeps it from loading without "
            "rana_hf."
        )
        return False

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True  # Trainer fine-tunes A and B of a model loaded this way


def _save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, push_to_hub=False, **kwargs):
    """`save_pretrained` of a model loaded from a standalone RaNA checkpoint: `save_compressed` (safetensors only)."""
    if push_to_hub:
        raise ValueError(
            "push a standalone RaNA model with `rana_hf.push_to_hub(model, repo_id)`, which writes its model card"
        )
    if kwargs:
        logger.info("save_pretrained of a standalone RaNA model ignores %s", sorted(kwargs))
    if is_main_process:
        save_compressed(self, save_directory, state_dict=state_dict)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def checkpoint_tensors(checkpoint_files) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """`{name: (shape, safetensors dtype)}` of the checkpoint's tensors, read from the headers (no data)."""
    if not checkpoint_files:
        return None
    tensors = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"standalone RaNA checkpoints are safetensors only; got {os.path.basename(str(path))!r}")
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                tensors[key] = (tuple(piece.get_shape()), piece.get_dtype())
    return tensors


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict, folder: str) -> None:
    """Raise a ValueError naming what is wrong when a checkpoint's tensors (`found`, as `checkpoint_tensors` reads
    them) lack any RaNA tensor of `expected` (`{name: shape}`), hold one in another shape or in a non-float dtype. Used
    by `from_pretrained` and by the vLLM integration, before any weight is loaded."""
    missing = sorted(key for key in expected if key not in found)
    wrong = [
        f"{key}: {list(found[key][0])} in the file, {list(shape)} expected"
        for key, shape in expected.items()
        if key in found and found[key][0] != shape
    ]
    not_float = [
        f"{key}: {found[key][1]}" for key in expected if key in found and found[key][1] not in _SAFETENSORS_FLOATS
    ]
    problems = []
    if missing:
        problems.append(
            f"missing RaNA tensors ({len(missing)}): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    if not_float:
        problems.append(f"not floating point: {'; '.join(not_float[:5])}")
    if problems:
        raise ValueError(
            f"The standalone RaNA checkpoint in {folder!r} is incomplete or damaged ({'; '.join(problems)}). "
            "Loading it would leave these tensors uninitialised; save the model again with `rana_hf.save_compressed`."
        )


def install_rana_layers(
    model: nn.Module, quantization_config: RaNAQuantizationConfig, checkpoint_files=None
) -> dict[str, RaNALayer]:
    """Put the RaNA layers of a standalone checkpoint into `model` (a skeleton on the meta device).

    Everything is checked first: the plan against the model's linears, then (when `checkpoint_files` are given) every
    RaNA tensor against the checkpoint's safetensors headers, for presence, shape and a floating-point dtype.
    Rank adapters get no dense weight (an empty, non-persistent placeholder).

    Returns:
        The new layers by module name.
    """
    rana = quantization_config.to_rana_config()
    plan = rana.plan
    modules = dict(model.named_modules())
    for name, entry in plan.items():
        if not injected(entry):
            continue
        module = modules.get(name)
        if not isinstance(module, nn.Linear) or isinstance(module, BaseTunerLayer):
            raise ValueError(
                f"the standalone RaNA checkpoint adapts {name!r}, which this {type(model).__name__} lacks as a "
                f"plain nn.Linear (found {type(module).__name__}); config.json and the plan do not match"
            )
        if (module.out_features, module.in_features) != (entry["out_features"], entry["in_features"]):
            raise ValueError(
                f"the plan of {name!r} is for shape {(entry['out_features'], entry['in_features'])} (out, in), the "
                f"model built from config.json has {(module.out_features, module.in_features)}"
            )
    layers: dict[str, RaNALayer] = {}
    for name, entry in plan.items():
        if not injected(entry):
            continue
        parent, _ = _parent(model, name)
        layer = build_layer(plan, name, modules[name], parent, ADAPTER_NAME, rana.budget_mode)
        layer.to(device="meta")  # the loader fills it; nothing to allocate now
        for key in list(layer.rana_hf_threshold.keys()):  # thresholds stay float32 whatever the model dtype
            layer.rana_hf_threshold[key] = layer.rana_hf_threshold[key].float()
        layers[name] = layer
    expected = {}
    for name, layer in layers.items():
        for key, tensor in layer.state_dict().items():
            if layer.replaces_weight and key == "base_layer.weight":
                continue
            expected[f"{name}.{key}"] = tuple(tensor.shape)
    if rana.residual_rotation is not None:  # the rotated stream's bases (its weights are stored rotated)
        layer_list, _ = rotation.decoder_parts(model, allow_meta=True)
        width = layer_list[0].input_layernorm.weight.shape[0]
        prefix = next(name for name, module in model.named_modules() if module is layer_list[0]).rsplit(".", 1)[0]
        for index in rotation.first_layers(rana.residual_rotation, len(layer_list)):
            expected[f"{prefix}.{index}.{rotation.ATTRIBUTE}.rana_hf_rotation.{ADAPTER_NAME}"] = (width, width)
    found = checkpoint_tensors(checkpoint_files)
    if found is None:
        logger.warning("the loader named no checkpoint files: RaNA tensors could not be checked before loading")
    else:
        folder = os.path.dirname(str(checkpoint_files[0]))
        check_tensors(expected, found, folder)
    # Checked: change the model.
    for name, layer in layers.items():
        if layer.replaces_weight:
            base = layer.base_layer
            dtype = base.weight.dtype
            del base.weight  # replaced by A and B: not stored, not loaded
            base.register_buffer("weight", torch.empty(0, dtype=dtype, device="meta"), persistent=False)
            layer._dense_freed = True
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, layer)
    link_layers(plan, layers)
    if rana.residual_rotation is not None:
        for turn in rotation.install(model, rana.residual_rotation, ADAPTER_NAME, allow_meta=True):
            turn.owned_by_adapter = True
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    model._keep_in_fp32_modules_strict = sorted(keep_fp32 | {"rana_hf_threshold", "rana_hf_rotation"})
    ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    sentinel = "|".join(re.escape(name) for name in sorted(layers))
    model._keys_to_ignore_on_load_unexpected = ignored | {rf"^(?:{sentinel})\.weight$"}  # see _sentinel
    return layers


def _sentinel(layers: dict[str, RaNALayer]) -> dict[str, torch.Tensor]:
    """An empty tensor under the plain-linear name of one RaNA layer (`<layer>.weight`; the layer keeps its weight as
    `<layer>.base_layer.weight`). Should a concrete class (`LlamaForCausalLM.from_pretrained`) read the weights
    without rana_hf anyway (format 1 used transformers' file names; a user may rename the file), its shape mismatches
    the linear's and transformers raises instead of random-initialising the weights it cannot find (unless told
    `ignore_mismatched_sizes=True`: hence format 2's file names). With rana_hf the installed layers have no such key,
    and the loader is told to ignore it (`install_rana_layers`)."""
    name = min(layers)
    return {f"{name}.weight": torch.zeros(0, dtype=torch.float32)}


def _rana_of(model: nn.Module) -> tuple[RaNAConfig, nn.Module, str]:
    """(RaNA config, the transformers model, adapter name) of a RaNA model in memory; refuses anything else."""
    if isinstance(model, PeftModel):
        configs = {name: config for name, config in model.peft_config.items() if isinstance(config, RaNAConfig)}
        if not configs:
            raise ValueError("this PeftModel has no RaNA adapter; build one with `rana_hf.compress`")
        if len(model.peft_config) != len(configs):
            others = sorted(set(model.peft_config) - set(configs))
            raise ValueError(
                f"this PeftModel also holds non-RaNA adapters {others}; a standalone RaNA checkpoint holds RaNA "
                "layers only. Save them as adapters (`model.save_pretrained`) instead."
            )
        adapter_name, config = next(iter(configs.items()))
        return config, model.get_base_model(), adapter_name
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(quantization, RaNAQuantizationConfig):
        return quantization.to_rana_config(), model, ADAPTER_NAME
    if getattr(model, "peft_config", None):
        raise ValueError(
            "save_compressed takes the PeftModel that `rana_hf.compress` returns (or a model loaded from a standalone "
            "checkpoint); for a transformers model that loaded a RaNA adapter, load it with "
            "`peft.AutoPeftModelForCausalLM.from_pretrained(...)` instead"
        )
    raise ValueError(
        "save_compressed needs a RaNA model (the PeftModel that `rana_hf.compress` returns), got "
        f"{type(model).__name__}"
    )


def _tensors(base: nn.Module, plan: dict, adapter_name: str, state_dict=None) -> dict[str, torch.Tensor]:
    """The standalone checkpoint's tensors: the model's state, minus the dense weights that rank adapters replace."""
    rotation.settle(base)  # an adapter loaded by transformers rotates its base weights at the first forward pass
    layers = {name: module for name, module in base.named_modules() if isinstance(module, RaNALayer)}
    for module in base.modules():
        if isinstance(module, BaseTunerLayer) and not isinstance(module, RaNALayer):
            raise ValueError(
                f"the model carries a {type(module).__name__} adapter besides RaNA; a standalone RaNA checkpoint "
                "holds RaNA layers only"
            )
    for name, layer in layers.items():
        if layer._active() != adapter_name:
            raise ValueError(f"RaNA layer {name!r} has its adapter switched off; enable it before saving")
    drop = {f"{name}.base_layer.weight" for name, layer in layers.items() if layer.replaces_weight}
    out_embeddings, in_embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if out_embeddings is not None and in_embeddings is not None and out_embeddings.weight is in_embeddings.weight:
        drop |= {f"{name}.weight" for name, module in base.named_modules() if module is out_embeddings}  # tied
    suffix = f".{adapter_name}"
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    source = state_dict if state_dict is not None else base.state_dict()
    for key, tensor in source.items():
        if key in drop:
            continue
        if tensor.device.type == "meta":
            raise ValueError(f"{key!r} is on the meta device (offloaded?); load the model fully before saving it")
        if ".rana_hf_" in key and key.endswith(suffix):
            key = key[: -len(suffix)] + f".{ADAPTER_NAME}"
        tensor = tensor.detach()
        alias = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and alias in seen:
            tensor = tensor.clone()  # safetensors stores no aliases
        seen[alias] = key
        tensors[key] = tensor.contiguous().cpu()
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and ".rana_hf_" in key and tensor.dtype not in (*SUPPORTED_DTYPES,):
            raise ValueError(f"{key!r} is {tensor.dtype}; RaNA layers run in float32, float16 or bfloat16")
    sentinel = _sentinel(layers)
    if set(sentinel) & set(tensors):
        raise ValueError(f"{next(iter(sentinel))!r} is already a tensor of this model; cannot mark the checkpoint")
    return tensors | sentinel


def _jsonable(value):
    if isinstance(value, (set, frozenset)):  # PEFT turns long target_modules lists into sets
        return sorted(value)
    raise TypeError(f"{type(value).__name__} in the RaNA config cannot be written to config.json")


def save_compressed(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer=None,
    *,
    max_shard_size: int | str = "5GB",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a standalone RaNA checkpoint: a transformers folder without the dense weights that rank adapters replace.

    `AutoModelForCausalLM.from_pretrained(folder, dtype=...)` rebuilds the model after `import rana_hf`; without the
    import, transformers refuses the folder (its model type is `rana_hf`, and no weights are under the file names
    transformers looks for).

    Args:
        model: the `PeftModel` that `rana_hf.compress` returns (or `PeftModel.from_pretrained` of a RaNA adapter), or a
            model loaded from a standalone checkpoint.
        save_directory: the folder (created if missing).
        tokenizer: saved into the folder when given; otherwise the tokenizer files of a local base model folder
            are copied when there are any.
        max_shard_size: largest safetensors file before the weights are split (with an index), as in transformers.
        state_dict: tensors to save instead of the model's own (same names; Trainer passes them).

    Returns:
        The folder.
    """
    from .. import __version__

    rana, base, adapter_name = _rana_of(model)
    base_config = getattr(base, "config", None)
    if not isinstance(base_config, PretrainedConfig):
        raise ValueError(f"save_compressed needs a transformers model inside, got {type(base).__name__}")
    tensors = _tensors(base, rana.plan, adapter_name, state_dict)
    target = Path(save_directory)
    # every file is written into a staging folder and moved into `target` at the end: a failure halfway leaves the
    # folder as it was (the weights of an earlier save are replaced only then)
    with staged_directory(target, replace=_STALE_WEIGHTS) as folder:
        _write_standalone(folder, target, base, base_config, rana, tensors, tokenizer, max_shard_size, __version__)
    logger.info("saved a standalone RaNA checkpoint (%d tensors) to %s", len(tensors), target)
    return target


def _write_standalone(folder, target, base, base_config, rana, tensors, tokenizer, max_shard_size, version) -> None:
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=_SHARD_PATTERN, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: tensors[key] for key in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    rana_dict = rana.to_dict()
    if rana.base_fingerprint:  # of the weights written here (trained ones too: `make_trainable(base_weights=True)`)
        rana_dict["base_fingerprint"] = base_fingerprint(base, list(rana.base_fingerprint))
    rana_dict["peft_type"] = str(getattr(rana.peft_type, "value", rana.peft_type))
    rana_dict["task_type"] = str(getattr(rana.task_type, "value", rana.task_type)) if rana.task_type else None
    quantization = RaNAQuantizationConfig(
        rana_config=json.loads(json.dumps(rana_dict, default=_jsonable)),
        base_model_type=type(base_config).model_type,
        weights_file=WEIGHTS_INDEX_NAME if split.is_sharded else WEIGHTS_NAME,
        rana_hf_version=version,
        format_version=STANDALONE_FORMAT_VERSION if rana.residual_rotation else STANDALONE_FORMAT_VERSION_UNROTATED,
    )
    config = base_config.to_diff_dict()
    config.pop("quantization_config", None)
    # Set by RaNAStandaloneConfig on a loaded model's config; in config.json, transformers without rana_hf would find
    # the weights through it.
    config.pop("transformers_weights", None)
    dtypes = {t.dtype for key, t in tensors.items() if t.is_floating_point() and "rana_hf_threshold" not in key}
    config.update(
        model_type=MODEL_TYPE,
        architectures=[type(base).__name__],
        quantization_config=quantization.to_dict(),
        dtype=str(next(iter(dtypes)) if len(dtypes) == 1 else base.dtype).removeprefix("torch."),
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = getattr(base, "generation_config", None)
    if generation is not None and base.can_generate():
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    else:
        source = getattr(base_config, "name_or_path", None) or rana.base_model_name_or_path
        if source and os.path.isdir(source) and os.path.realpath(source) != os.path.realpath(target):
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file():
                    shutil.copyfile(Path(source) / name, folder / name)


def is_standalone_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a standalone RaNA checkpoint (by its config.json; nothing is loaded)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text(encoding="utf-8"))
    quantization = config.get("quantization_config") or {}
    return config.get("model_type") == MODEL_TYPE or quantization.get("quant_method") == QUANT_METHOD


def register() -> None:
    """Make transformers load standalone RaNA checkpoints (idempotent; a foreign `rana` registration is refused)."""
    for mapping, cls, register_fn in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, RaNAQuantizationConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, RaNAQuantizer, register_quantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is None:
            register_fn(QUANT_METHOD)(cls)
        elif existing.__qualname__ != cls.__qualname__ or existing.__module__ != cls.__module__:
            raise RuntimeError(
                f"transformers already has a quantization method {QUANT_METHOD!r} from {existing.__module__}; it "
                "clashes with rana_hf's standalone checkpoints"
            )
    AutoConfig.register(MODEL_TYPE, RaNAStandaloneConfig, exist_ok=True)

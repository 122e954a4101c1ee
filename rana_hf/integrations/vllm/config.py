"""vLLM's view of a standalone RaNA checkpoint: the `rana` quantization config.

vLLM builds it from `config.json`'s `quantization_config` (`from_config`), then calls `maybe_update_config` with the
model folder before any worker starts: that is where the architecture and the checkpoint's RaNA tensors (presence,
shape, dtype, read from the safetensors headers) are checked. `get_quant_method` gives every linear its method:
`RaNALinearMethod` where the plan adapts one of its parts, vLLM's `UnquantizedLinearMethod` elsewhere (and for
`lm_head`, which is an embedding layer to vLLM: `None` leaves it unquantized).

Tensor names: the checkpoint stores `<linear>.rana_hf_{A,B,threshold}.default` and, for linears that keep their dense
weight, `<linear>.base_layer.{weight,bias}`; `get_checkpoint_weight_mapper` renames them to the parameters vLLM's
layers hold (`rana_{A,B,threshold}`, `weight`, `bias`), and drops the empty sentinel `<rank-adapted linear>.weight`
(see `integrations.standalone._sentinel`; on linears that keep their weight the loader skips it).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.models.utils import WeightsMapper

from ...tuner import injected
from .. import standalone
from . import QUANT_METHOD
from .linear import RaNALinearMethod, expected_tensors, part_kind

logger = logging.getLogger(__name__)

# Architectures whose vLLM model fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` under the same module
# names as transformers (Gemma 3: the text model), each compared with transformers end to end.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh")  # act(0) == 0: the CATS-style gate's activations


class RaNAVllmConfig(QuantizationConfig):
    """The `rana` quantization method: the plan and format of a standalone RaNA checkpoint, checked when read.

    Args:
        quantization: `config.json`'s `quantization_config` (validated by `standalone.RaNAQuantizationConfig`).
    """

    def __init__(self, quantization: standalone.RaNAQuantizationConfig) -> None:
        super().__init__()
        rana = quantization.to_rana_config()
        if quantization.base_model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"rana_hf's vLLM integration serves {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints; this one is built "
                f"on {quantization.base_model_type!r}. Load it with transformers (`AutoModelForCausalLM`) instead."
            )
        if rana.budget_mode != "threshold":
            raise ValueError(
                f"this checkpoint keeps a fixed number of components per token (budget_mode={rana.budget_mode!r}); "
                "rana_hf's vLLM integration serves budget_mode='threshold' only. Compress again with "
                "RaNAConfig(budget_mode='threshold')."
            )
        if rana.residual_rotation is not None:
            raise ValueError(
                f"this checkpoint carries its residual stream rotated (residual_rotation={rana.residual_rotation!r}), "
                "whose turns between decoder layers rana_hf's vLLM integration does not run. Load it with "
                "transformers (`AutoModelForCausalLM`), or compress again with residual_rotation=None."
            )
        for name, entry in rana.plan.items():
            part_kind(name, entry)  # refuses a layer kind this integration cannot run
        self.quantization = quantization
        self.base_model_type = quantization.base_model_type
        self.plan: dict[str, dict] = rana.plan
        self.hidden_act: str | None = None  # set from the model config (maybe_update_config); CATS-style gates need it

    def __repr__(self) -> str:
        adapted = sum(1 for entry in self.plan.values() if injected(entry))
        return f"RaNAVllmConfig(base_model_type={self.base_model_type!r}, adapted_linears={adapted})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain torch ops (and rana_hf's own kernels where they apply): any device vLLM runs on

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RaNAVllmConfig:
        fields = {key: value for key, value in config.items() if key != "quant_method"}
        return cls(standalone.RaNAQuantizationConfig(**fields))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Check the model config and the checkpoint's RaNA tensors before serving starts."""
        if hf_config is not None:
            model_type = getattr(hf_config, "model_type", None)
            if model_type not in SUPPORTED_MODEL_TYPES:
                raise ValueError(
                    f"rana_hf's vLLM integration serves {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints; the model "
                    f"config is {model_type!r}"
                )
            # Gemma 3 names it hidden_activation
            self.hidden_act = getattr(hf_config, "hidden_act", None) or getattr(hf_config, "hidden_activation", None)
        gated = [name for name, entry in self.plan.items() if entry["kind"] == "gated"]
        if gated and self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CATS-style gates ({gated[0]!r}, ...) need an MLP activation with act(0) == 0 among {ACTIVATIONS}; "
                f"the model config says hidden_act={self.hidden_act!r}"
            )
        if not os.path.isdir(str(model_name)):
            logger.info("%s is not a local folder: RaNA tensors are checked as they load", model_name)
            return
        files = sorted(glob.glob(os.path.join(str(model_name), "rana_model*.safetensors")))
        if not files:
            raise ValueError(
                f"{model_name!r} has no {standalone.WEIGHTS_NAME} (or its shards): not a standalone RaNA checkpoint "
                "of format 2; save it again with `rana_hf.save_compressed`"
            )
        found = standalone.checkpoint_tensors(files)
        standalone.check_tensors(expected_tensors(self.plan), found, str(model_name))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention: unquantized
        names = self.part_names(prefix)
        entries = [self.plan.get(name) for name in names]
        if not any(entry is not None and injected(entry) for entry in entries):
            return UnquantizedLinearMethod()
        return RaNALinearMethod(self, prefix, names)

    def part_names(self, prefix: str) -> list[str]:
        """The original (transformers) linears behind vLLM's linear `prefix`: `qkv_proj` -> q, k, v; else itself."""
        parent, _, leaf = prefix.rpartition(".")
        packed = self.packed_modules_mapping.get(leaf)
        if not packed:
            return [prefix]
        return [f"{parent}.{part}" if parent else part for part in packed]

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:
        """Checkpoint names -> the parameters of vLLM's layers (applied once per loader level: idempotent)."""
        regex: dict[re.Pattern, str | None] = {}
        # The empty sentinel under a rank-adapted linear's plain name: no weight of that name exists to load, so any
        # tail of the name can be dropped (vLLM's loaders see full names, then names relative to `model`).
        rank_only = sorted(name for name, entry in self.plan.items() if entry["kind"] == "rank")
        if rank_only:
            tails = "|".join(re.escape(name.split(".", 1)[-1]) for name in rank_only)
            regex[re.compile(rf"(?:^|\.)(?:{tails})\.weight$")] = None
        regex[re.compile(r"\.base_layer\.(weight|bias)$")] = r".\1"
        regex[re.compile(r"\.rana_hf_(A|B|threshold)\." + re.escape(standalone.ADAPTER_NAME) + "$")] = r".rana_\1"
        return QuantizationConfig.get_checkpoint_weight_mapper() | WeightsMapper(orig_to_new_regex=regex)

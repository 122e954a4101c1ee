"""Registers RaNA as a PEFT method, so PEFT's and transformers' loaders build RaNA layers after `import rana_hf`."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from ..config import RaNAConfig, ensure_peft_type
from ..tuner import RaNAModel


def register() -> None:
    """Make PEFT know the `RANA_HF` method (idempotent; safe to call on every import)."""
    peft_type = ensure_peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING and peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name="rana_hf", config_cls=RaNAConfig, model_cls=RaNAModel, prefix="rana_hf_")

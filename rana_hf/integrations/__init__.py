"""Glue to PEFT and transformers; holds no maths."""

from .peft_registration import register

__all__ = ["register"]

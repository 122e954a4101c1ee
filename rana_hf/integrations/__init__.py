"""Glue to PEFT and transformers; holds no maths."""

from . import peft_registration, standalone


def register() -> None:
    """Register RaNA with PEFT (adapter checkpoints) and transformers (standalone checkpoints); idempotent."""
    peft_registration.register()
    standalone.register()


__all__ = ["register"]

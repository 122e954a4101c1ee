"""Serving standalone RaNA checkpoints with vLLM, through its plugin interface.

`pip install "rana_hf[vllm]"` installs vLLM and the `vllm.general_plugins` entry point `rana_hf`, which vLLM calls in
every process it starts (engine, tensor-parallel workers). `register` makes transformers read the folder's config (its
model type is `rana_hf`) and registers the quantization method `rana` with vLLM, so that `LLM(model=folder)` and
`vllm serve folder` run a folder written by `rana_hf.save_compressed`:

- `config.RaNAVllmConfig` reads `quantization_config`, refuses what it cannot serve (a newer format, an unsupported
  architecture, `budget_mode="topk"`) and checks the checkpoint's RaNA tensors before any worker starts;
- `linear.RaNALinearMethod` holds the RaNA tensors of one vLLM linear (fused `qkv_proj` / `gate_up_proj` included:
  one part per original linear) and computes its forward with vLLM's tensor parallelism.

Importing this package does not import vLLM; `register` does.
"""

from __future__ import annotations

QUANT_METHOD = "rana"


def register() -> None:
    """The `vllm.general_plugins` hook: register the `rana` quantization method with vLLM (idempotent).

    Raises:
        RuntimeError: when vLLM already has a different `rana` method.
    """
    from vllm.model_executor.layers import quantization

    import rana_hf  # noqa: F401  (registers the `rana_hf` model type with transformers' AutoConfig)

    from .config import RaNAVllmConfig

    registered = getattr(quantization, "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG", {}).get(QUANT_METHOD)
    if registered is RaNAVllmConfig:
        return
    if registered is not None or QUANT_METHOD in quantization.QUANTIZATION_METHODS:
        raise RuntimeError(
            f"vLLM already has a quantization method {QUANT_METHOD!r} ({registered or 'built in'}); it clashes with "
            "rana_hf's standalone checkpoints"
        )
    quantization.register_quantization_config(QUANT_METHOD)(RaNAVllmConfig)


__all__ = ["QUANT_METHOD", "register"]

"""Evaluation: perplexity, agreement with the dense model (KL divergence, top-1) and measured FLOPs on held-out text.

`measure_flops` counts the FLOPs of the targeted linears from the masks each layer actually applied (router cost
included), not from the plan.

`compare_to_dense` runs each batch twice on the *same* model object, once with the RaNA layers switched off (the dense
model) and once with them on, so no second copy of the weights is needed. `DenseAgreementCallback` reports the same
metrics from a `transformers.Trainer` evaluation loop, and `evaluate.load(DENSE_AGREEMENT_METRIC)` from `evaluate`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .adapters import ENTRIES
from .layers import FlopCounter, RaNALayer, active_counter, counting
from .tuner import rana_config

# The `evaluate` metric (`evaluate.load(DENSE_AGREEMENT_METRIC)`): `compare_to_dense` on texts.
DENSE_AGREEMENT_METRIC = str(Path(__file__).parent / "metrics" / "rana_dense_agreement.py")


@torch.no_grad()
def mean_nll(
    model: nn.Module, chunks: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity"
) -> float:
    """Mean negative log-likelihood (nats per predicted token) of a causal LM on token chunks.

    Args:
        model: a causal LM (dense, `PeftModel` or adapted transformers model).
        chunks: [num_chunks, seq_len] token ids, e.g. from `rana_hf.calibration.calibration_chunks`.
        batch_size: chunks per forward pass.
        progress: show a progress bar.
        desc: the progress bar's label.
    """
    _check_chunks(chunks)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        batches = range(0, chunks.shape[0], batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            ids = chunks[start : start + batch_size].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()  # [B, T-1, V]
            total_nll += float(_nll(logits, ids[:, 1:]))
            total_tokens += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total_nll / total_tokens


def perplexity(
    model: nn.Module, chunks: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity"
) -> float:
    """Perplexity, `exp(mean_nll)`, of a causal LM on token chunks (every position after the first is predicted)."""
    return math.exp(mean_nll(model, chunks, batch_size, progress, desc))


def _check_chunks(chunks: torch.Tensor) -> None:
    if chunks.dim() != 2 or chunks.shape[1] < 2:
        raise ValueError(f"chunks must be [num_chunks, seq_len >= 2] token ids, got shape {tuple(chunks.shape)}")


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


@contextlib.contextmanager
def dense_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every RaNA layer of `model` off for the block (the model computes its dense original); adapters of other
    PEFT methods stacked on it (LoRA from `training.add_lora`) are switched off too."""
    layers = [m for m in model.modules() if isinstance(m, RaNALayer)]
    if not layers:
        raise ValueError("this model has no RaNA layers; compare_to_dense needs an adapted model")
    freed = [layer.module_name for layer in layers if layer._dense_freed]
    if freed:
        raise RuntimeError(
            f"the dense weights of {len(freed)} RaNA layers ({freed[0]!r}, ...) are not in memory: they were freed by "
            "prepare_for_decode, or the model was loaded from a standalone RaNA checkpoint (which keeps only the RaNA "
            "tensors of rank adapters). Comparing to dense needs them: use the adapter checkpoint or the base model."
        )
    layers += [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not isinstance(m, RaNALayer)]
    states = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, states, strict=True):
            layer._disable_adapters = state


def logit_metrics(logits: torch.Tensor, dense_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Summed metrics of one batch: negative log-likelihoods, `KL(dense || adapted)` and top-1 agreements.

    Args:
        logits: [..., V] adapted model logits. dense_logits: [..., V] dense logits. targets: [...] next tokens.

    Returns:
        Sums over positions: `nll`, `dense_nll`, `kl`, `top1_agree`, and `tokens`.
    """
    logits, dense_logits = logits.float(), dense_logits.float()
    log_probs = logits.log_softmax(-1)
    dense_log_probs = dense_logits.log_softmax(-1)
    kl = (dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(-1)  # [...]
    return {
        "nll": float(_nll(logits, targets)),
        "dense_nll": float(_nll(dense_logits, targets)),
        "kl": float(kl.sum(dtype=torch.float64)),
        "top1_agree": float((logits.argmax(-1) == dense_logits.argmax(-1)).sum()),
        "tokens": float(targets.numel()),
    }


@torch.no_grad()
def compare_to_dense(
    model: nn.Module, chunks: torch.Tensor, batch_size: int = 4, progress: bool = False, count_flops: bool = True
) -> dict[str, float]:
    """Quality of an adapted model against its own dense original on held-out chunks, and the FLOPs it spent.

    Args:
        model: a model with RaNA layers (`PeftModel` from `compress`, or a transformers model that loaded one).
        chunks: [num_chunks, seq_len] held-out token ids.
        batch_size: chunks per forward pass.
        progress: show a progress bar.
        count_flops: also measure the FLOP reduction of the targeted linears on these tokens.

    Returns:
        `perplexity`, `dense_perplexity`, `kl_to_dense` (mean per predicted token, nats), `top1_agreement` (fraction
        of positions whose argmax equals the dense model's), `tokens`, and `flop_reduction` when counted.
    """
    _check_chunks(chunks)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    context = flop_counting(model) if count_flops else contextlib.nullcontext()
    try:
        with context as counter:
            batches = range(0, chunks.shape[0], batch_size)
            for start in tqdm(batches, desc="compare to dense", unit="batch", disable=not progress):
                ids = chunks[start : start + batch_size].to(device)
                with dense_mode(model), counting(None):
                    dense_logits = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V]
                logits = model(input_ids=ids).logits[:, :-1]
                for key, value in logit_metrics(logits, dense_logits, ids[:, 1:]).items():
                    sums[key] = sums.get(key, 0.0) + value
    finally:
        model.train(was_training)
    tokens = sums["tokens"]
    result = {
        "perplexity": math.exp(sums["nll"] / tokens),
        "dense_perplexity": math.exp(sums["dense_nll"] / tokens),
        "kl_to_dense": sums["kl"] / tokens,
        "top1_agreement": sums["top1_agree"] / tokens,
        "tokens": int(tokens),
    }
    if counter is not None:
        result["flop_reduction"] = flop_report(counter, chunks.numel())["reduction"]
    return result


@contextlib.contextmanager
def flop_counting(model: nn.Module) -> Iterator[FlopCounter]:
    """Count the FLOPs of the targeted linears of `model` while the block runs, from the masks actually applied.

    RaNA layers count themselves; targeted linears that the plan kept dense are counted by hooks, and so are LoRA
    adapters stacked on RaNA layers (`r (n + m)` MACs per token each, on the unmasked input). Set
    `counter.token_mask` ([batch, seq] bool) before a forward pass to exclude padding.
    """
    config = rana_config(model)
    modules = dict(model.named_modules())
    counter = FlopCounter()
    handles = []
    for name, entry in config.plan.items():
        if not ENTRIES[entry["kind"]].counted_dense:  # RaNA layers count themselves (and CATS gates their followers)
            continue
        matches = [m for n, m in modules.items() if n == name or n.endswith("." + name)]
        if not matches:
            continue

        def hook(mod, args, output, name=name):
            if active_counter() is not counter:  # counting paused (e.g. a dense reference pass)
                return
            mask = counter.token_mask
            tokens = int(mask.sum()) if mask is not None else args[0].shape[:-1].numel()
            macs = tokens * mod.in_features * mod.out_features
            counter.add(name, tokens, macs, macs)

        handles.append(matches[0].register_forward_hook(hook))
    for module in model.modules():  # LoRA on a RaNA layer (`training.add_lora`): its product runs on every input
        base = module.base_layer if isinstance(module, LoraLayer) else None  # not get_base_layer: that goes on down
        if isinstance(base, RaNALayer):

            def lora_hook(mod, args, output, name=base.module_name):
                if active_counter() is not counter or mod.disable_adapters or mod.merged:
                    return
                rank = sum(mod.r[a] for a in mod.active_adapters if a in mod.lora_A)
                mask = counter.token_mask
                tokens = int(mask.sum()) if mask is not None else args[0].shape[:-1].numel()
                counter.add(name, 0, 0, tokens * rank * (mod.in_features + mod.out_features))

            handles.append(module.register_forward_hook(lora_hook))
    try:
        with counting(counter):
            yield counter
    finally:
        for handle in handles:
            handle.remove()


def flop_report(counter: FlopCounter, tokens: int) -> dict:
    """`{"dense", "actual", "reduction", "tokens", "per_module"}` (FLOPs = 2 x MACs) from a counter."""
    per_module, dense, actual = {}, 0, 0
    for name, count in counter.modules.items():
        dense += count.dense_macs
        actual += count.actual_macs
        per_module[name] = {"tokens": count.tokens, "dense": 2 * count.dense_macs, "actual": 2 * count.actual_macs}
    return {
        "dense": 2 * dense,
        "actual": 2 * actual,
        "reduction": 1.0 - actual / dense if dense else 0.0,
        "tokens": tokens,
        "per_module": per_module,
    }


@torch.no_grad()
def measure_flops(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
) -> dict:
    """Run `model` on `input_ids` and count the FLOPs of the targeted linears from the masks actually applied.

    Router cost (`B x`) is included; targeted linears that the plan kept dense count as dense; a LoRA adapter on the
    RaNA layers (`training.add_lora`) counts its product.

    Args:
        model: a model with a RaNA adapter (a `PeftModel` or a transformers model that loaded one).
        input_ids: [batch, seq] (or [seq]) token ids.
        attention_mask: optional [batch, seq]; padding positions are not counted.
        batch_size: rows per forward pass.

    Returns:
        `{"dense": int, "actual": int, "reduction": float, "tokens": int, "per_module": {name: {...}}}`, FLOPs
        being 2 x MACs.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with flop_counting(model) as counter:
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                mask = attention_mask[start : start + batch_size].to(device) if attention_mask is not None else None
                counter.token_mask = mask.bool() if mask is not None else None
                model(input_ids=ids, attention_mask=mask)
    finally:
        model.train(was_training)
    tokens = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
    return flop_report(counter, tokens)


class DenseAgreementCallback(TrainerCallback):
    """Adds `compare_to_dense` metrics on held-out chunks to every `Trainer.evaluate()` of a RaNA model.

    The metrics (`{prefix}perplexity`, `kl_to_dense`, `top1_agreement`, `flop_reduction`, ...) are added to the dict
    that `trainer.evaluate()` returns and kept in `history`.

    Args:
        chunks: [num_chunks, seq_len] held-out token ids.
        batch_size: chunks per forward pass.
        prefix: metric name prefix.
    """

    def __init__(self, chunks: torch.Tensor, batch_size: int = 4, prefix: str = "eval_rana_") -> None:
        _check_chunks(chunks)
        self.chunks, self.batch_size, self.prefix = chunks, batch_size, prefix
        self.history: list[dict[str, float]] = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        result = compare_to_dense(model, self.chunks, self.batch_size)
        named = {f"{self.prefix}{key}": value for key, value in result.items()}
        if metrics is not None:
            metrics.update(named)
        self.history.append({"step": state.global_step, **named})
        return control

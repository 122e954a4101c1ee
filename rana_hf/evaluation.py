"""Evaluation: perplexity on held-out token chunks (and, with `measure_flops`, the FLOPs actually spent)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, chunks: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """Perplexity of a causal LM on token chunks (every position after the first is predicted).

    Args:
        model: a causal LM (dense, `PeftModel` or adapted transformers model).
        chunks: [num_chunks, seq_len] token ids, e.g. from `rana_hf.calibration.calibration_chunks`.
        batch_size: chunks per forward pass.
        progress: show a progress bar.

    Returns:
        `exp(mean negative log-likelihood)` over all predicted tokens.
    """
    if chunks.dim() != 2 or chunks.shape[1] < 2:
        raise ValueError(f"chunks must be [num_chunks, seq_len >= 2] token ids, got shape {tuple(chunks.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        batches = range(0, chunks.shape[0], batch_size)
        for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            ids = chunks[start : start + batch_size].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()  # [B, T-1, V]
            targets = ids[:, 1:]
            total_nll += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            )
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)

"""Decode kernels for RaNA layers (Triton), registered as `torch.library` custom ops.

One kernel serves every adapter kind at decode (a few tokens per step): the *input-masked GEMV*
`y[t] = sum_{i : |x[t, i]| >= threshold[i]} x[t, i] * Wt[i, :]`, reading a row of `Wt` (a column of `W`, stored
contiguously) only when some token keeps input `i`. A neuron/input adapter (identity basis) runs it on its input and
its weight; a rank adapter runs it on its codes `B x` and `A` (its threshold is `sqrt(tau)` on `|B x|`); the MLP down
projection can compute its input `act(gate) * up` inside the load. Importing this package never imports Triton or
initialises CUDA: `kernels_available()` says whether the kernel path can run, and the ops fall back to the torch
reference on tensors the kernel does not take (CPU, float32, more than `MAX_KERNEL_TOKENS` tokens).

For prefill and larger batches a second op, `masked_inputs`, masks the input of every input adapter that reads the same
`x` (q/k/v, gate/up) in one launch; cuBLAS then multiplies each.
"""

from .ops import (
    ACT_GELU_TANH,
    ACT_NONE,
    ACT_SILU,
    MAX_KERNEL_TOKENS,
    activation_code,
    kernel_supports,
    kernels_available,
    masked_gemv,
    masked_gemv_reference,
    masked_inputs,
    masked_inputs_reference,
)

__all__ = [
    "ACT_GELU_TANH",
    "ACT_NONE",
    "ACT_SILU",
    "MAX_KERNEL_TOKENS",
    "activation_code",
    "kernel_supports",
    "kernels_available",
    "masked_gemv",
    "masked_gemv_reference",
    "masked_inputs",
    "masked_inputs_reference",
]

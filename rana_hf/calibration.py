"""Calibration: turn calibration data into token chunks, and stream per-input statistics through forward hooks.

Hooks only read activations; no weight is changed and no full activation matrix is kept: each input stream keeps its
second moment `X X^T` (float64) and a bounded random sample of tokens (for thresholds and plan comparison).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .offload import execution_device

logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """Calibration data or activations cannot give valid statistics."""


def _bos_prefix(tokenizer) -> list[int]:
    """The BOS id if the tokenizer puts one in front of text by default (Gemma needs it), else nothing."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def tokenize_texts(texts: Sequence[str], tokenizer) -> list[int]:
    """Concatenate texts into one token stream (EOS between documents when the tokenizer has one)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"calibration texts must be strings, got {type(text).__name__}")
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])  # chunked below
        if eos is not None:
            stream.append(eos)
    return stream


def calibration_chunks(
    calibration,
    tokenizer=None,
    seq_len: int = 512,
    max_tokens: int | None = None,
    text_column: str = "text",
) -> torch.Tensor:
    """Token chunks `[num_chunks, seq_len]` (int64) from texts, a `datasets.Dataset` or token ids.

    Args:
        calibration: a string, a list of strings, a `datasets.Dataset` with a text column, a `[B, T]` tensor of token
            ids, or a list of token-id sequences.
        tokenizer: needed for text; its BOS (if it adds one by default) starts every chunk.
        seq_len: tokens per chunk (BOS included).
        max_tokens: stop after this many tokens.
        text_column: column of a `datasets.Dataset` holding the text.

    Returns:
        int64 tensor of shape [num_chunks, seq_len]; the tail shorter than `seq_len` is dropped.
    """
    prefix: list[int] = []
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, Sequence) and len(calibration) == 0:
        raise CalibrationError("calibration is empty: pass texts (with a tokenizer) or token ids")
    if hasattr(calibration, "column_names") and hasattr(calibration, "__getitem__"):  # datasets.Dataset
        if text_column not in calibration.column_names:
            raise CalibrationError(
                f"the calibration dataset has no {text_column!r} column (columns: {calibration.column_names}); "
                "pass text_column=..."
            )
        calibration = list(calibration[text_column])
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int32, torch.int64) or calibration.dim() != 2:
            raise CalibrationError(f"a calibration tensor must be [batch, seq] token ids, got {calibration.dtype}")
        sequences = [row.tolist() for row in calibration]
        stream = [token for row in sequences for token in row]
    elif isinstance(calibration, Sequence) and calibration and all(isinstance(t, str) for t in calibration):
        if tokenizer is None:
            raise CalibrationError("calibration text needs a tokenizer: compress(..., tokenizer=tokenizer)")
        prefix = _bos_prefix(tokenizer)
        stream = tokenize_texts(calibration, tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", None) or ())
        if not any(text.strip() for text in calibration) or all(token in special for token in stream):
            raise CalibrationError(
                "the calibration text has no content (only whitespace or special tokens such as end-of-text): pass "
                "real text of the kind the model will see"
            )
    elif isinstance(calibration, Sequence) and calibration and all(isinstance(t, Sequence) for t in calibration):
        stream = [int(token) for row in calibration for token in row]
    else:
        raise CalibrationError(
            "calibration must be a list of strings, a datasets.Dataset with a text column, a [batch, seq] tensor of "
            f"token ids or a list of token-id lists; got {type(calibration).__name__}"
        )
    body = seq_len - len(prefix)
    if body <= 0:
        raise CalibrationError(f"calibration_seq_len must exceed the BOS prefix, got {seq_len}")
    num_chunks = len(stream) // body
    if max_tokens is not None:
        num_chunks = min(num_chunks, max(1, max_tokens // seq_len))
    chunks = [prefix + stream[i * body : (i + 1) * body] for i in range(num_chunks)]
    if not chunks:
        return torch.empty(0, seq_len, dtype=torch.long)
    return torch.tensor(chunks, dtype=torch.long)


@dataclass
class StreamStats:
    """Statistics of one input stream (one tensor read by one or more linears).

    Attributes:
        in_features: width `n` of the input.
        covariance: `X X^T`, [n, n] float64, or None when not requested.
        sample: random sample of input tokens, [S, n] float32, on CPU.
        tokens: number of tokens seen.
    """

    in_features: int
    covariance: torch.Tensor | None = None
    sample: list[torch.Tensor] | torch.Tensor = field(default_factory=list)
    tokens: int = 0


class StatsCollector:
    """Forward pre-hooks that accumulate `StreamStats` for named input streams.

    Args:
        streams: stream name -> (module whose input is the stream, whether to accumulate the second moment).
        expected_tokens: tokens the calibration will run, to set the sampling rate.
        sample_tokens: tokens to keep per stream.
        seed: seed of the token sampling.
    """

    def __init__(
        self,
        streams: dict[str, tuple[nn.Module, bool]],
        expected_tokens: int,
        sample_tokens: int,
        seed: int = 0,
    ) -> None:
        self.streams = streams
        self.rate = min(1.0, 1.25 * sample_tokens / max(expected_tokens, 1))
        self.sample_tokens = sample_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.stats: dict[str, StreamStats] = {}
        self._handles = []

    def __enter__(self) -> StatsCollector:
        for name, (module, want_cov) in self.streams.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name, want_cov)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, name: str, want_cov: bool):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                raise CalibrationError(f"cannot read the input of {name!r}: expected a tensor argument")
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, n]
            if not bool(torch.isfinite(flat).all()):
                raise CalibrationError(
                    f"non-finite activations (NaN/inf) at the input of {name!r} during calibration. The model "
                    "overflows on this data in its dtype: calibrate in float32 (or bfloat16), or check the weights."
                )
            stats = self.stats.get(name)
            if stats is None:
                stats = self.stats[name] = StreamStats(in_features=flat.shape[1])
                if want_cov:
                    stats.covariance = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=x.device)
            if want_cov:
                stats.covariance += (flat.T @ flat).double()
            stats.tokens += flat.shape[0]
            picks = torch.rand(flat.shape[0], generator=self.generator) < self.rate
            if bool(picks.any()):
                stats.sample.append(flat[picks.to(flat.device)].cpu())

        return hook

    def offload(self, names) -> None:
        """Move the second moments of `names` to the CPU (a finished layer's statistics leave the accelerator)."""
        for name in names:
            stats = self.stats.get(name)
            if stats is not None and stats.covariance is not None:
                stats.covariance = stats.covariance.cpu()

    def finish(self) -> dict[str, StreamStats]:
        """Concatenate and trim the samples; returns the statistics per stream."""
        for stats in self.stats.values():
            sample = torch.cat(stats.sample) if stats.sample else torch.empty(0, stats.in_features)
            if sample.shape[0] > self.sample_tokens:
                keep = torch.randperm(sample.shape[0], generator=self.generator)[: self.sample_tokens]
                sample = sample[keep.sort().values]
            stats.sample = sample
        return self.stats


class _Stop(Exception):
    """Raised by a probe to end a forward pass early."""


class _Probe(nn.Module):
    """Stands in for one decoder layer: records what the model passes to it and returns a given hidden state.

    Unknown attributes are read from the real layer (models look up e.g. `attention_type` on their layers).
    """

    def __init__(self, layer: nn.Module, index: int, sweep: LayerSweep) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_sweep", sweep)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args, **kwargs):
        return self._sweep._probe(self._index, args, kwargs)


class LayerSweep:
    """Runs a model's decoder layers one at a time, each over every batch, instead of the whole model per batch.

    This is how a model bigger than the accelerator (loaded with `device_map="auto"` and offloaded to CPU or disk)
    is calibrated: only one layer and the statistics of its own linears are on the accelerator at a time; the hidden
    states between layers wait on the CPU. The inputs of each layer (masks, rotary embeddings, ...) are recorded from
    the model's own forward with every layer replaced by a probe, so no layer is computed twice and nothing
    architecture-specific is assumed beyond "a `nn.ModuleList` of layers called in order".

    Args:
        model: the model (a causal LM or its decoder).
        modules: modules that must live inside the swept layers (hooked linears).
    """

    def __init__(self, model: nn.Module, modules: Sequence[nn.Module] = ()) -> None:
        self.model = model
        self.owner, self.attribute, self.layers = self._find_layers(model, modules)
        self._record: dict | None = None

    @staticmethod
    def _find_layers(model: nn.Module, modules: Sequence[nn.Module]):
        best = None
        for name, candidate in model.named_modules():
            if not isinstance(candidate, nn.ModuleList) or len(candidate) == 0:
                continue
            if best is None or len(candidate) > len(best[1]):
                best = (name, candidate)
        if best is None:
            raise CalibrationError("layer-by-layer calibration needs the decoder layers in an nn.ModuleList")
        name, layers = best
        inside = {id(m) for layer in layers for m in layer.modules()}
        outside = [m for m in modules if id(m) not in inside]
        if outside:
            raise CalibrationError(
                f"layer-by-layer calibration covers the modules inside {name or 'the model'}'s layers only; "
                f"{len(outside)} targeted module(s) lie outside. Calibrate with layer_by_layer=False."
            )
        parent_name, _, attribute = name.rpartition(".")
        return model.get_submodule(parent_name), attribute, layers

    @contextlib.contextmanager
    def _probing(self, record: dict):
        probes = nn.ModuleList(_Probe(layer, i, self) for i, layer in enumerate(self.layers))
        self._record = record
        setattr(self.owner, self.attribute, probes)
        try:
            yield
        finally:
            setattr(self.owner, self.attribute, self.layers)
            self._record = None

    def _probe(self, index: int, args, kwargs):
        record = self._record
        if len(args) > 1:
            raise CalibrationError("layer-by-layer calibration needs layers called as layer(hidden, **kwargs)")
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if index == 0:
            record["hidden"] = hidden
        record.setdefault("kwargs", []).append(kwargs)
        if "replay" in record and index == len(self.layers) - 1:
            return record["replay"]
        if record.get("stop_after") == index:
            raise _Stop
        return hidden

    def capture(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """The first layer's input for `input_ids` and the keyword arguments the model passes to every layer.

        Only the embeddings (and whatever the model computes before its layers) run.
        """
        record = {"stop_after": len(self.layers) - 1}
        backbone = self.owner
        with self._probing(record), torch.no_grad():
            try:
                backbone(input_ids=input_ids, use_cache=False)
            except _Stop:
                pass
        return record["hidden"], record["kwargs"]

    def run_layer(self, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """One layer on one batch; the output hidden state (the first element when the layer returns a tuple)."""
        layer = self.layers[index]
        output = layer(hidden.to(execution_device(layer)), **kwargs)
        return output[0] if isinstance(output, tuple) else output

    def replay_logits(self, input_ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits with `last_hidden` as the last layer's output (the layers themselves do not run)."""
        record = {"replay": last_hidden}
        with self._probing(record):
            return self.model(input_ids=input_ids, use_cache=False).logits


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    chunks: torch.Tensor,
    streams: dict[str, tuple[nn.Module, bool]],
    sample_tokens: int,
    batch_size: int = 8,
    seed: int = 0,
    layer_by_layer: bool = False,
    desc: str = "RaNA calibration statistics",
) -> dict[str, StreamStats]:
    """Run the model over calibration chunks with hooks on every stream; the weights are not changed.

    The decoder stack is run without the LM head (the head's output is not needed for statistics). With
    `layer_by_layer`, each decoder layer runs over all batches before the next one (`LayerSweep`), and each finished
    layer's second moments move to the CPU: only one layer's statistics are on the accelerator at a time.
    """
    device = next(model.parameters()).device
    backbone = getattr(model, "base_model", model)
    collector = StatsCollector(streams, expected_tokens=chunks.numel(), sample_tokens=sample_tokens, seed=seed)
    batches = [chunks[start : start + batch_size] for start in range(0, chunks.shape[0], batch_size)]
    was_training = model.training
    model.eval()
    try:
        with collector:
            if layer_by_layer:
                _sweep_stats(model, batches, streams, collector, device, desc)
            else:
                for batch in tqdm(batches, desc=desc, unit="batch"):
                    backbone(input_ids=batch.to(device), use_cache=False)
    finally:
        model.train(was_training)
    return collector.finish()


def _sweep_stats(model, batches, streams, collector: StatsCollector, device, desc: str) -> None:
    sweep = LayerSweep(model, [module for module, _ in streams.values()])
    inputs, kwargs = [], {}
    for batch in batches:
        hidden, layer_kwargs = sweep.capture(batch.to(device))
        inputs.append(hidden.cpu())
        kwargs.setdefault(batch.shape[0], layer_kwargs)  # masks and positions depend on the batch shape only
    for index in tqdm(range(len(sweep.layers)), desc=f"{desc} (layer by layer)", unit="layer"):
        members = {id(m) for m in sweep.layers[index].modules()}
        for b, hidden in enumerate(inputs):
            inputs[b] = sweep.run_layer(index, hidden, kwargs[hidden.shape[0]][index]).cpu()
        collector.offload(name for name, (module, _) in streams.items() if id(module) in members)


def collect_output_fisher(
    model: nn.Module,
    chunks: torch.Tensor,
    modules: dict[str, nn.Module],
    batch_size: int = 1,
    layer_by_layer: bool = False,
) -> dict[str, float]:
    """Mean squared gradient of the language-model loss at each module's output, per token and output channel.

    This is the diagonal Fisher (empirical, isotropic over channels) that turns a module's squared output error into
    an estimated loss increase, `0.5 * fisher * ||e||^2` per token: the end-to-end signal that ranks layers for global
    allocation. Runs forward and backward passes (summed token losses) with every parameter frozen; no weight changes.

    Args:
        model: a causal LM returning `.logits`.
        chunks: [B, T] calibration token ids.
        modules: name -> module whose output gradient to measure.
        batch_size: chunks per pass.
        layer_by_layer: run the backward pass one decoder layer at a time (`LayerSweep`): the layer inputs are kept
            on the CPU and each layer is recomputed with gradients just before its backward step, so only one layer's
            activations (and weights, when offloaded) are on the accelerator at a time.

    Returns:
        name -> `sum_t ||dL/dy_t||^2 / (tokens * out_features)`.
    """
    device = next(model.parameters()).device
    sums = {name: 0.0 for name in modules}
    counts = {name: 0 for name in modules}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return

            def grad_hook(grad):
                sums[name] += float(grad.detach().float().pow(2).sum(dtype=torch.float64))
                counts[name] += grad.numel()

            output.register_hook(grad_hook)

        return hook

    def embedding_hook(module, args, output):
        return output.detach().requires_grad_(True)

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    if not layer_by_layer:
        handles.append(model.get_input_embeddings().register_forward_hook(embedding_hook))
    handles.extend(module.register_forward_hook(make_hook(name)) for name, module in modules.items())
    sweep = LayerSweep(model, list(modules.values())) if layer_by_layer else None
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, chunks.shape[0], batch_size), desc="RaNA loss gradients", unit="batch"):
            ids = chunks[start : start + batch_size].to(device)
            if sweep is None:
                with torch.enable_grad():
                    _summed_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
            else:
                _sweep_backward(sweep, ids)
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)
        model.train(was_training)
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        raise CalibrationError(f"no loss gradient reached {missing[:3]}...: is the model's output built from them?")
    return {name: sums[name] / counts[name] for name in modules}


def _summed_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = logits[:, :-1].float()  # [B, T-1, V]
    targets = ids[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum")


def _sweep_backward(sweep: LayerSweep, ids: torch.Tensor) -> None:
    """Backward of the summed loss of `ids`, one layer at a time (activation checkpointing at layer boundaries)."""
    with torch.no_grad():
        hidden, kwargs = sweep.capture(ids)
        boundaries = [hidden.cpu()]
        for index in range(len(sweep.layers)):
            boundaries.append(sweep.run_layer(index, boundaries[-1], kwargs[index]).cpu())
    with torch.enable_grad():
        last = boundaries[-1].to(hidden.device).requires_grad_(True)
        _summed_loss(sweep.replay_logits(ids, last), ids).backward()
        grad = last.grad
        for index in reversed(range(len(sweep.layers))):
            layer = sweep.layers[index]
            inputs = boundaries[index].to(execution_device(layer)).requires_grad_(True)
            output = sweep.run_layer(index, inputs, kwargs[index])
            output.backward(grad.to(output.device))
            grad = inputs.grad

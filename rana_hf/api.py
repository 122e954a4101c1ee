"""`compress` and `measure_flops`: calibrate -> allocate -> inject, and count what the adapted model really does."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from . import allocation, decomposition, planning
from .calibration import (
    CalibrationError,
    calibration_chunks,
    collect_output_fisher,
    collect_stats,
    is_offloaded,
    module_weight,
)
from .config import ALLOCATIONS, DEFAULT_TARGET_MODULES, METHODS, MLP_DOWN, MLP_GATE, MLP_UP, QKV_NAMES, RaNAConfig
from .evaluation import compare_to_dense
from .layers import MEMBER, OWN, FlopCounter, RaNALayer, RaNALinear, active_counter, counting
from .tuner import DENSE, GATED, NEURON, NOT_INJECTED

logger = logging.getLogger(__name__)

QKV, MLP, LINEAR = "qkv", "mlp", "linear"


@dataclass
class _Group:
    """Targeted linears planned together: q/k/v sharing one router, a gated MLP, or one linear."""

    kind: str  # QKV, MLP, LINEAR or NEURON
    names: list[str]  # qkv: [q, k, v]; mlp: [gate, up, down]; otherwise [name]

    @property
    def stream(self) -> str:
        return self.names[0]


def resolve_targets(model: nn.Module, config: RaNAConfig) -> list[str]:
    """Names of the `nn.Linear` modules the config targets; a clear error if there are none."""
    target_modules = config.target_modules
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        target_modules = DEFAULT_TARGET_MODULES.get(model_type)
        if target_modules is None:
            raise ValueError(
                f"RaNA has no default target modules for model type {model_type!r}. Pass "
                "RaNAConfig(target_modules=[...]) with the names of the nn.Linear modules to adapt."
            )
    probe = copy.copy(config)
    probe.target_modules = target_modules
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and check_target_module_exists(probe, name)
    ]
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matches no nn.Linear in this model. Check the module names "
            "(e.g. `[n for n, m in model.named_modules()]`)."
        )
    return names


def group_targets(model: nn.Module, targets: list[str], fuse_qkv: bool) -> list[_Group]:
    """Group targeted linears by the input they read (see `_Group`)."""
    modules = dict(model.named_modules())
    target_set = set(targets)
    groups, done = [], set()
    for name in targets:
        if name in done:
            continue
        parent, _, leaf = name.rpartition(".")
        siblings = [f"{parent}.{n}" if parent else n for n in QKV_NAMES]
        mlp_names = [f"{parent}.{n}" if parent else n for n in (MLP_GATE, MLP_UP, MLP_DOWN)]
        activation = getattr(modules.get(parent), "act_fn", None)
        if fuse_qkv and leaf in QKV_NAMES and all(s in target_set for s in siblings):
            groups.append(_Group(QKV, siblings))
            done.update(siblings)
        elif leaf in (MLP_GATE, MLP_UP, MLP_DOWN) and all(s in target_set for s in mlp_names) and callable(activation):
            groups.append(_Group(MLP, mlp_names))
            done.update(mlp_names)
        elif leaf == MLP_DOWN and callable(activation):
            groups.append(_Group(NEURON, [name]))
            done.add(name)
        else:
            groups.append(_Group(LINEAR, [name]))
            done.add(name)
    return groups


def _fill(model: nn.Module, fills: dict[str, dict[str, torch.Tensor]], adapter_name: str) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, tensors in fills.items():
            layer = modules[name]
            for attr, value in tensors.items():
                container = getattr(layer, attr)
                target = container[adapter_name]
                if target.shape != value.shape:
                    raise RuntimeError(f"internal: {name}.{attr} has shape {tuple(target.shape)}, got {value.shape}")
                target.copy_(value.to(device=target.device, dtype=target.dtype))


@dataclass
class Calibration:
    """One calibration pass of a model, reusable by `compress` for several methods and budgets.

    Attributes:
        targets: targeted module names.
        groups: the targets grouped by shared input.
        chunks: calibration token chunks `[B, T]` (the refit passes reuse their first `refit_tokens`).
        stats: input statistics per stream.
        fisher: mean squared loss gradient at each targeted module's output (None unless global allocation).
        methods: methods the statistics serve.
        seconds: time spent.
        cache: bases and error curves computed so far (shared by every `compress` that uses this calibration).
    """

    targets: list[str]
    groups: list[_Group]
    chunks: torch.Tensor
    stats: dict
    fisher: dict[str, float] | None
    methods: tuple[str, ...]
    fuse_qkv: bool
    seconds: float
    cache: dict = field(default_factory=dict)


def calibrate(
    model: nn.Module,
    config: RaNAConfig | None = None,
    calibration=None,
    tokenizer=None,
    *,
    methods: tuple[str, ...] | list[str] | None = None,
    fisher: bool | None = None,
    text_column: str = "text",
    seed: int = 0,
) -> Calibration:
    """Run the calibration pass once: input statistics of every stream the methods need (and, for global allocation,
    the loss gradients at the targeted modules). No weight is changed.

    Args:
        model: the base model.
        config: `RaNAConfig` whose targets, calibration sizes and method are used (default `RaNAConfig()`).
        calibration: texts, a `datasets.Dataset`, a `[B, T]` tensor or token-id lists.
        tokenizer: required for text.
        methods: methods the statistics must serve (default: `config.method`); `compress(..., statistics=...)` then
            accepts any of them.
        fisher: collect loss gradients (default: when `config.allocation == "global"`).
        text_column: text column of a `datasets.Dataset`.
        seed: seed of the token sampling.

    Returns:
        A `Calibration`.
    """
    config = config if config is not None else RaNAConfig()
    methods = tuple(methods) if methods is not None else (config.method,)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    fisher = config.allocation == "global" if fisher is None else fisher
    if calibration is None:
        raise ValueError("calibration data is needed: a list of strings, a Dataset, or token ids")
    started = time.perf_counter()
    targets = resolve_targets(model, config)
    modules = dict(model.named_modules())
    for name in targets:
        if not bool(torch.isfinite(module_weight(modules[name])).all()):
            raise ValueError(f"the weight of {name!r} has NaN/inf values; RaNA cannot calibrate a broken checkpoint")
    groups = group_targets(model, targets, config.fuse_qkv)
    chunks = calibration_chunks(
        calibration,
        tokenizer,
        seq_len=config.calibration_seq_len,
        max_tokens=config.calibration_tokens,
        text_column=text_column,
    )
    streams = {}
    for method in methods:
        for allocation_mode in ALLOCATIONS:
            for name, (module, want) in planning.streams_for(
                planning.make_units(method, allocation_mode, groups, modules), modules
            ).items():
                streams[name] = (module, want or streams.get(name, (None, False))[1])
    widths = [module.in_features for module, want in streams.values() if want]
    needed = max([config.min_calibration_tokens, *widths])
    if chunks.numel() < needed:
        raise CalibrationError(
            f"calibration gives {chunks.numel()} tokens in {chunks.shape[0]} chunks of {config.calibration_seq_len}; "
            f"RaNA needs at least {needed} tokens here (the input second moment of a {max(widths, default=0)}-"
            "wide layer, and stable thresholds). Pass more text, or a smaller calibration_seq_len."
        )
    if chunks.numel() < config.calibration_tokens:
        logger.warning(
            "calibration has %d tokens, fewer than calibration_tokens=%d", chunks.numel(), config.calibration_tokens
        )
    sweep = _layer_by_layer(model, config)
    stats = collect_stats(
        model,
        chunks,
        streams,
        config.threshold_sample_tokens,
        batch_size=config.calibration_batch_size,
        seed=seed,
        layer_by_layer=sweep,
    )
    gradients = None
    if fisher:
        fisher_chunks = chunks[: max(1, config.fisher_tokens // config.calibration_seq_len)]
        gradients = collect_output_fisher(
            model, fisher_chunks, {name: modules[name] for name in targets}, layer_by_layer=sweep
        )
    return Calibration(
        targets=targets,
        groups=groups,
        chunks=chunks,
        stats=stats,
        fisher=gradients,
        methods=methods,
        fuse_qkv=config.fuse_qkv,
        seconds=time.perf_counter() - started,
    )


def compress(
    model: nn.Module,
    config: RaNAConfig | None = None,
    calibration=None,
    tokenizer=None,
    *,
    statistics: Calibration | None = None,
    adapter_name: str = "default",
    text_column: str = "text",
    seed: int = 0,
) -> PeftModel:
    """Calibrate RaNA adapters on `calibration` to the FLOP budget of `config` and inject them.

    Everything is checked and computed before the model is changed; the returned `PeftModel` wraps `model` (which,
    as with `peft.get_peft_model`, is modified in place only once calibration has succeeded).

    Args:
        model: a transformers causal LM (or any module whose targeted linears are `nn.Linear`).
        config: the `RaNAConfig` (default `RaNAConfig()`); it is copied, not changed.
        calibration: a list of strings, a `datasets.Dataset` with a text column, a `[B, T]` tensor or a list of
            token-id lists.
        tokenizer: required for text.
        statistics: a `Calibration` from `rana_hf.calibrate` on this model, to plan without a new calibration pass
            (then `calibration` is not needed).
        adapter_name: PEFT adapter name.
        text_column: text column of a `datasets.Dataset`.
        seed: seed of the token sampling used for thresholds.

    Returns:
        A `peft.PeftModel` in eval mode; `model.peft_config[adapter_name].plan` holds the per-module plan.
    """
    if isinstance(model, PeftModel) or any(isinstance(m, RaNALayer) for m in model.modules()):
        raise ValueError("compress expects a base model without RaNA/PEFT adapters; unload the adapter first")
    config = copy.deepcopy(config) if config is not None else RaNAConfig()
    if not isinstance(config, RaNAConfig):
        raise TypeError(f"config must be a RaNAConfig, got {type(config).__name__}")
    if getattr(getattr(model, "hf_quantizer", None), "quantization_config", None) is not None:
        logger.warning(
            "The base model was loaded with a quantization config (e.g. from a GGUF file): the saved adapter names "
            "%r as its base, which `from_pretrained` may not load the same way. Save the dequantized base with "
            "`save_pretrained` and compress that (rana_hf.real_models does this for its models).",
            getattr(model, "name_or_path", None),
        )
    started = time.perf_counter()
    if statistics is None:
        if calibration is None:
            raise ValueError("compress needs calibration data: a list of strings, a Dataset, or token ids")
        statistics = calibrate(model, config, calibration, tokenizer, text_column=text_column, seed=seed)
    else:
        _check_statistics(model, config, statistics)
    calibrated = time.perf_counter()

    modules = dict(model.named_modules())
    units = planning.make_units(config.method, config.allocation, statistics.groups, modules)
    planner = planning.Planner(
        modules,
        statistics.stats,
        statistics.fisher,
        balance_qkv=config.balance_qkv,
        no_larger_than_dense=config.no_larger_than_dense,
        cache=statistics.cache,
    )
    with torch.no_grad():
        if config.method == "auto":
            result = _auto_plan(model, config, statistics, planner, units, adapter_name)
        else:
            result = planning.plan_units(planner, units, 1.0 - config.flop_reduction, config.allocation)
    plan, fills, expected = result.plan, result.fills, result.expected_keep
    adapted = [name for name, entry in plan.items() if entry["kind"] not in NOT_INJECTED]
    if not adapted:
        raise ValueError(
            f"no targeted module has a plan cheaper than dense at flop_reduction={config.flop_reduction}; "
            "nothing to adapt. Raise flop_reduction."
        )
    config.plan = plan
    config.target_modules = adapted
    if config.task_type is None and hasattr(model, "generate"):
        config.task_type = "CAUSAL_LM"

    allocated = time.perf_counter()
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    try:
        _fill(peft_model.base_model.model, fills, adapter_name)
        chunks = statistics.chunks
        refit_chunks = chunks[: max(1, config.refit_tokens // chunks.shape[1])]
        for _ in range(config.refit_passes if config.budget_mode == "threshold" else 0):
            refit_thresholds(peft_model, refit_chunks, seed=seed)
    except Exception:
        peft_model.base_model.unload()
        raise
    peft_model.eval()
    logger.info(
        "RaNA (%s, %s): %d of %d targeted linears adapted; expected FLOP reduction %.3f (target %.3f); statistics "
        "%.1fs, allocation %.1fs, threshold refit %.1fs",
        config.method,
        config.allocation,
        len(adapted),
        len(plan),
        1 - expected,
        config.flop_reduction,
        calibrated - started,
        allocated - calibrated,
        time.perf_counter() - allocated,
    )
    return peft_model


AUTO_TRIAL_KINDS = (planning.MAGNITUDE, planning.NEURON, planning.RANK)


def _auto_plan(model, config, statistics, planner, units, adapter_name) -> planning.PlanResult:
    """`auto`: measure how much each adapter kind really costs end to end per unit of estimated loss, then re-allocate.

    Local output error ranks kinds badly (measured on SmolLM2: a rank adapter's error costs more loss per unit of
    energy than an input mask's, and magnitude masks beat the locally optimal weighted ones). So: plan each kind
    alone, run it on calibration tokens with its thresholds refit (so every plan spends its planned FLOPs), measure its
    KL divergence to the dense model there, set the kind's scale to measured / estimated, allocate again with the
    scaled curves, and keep the plan with the lowest measured KL (the single-kind plans included). KL to dense rather
    than the NLL increase: it is what a plan changes, without the noise of the text's own surprisal. Tried and
    dropped: per-layer scales from each layer's plan injected alone (single-layer losses do not add up; on SmolLM2
    that plan lost 0.46 nats instead of 0.18).
    """
    keep = 1.0 - config.flop_reduction
    seq_len = statistics.chunks.shape[1]
    check = statistics.chunks[-max(1, config.auto_check_tokens // seq_len) :]
    batch_size = config.calibration_batch_size
    trials, scales = [], {}
    for kind in AUTO_TRIAL_KINDS:
        if not any(kind in unit.kinds for unit in units):
            continue
        result = planning.plan_units(planner, planning.restrict(units, kind), keep, config.allocation)
        loss = _trial_kl(model, config, result, check, adapter_name, batch_size)
        estimated = result.estimated_loss.get(kind, 0.0)
        if estimated > 0:
            scales[kind] = max(loss, 1e-9) / estimated
        trials.append((loss, kind, result))
    planner.kind_scale = scales
    try:
        mixed = planning.plan_units(planner, units, keep, config.allocation)
        trials.append((_trial_kl(model, config, mixed, check, adapter_name, batch_size), "mixed", mixed))
    finally:
        planner.kind_scale = {}
    loss, label, best = min(trials, key=lambda trial: trial[0])
    logger.info(
        "auto: KL to dense on %d check tokens: %s; measured/estimated per kind %s; chose %s",
        check.numel(),
        ", ".join(f"{name} {value:.4f}" for value, name, _ in trials),
        {kind: round(scale, 3) for kind, scale in scales.items()},
        label,
    )
    return best


def _trial_kl(model, config, result, chunks, adapter_name, batch_size) -> float:
    """Mean KL(dense || adapted) with a plan injected and its thresholds refit on `chunks`; the model is restored."""
    trial = copy.deepcopy(config)
    trial.plan = result.plan
    trial.target_modules = [name for name, entry in result.plan.items() if entry["kind"] not in NOT_INJECTED]
    peft_model = get_peft_model(model, trial, adapter_name=adapter_name)
    try:
        _fill(peft_model.base_model.model, result.fills, adapter_name)
        if config.budget_mode == "threshold":  # compare plans at their planned FLOPs, as they will ship
            refit_thresholds(peft_model, chunks)
        return compare_to_dense(peft_model, chunks, batch_size, count_flops=False)["kl_to_dense"]
    finally:
        peft_model.base_model.unload()


def _layer_by_layer(model: nn.Module, config: RaNAConfig) -> bool:
    return is_offloaded(model) if config.layer_by_layer is None else bool(config.layer_by_layer)


def _check_statistics(model: nn.Module, config: RaNAConfig, statistics: Calibration) -> None:
    if not isinstance(statistics, Calibration):
        raise TypeError(f"statistics must come from rana_hf.calibrate, got {type(statistics).__name__}")
    if resolve_targets(model, config) != statistics.targets or config.fuse_qkv != statistics.fuse_qkv:
        raise ValueError(
            "statistics were collected for other target modules (or fuse_qkv); calibrate again with this config"
        )
    if config.method not in statistics.methods:
        raise ValueError(
            f"statistics were collected for methods {statistics.methods}, not {config.method!r}: "
            f"calibrate(..., methods=[..., {config.method!r}])"
        )
    if config.allocation == "global" and statistics.fisher is None:
        raise ValueError("global allocation needs loss gradients: calibrate(..., fisher=True)")


def refit_thresholds(
    model: nn.Module,
    calibration,
    tokenizer=None,
    *,
    max_tokens: int | None = None,
    seed: int = 0,
    text_column: str = "text",
) -> dict[str, float]:
    """Re-fit every threshold so each adapted module keeps its planned number of components on `calibration`.

    Inputs of deeper layers move when upstream layers are approximated (or fine-tuned), which moves the FLOPs a fixed
    threshold spends. This runs the adapted model on calibration tokens, samples each router's actual input, and sets
    the threshold to the quantile that meets the module's planned mean kept count (`plan[...]["mean_kept"]` or
    `["keep_fraction"]`). Ranks and weights are unchanged. One pass corrects most of the shift; a second pass corrects
    what the first one moved downstream.

    Args:
        model: a model with a RaNA adapter.
        calibration: token chunks `[B, T]`, or anything `compress` accepts (then `tokenizer` is needed for text).
        tokenizer: tokenizer for text calibration.
        max_tokens: cap on tokens used.
        seed: seed of the token sampling.
        text_column: text column of a `datasets.Dataset`.

    Returns:
        The new thresholds (scalar ones; per-neuron thresholds are summarised by their `tau`), by module name.
    """
    config = _rana_config(model)
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        chunks = calibration if max_tokens is None else calibration[: max(1, max_tokens // calibration.shape[1])]
    else:
        chunks = calibration_chunks(
            calibration, tokenizer, config.calibration_seq_len, max_tokens or config.refit_tokens, text_column
        )
    layers = {
        layer.module_name: layer
        for layer in model.modules()
        if isinstance(layer, RaNALayer) and getattr(layer, "role", OWN) != MEMBER
    }
    streams = {name: (layer, False) for name, layer in layers.items()}
    stats = collect_stats(
        model,
        chunks,
        streams,
        config.threshold_sample_tokens,
        config.calibration_batch_size,
        seed,
        layer_by_layer=_layer_by_layer(model, config),
    )
    thresholds = {}
    with torch.no_grad():
        for name, layer in layers.items():
            entry = config.plan[name]
            adapter_name = layer._active()
            sample = stats[name].sample.to(layer.rana_hf_threshold[layer._active()].device)
            container = layer.rana_hf_threshold[adapter_name]
            if entry["kind"] == NEURON:
                norms = decomposition.column_norms(module_weight(layer.base_layer)).to(sample.device)
                if entry.get("importance", "weighted") == "weighted":
                    tau = allocation.neuron_threshold(sample.abs() * norms, entry["keep_fraction"])
                    new = allocation.per_neuron_thresholds(tau, norms)
                else:
                    tau = allocation.neuron_threshold(sample.abs(), entry["keep_fraction"])
                    new = torch.full_like(norms, tau)
            elif entry["kind"] == GATED:
                weight = module_weight(layer.base_layer)
                gate = layer._activation[0](sample.to(weight.device, weight.dtype) @ weight.T).float()
                tau = allocation.neuron_threshold(gate.abs(), entry["keep_fraction"])
                new = torch.tensor(tau)
            else:
                down = layer.rana_hf_B[adapter_name]
                codes = sample.to(down.device) @ down.float().T  # [S, r]
                tau = allocation.neuron_threshold(codes.abs(), entry["mean_kept"] / max(down.shape[0], 1))
                new = torch.tensor(tau)
            container.copy_(new.to(device=container.device, dtype=container.dtype))
            thresholds[name] = tau
    return thresholds


def _rana_config(model: nn.Module) -> RaNAConfig:
    configs = getattr(model, "peft_config", None) or {}
    for config in configs.values():
        if isinstance(config, RaNAConfig):
            return config
    stacked = getattr(model, "rana_hf_config", None)  # under a LoRA adapter (training.add_lora)
    if isinstance(stacked, RaNAConfig):
        return stacked
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if hasattr(quantization, "to_rana_config"):  # loaded from a standalone checkpoint (integrations.standalone)
        return quantization.to_rana_config()
    raise ValueError("this model has no RaNA adapter (no RaNAConfig in model.peft_config)")


@contextlib.contextmanager
def flop_counting(model: nn.Module) -> Iterator[FlopCounter]:
    """Count the FLOPs of the targeted linears of `model` while the block runs, from the masks actually applied.

    RaNA layers count themselves; targeted linears that the plan kept dense are counted by hooks. Set
    `counter.token_mask` ([batch, seq] bool) before a forward pass to exclude padding.
    """
    config = _rana_config(model)
    modules = dict(model.named_modules())
    counter = FlopCounter()
    handles = []
    for name, entry in config.plan.items():
        if entry["kind"] != DENSE:  # followers of a CATS gate are counted by the gate layer
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

    Router cost (`B x`) is included; targeted linears that the plan kept dense count as dense.

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


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters needed to run the adapted model in inference mode, against the dense model.

    A rank adapter replaces its weight by `A` (and, for the router's owner, `B`); neuron adapters, CATS gates and
    dense entries run on the original weight. Biases and all other parameters are counted once.

    Returns:
        `{"dense": ..., "adapted": ...}` parameter counts of the whole model.
    """
    seen, dense = set(), 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            dense += parameter.numel()
    adapter_params = sum(
        p.numel() for name, p in model.named_parameters() if "rana_hf_A" in name or "rana_hf_B" in name
    )
    replaced = sum(m.base_layer.weight.numel() for m in model.modules() if isinstance(m, RaNALinear))
    base = dense - adapter_params  # the model's own parameters (adapters excluded)
    return {"dense": base, "adapted": base - replaced + adapter_params}

"""`calibrate` and `compress`: statistics -> plan (`planning`) -> inject and refit; `refit_thresholds` afterwards.

The flow of `compress`: `calibrate` resolves the targets and groups them by input (`planning`), collects the input
statistics the method's adapter kinds need and, for global allocation, the loss gradients (`calibration`); the
planner asks every kind for its options and allocates the budget (`planning`, `allocation`); the plan (JSON) goes into
the `RaNAConfig` and PEFT injects the layers it names (`tuner`), which are filled with the planned tensors and whose
thresholds are refit on the adapted model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from . import planning, rotation
from .adapters import METHODS
from .calibration import CalibrationError, calibration_chunks, collect_output_fisher, collect_stats
from .config import ALLOCATIONS, FORMAT_VERSION, FORMAT_VERSION_UNROTATED, RaNAConfig
from .evaluation import compare_to_dense
from .hub import use_rana_push_to_hub
from .layers import RaNALayer
from .offload import is_offloaded, module_weight
from .tuner import base_fingerprint, injected, rana_config

logger = logging.getLogger(__name__)


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
        residual_rotation: `RaNAConfig.residual_rotation` the statistics were collected under.
        bases: the rotated stream's bases (`rotation.bases`), None without a residual rotation.
    """

    targets: list[str]
    groups: list[planning.Group]
    chunks: torch.Tensor
    stats: dict
    fisher: dict[str, float] | None
    methods: tuple[str, ...]
    fuse_qkv: bool
    seconds: float
    cache: dict = field(default_factory=dict)
    residual_rotation: str | None = None
    bases: list[torch.Tensor] | None = None


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
        raise ValueError(f"unknown methods {unknown}; choose from {tuple(METHODS)}")
    fisher = config.allocation == "global" if fisher is None else fisher
    if calibration is None:
        raise ValueError("calibration data is needed: a list of strings, a Dataset, or token ids")
    started = time.perf_counter()
    targets = planning.resolve_targets(model, config)
    modules = dict(model.named_modules())
    for name in targets:
        if not bool(torch.isfinite(module_weight(modules[name])).all()):
            raise ValueError(f"the weight of {name!r} has NaN/inf values; RaNA cannot calibrate a broken checkpoint")
    checked = {f"{name}.weight" for name in targets}
    for name, parameter in model.named_parameters():  # the rest too: a NaN head or norm would skew every loss
        if name in checked or parameter.device.type == "meta":
            continue
        if not bool(torch.isfinite(parameter.detach()).all()):
            raise ValueError(
                f"the model's parameter {name!r} has NaN/inf values; the checkpoint is broken (calibration would "
                "measure nothing meaningful). Reload it from its source."
            )
    if config.residual_rotation is not None:
        rotation.decoder_parts(model)  # a model whose stream cannot be rotated is refused before any pass
    groups = planning.group_targets(model, targets, config.fuse_qkv)
    chunks = calibration_chunks(
        calibration,
        tokenizer,
        seq_len=config.calibration_seq_len,
        max_tokens=config.calibration_tokens,
        text_column=text_column,
    )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and chunks.numel() and (int(chunks.min()) < 0 or int(chunks.max()) >= vocab):
        raise CalibrationError(
            f"calibration token ids run from {int(chunks.min())} to {int(chunks.max())}, but this model's vocabulary "
            f"has {vocab} ids (0 to {vocab - 1}): the ids come from another tokenizer. Pass text with this model's "
            "tokenizer, or ids it made."
        )
    streams = {}
    for method in methods:
        for allocation_mode in ALLOCATIONS:
            for name, (module, want) in planning.streams_for(
                planning.make_units(method, allocation_mode, groups), modules
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
    bases, rotated = None, contextlib.nullcontext()
    if config.residual_rotation is not None:  # the statistics of the rotated model (weights put back afterwards)
        if sweep:
            raise ValueError("residual_rotation needs the whole model on one device (layer_by_layer is not supported)")
        with torch.no_grad():
            moments = rotation.stream_moments(model, chunks, config.calibration_batch_size)
        bases = rotation.bases(moments, config.residual_rotation)
        del moments
        rotated = rotation.rotated(model, config.residual_rotation, bases)
    with rotated:
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
        residual_rotation=config.residual_rotation,
        bases=bases,
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
    if (
        isinstance(model, PeftModel)
        or any(isinstance(m, RaNALayer) for m in model.modules())
        or rotation.modules_of(model)
    ):
        raise ValueError("compress expects a base model without RaNA/PEFT adapters; unload the adapter first")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "compress cannot run inside torch.inference_mode(): global allocation takes loss gradients, and tensors "
            "made there cannot be used by autograd. Call it outside the inference_mode block (torch.no_grad is fine "
            "around the model's later use)."
        )
    if config is not None and not isinstance(config, RaNAConfig):
        raise TypeError(f"config must be a RaNAConfig, got {type(config).__name__}")
    config = copy.deepcopy(config) if config is not None else RaNAConfig()
    config.validate()  # fields changed since construction are checked too
    with _transaction(model):
        return _compress(model, config, calibration, tokenizer, statistics, adapter_name, text_column, seed)


@contextlib.contextmanager
def _transaction(model: nn.Module):
    """Put `model` back exactly as it was if anything inside raises, `KeyboardInterrupt` included: the same module
    objects in the same places (an injection stopped halfway is undone), the same `requires_grad` and training flags,
    and no `peft_config` left behind."""
    children = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()]
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]
    had_config, old_config = "peft_config" in model.__dict__, model.__dict__.get("peft_config")
    try:
        yield
    except BaseException:
        rotation.remove(model)  # original weights back, turns out (compress refuses a model already rotated)
        for parent, name, child in children:
            if parent._modules.get(name) is not child:
                parent._modules[name] = child
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for module, training in modes:
            module.training = training
        if had_config:
            model.peft_config = old_config
        elif "peft_config" in model.__dict__:
            del model.peft_config
        raise


def _compress(model, config, calibration, tokenizer, statistics, adapter_name, text_column, seed) -> PeftModel:
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
    units = planning.make_units(config.method, config.allocation, statistics.groups)
    fingerprint = None
    keep = 1.0 - config.flop_reduction
    if statistics.bases is not None:  # plan on the rotated model, whose weights the adapter will compute with
        # of the base the adapter will be loaded onto (its targets: the adapted ones are known only after planning)
        fingerprint = base_fingerprint(model, statistics.targets)
        keep -= _rotation_share(model, config, statistics)
        turns = rotation.install(model, config.residual_rotation)
        rotation.set_bases(turns, statistics.bases)
    planner = planning.Planner(
        modules,
        statistics.stats,
        statistics.fisher,
        balance_qkv=config.balance_qkv,
        size_cap=config.size_cap,
        cache=statistics.cache,
    )
    with torch.no_grad():
        if METHODS[config.method].trials:
            result = _auto_plan(model, config, statistics, planner, units, adapter_name, keep)
        else:
            result = planning.plan_units(planner, units, keep, config.allocation)
    plan, fills, expected = result.plan, result.fills, result.expected_keep
    adapted = [name for name, entry in plan.items() if injected(entry)]
    if not adapted:
        raise ValueError(
            f"no targeted module has a plan cheaper than dense at flop_reduction={config.flop_reduction}; "
            "nothing to adapt. Raise flop_reduction."
        )
    config.plan = plan
    config.target_modules = adapted
    config.format_version = FORMAT_VERSION if config.residual_rotation else FORMAT_VERSION_UNROTATED
    config.base_fingerprint = fingerprint if fingerprint is not None else base_fingerprint(model, adapted)
    if config.task_type is None and hasattr(model, "generate"):
        config.task_type = "CAUSAL_LM"

    allocated = time.perf_counter()
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)  # a failure from here on: see _transaction
    _fill(peft_model.base_model.model, fills, adapter_name)
    for turn in rotation.modules_of(model):
        turn.owned_by_adapter = True  # the adapter's from now on: `unload` puts the original weights back
    chunks = statistics.chunks
    refit_chunks = chunks[: max(1, config.refit_tokens // chunks.shape[1])]
    for _ in range(config.refit_passes if config.budget_mode == "threshold" else 0):
        refit_thresholds(peft_model, refit_chunks, seed=seed)
    peft_model.eval()
    use_rana_push_to_hub(peft_model)  # `peft_model.push_to_hub(repo_id)` uploads the RaNA model card
    logger.info(
        "RaNA (%s, %s): %d of %d targeted linears adapted; expected FLOP reduction %.3f (target %.3f); statistics "
        "%.1fs, allocation %.1fs, threshold refit %.1fs",
        config.method,
        config.allocation,
        len(adapted),
        len(plan),
        1 - expected - (1.0 - config.flop_reduction - keep),
        config.flop_reduction,
        calibrated - started,
        allocated - calibrated,
        time.perf_counter() - allocated,
    )
    return peft_model


def _rotation_share(model: nn.Module, config: RaNAConfig, statistics: Calibration) -> float:
    """The residual rotation's turns as a share of the targeted linears' dense MACs (what every budget counts)."""
    layers, _ = rotation.decoder_parts(model)
    width = layers[0].input_layernorm.weight.shape[0]
    modules = dict(model.named_modules())
    dense = sum(modules[name].in_features * modules[name].out_features for name in statistics.targets)
    share = rotation.overhead_macs(config.residual_rotation, len(layers), width) / dense
    if share >= 1.0 - config.flop_reduction:
        raise ValueError(
            f"residual_rotation={config.residual_rotation!r} turns the stream at a cost of {share:.3f} of the "
            f"targeted linears' dense FLOPs, more than the {1.0 - config.flop_reduction:.3f} that flop_reduction="
            f"{config.flop_reduction} leaves. Lower flop_reduction, or use residual_rotation='model' (two turns)."
        )
    return share


def _auto_plan(model, config, statistics, planner, units, adapter_name, keep) -> planning.PlanResult:
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
    seq_len = statistics.chunks.shape[1]
    check = statistics.chunks[-max(1, config.auto_check_tokens // seq_len) :]
    batch_size = config.calibration_batch_size
    trials, scales = [], {}
    for kind in METHODS[config.method].trials:
        if not any(unit.offers(kind) for unit in units):
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
        "%s: KL to dense on %d check tokens: %s; measured/estimated per kind %s; chose %s",
        config.method,
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
    trial.target_modules = [name for name, entry in result.plan.items() if injected(entry)]
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
    if planning.resolve_targets(model, config) != statistics.targets or config.fuse_qkv != statistics.fuse_qkv:
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
    if config.residual_rotation != statistics.residual_rotation:
        raise ValueError(
            f"statistics were collected with residual_rotation={statistics.residual_rotation!r}, this config asks "
            f"for {config.residual_rotation!r}: calibrate again with this config"
        )


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
    config = rana_config(model)
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        chunks = calibration if max_tokens is None else calibration[: max(1, max_tokens // calibration.shape[1])]
    else:
        chunks = calibration_chunks(
            calibration, tokenizer, config.calibration_seq_len, max_tokens or config.refit_tokens, text_column
        )
    layers = {
        layer.module_name: layer for layer in model.modules() if isinstance(layer, RaNALayer) and layer.fits_threshold
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
        desc="RaNA threshold refit",
    )
    thresholds = {}
    with torch.no_grad():
        for name, layer in layers.items():
            adapter_name = layer._active()
            sample = stats[name].sample.to(layer.rana_hf_threshold[adapter_name].device)
            thresholds[name] = layer.refit_threshold(sample, config.plan[name], adapter_name)
    return thresholds


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters needed to run the adapted model in inference mode, against the dense model.

    A rank adapter replaces its weight by `A` (and, for the router's owner, `B`); neuron adapters, CATS gates and
    dense entries run on the original weight. A rotated residual stream adds its bases (`n^2` each). Biases and all
    other parameters are counted once.

    Returns:
        `{"dense": ..., "adapted": ...}` parameter counts of the whole model.
    """
    seen, dense = set(), 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            dense += parameter.numel()
    adapter_params = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "rana_hf_A" in name or "rana_hf_B" in name or "rana_hf_rotation" in name
    )
    replaced = sum(
        m.base_layer.weight.numel() for m in model.modules() if isinstance(m, RaNALayer) and m.replaces_weight
    )
    base = dense - adapter_params  # the model's own parameters (adapters excluded)
    return {"dense": base, "adapted": base - replaced + adapter_params}

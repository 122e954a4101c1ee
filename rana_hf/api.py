"""`compress` and `measure_flops`: calibrate -> allocate -> inject, and count what the adapted model really does."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from tqdm.auto import tqdm

from . import allocation, decomposition
from .calibration import CalibrationError, calibration_chunks, collect_stats
from .config import DEFAULT_TARGET_MODULES, MLP_DOWN, MLP_GATE, MLP_UP, QKV_NAMES, RaNAConfig
from .layers import MEMBER, OWN, OWNER, FlopCounter, RaNALayer, counting
from .tuner import DENSE, NEURON, RANK

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


def _dense_macs(modules: dict[str, nn.Module], names: list[str]) -> int:
    return sum(modules[n].in_features * modules[n].out_features for n in names)


def _entry(kind: str, module: nn.Linear, **extra) -> dict:
    return {"kind": kind, "in_features": module.in_features, "out_features": module.out_features, **extra}


def _plan_group(group, modules, stats, keep_fraction, fills, plan, balance_qkv=False) -> None:
    """Plan one group: fills `plan` (JSON entries) and `fills` (tensors to copy into the injected layers)."""
    sample = stats[group.stream].sample  # [S, n] float32
    covariance = stats[group.stream].covariance
    linears = [modules[n] for n in group.names]
    budget = keep_fraction * _dense_macs(modules, group.names)
    if group.kind in (QKV, LINEAR):
        weights = [m.weight.float() for m in linears]
        row_scale = None
        if group.kind == QKV and balance_qkv:
            scales = decomposition.block_output_scales(weights, covariance)
            weights = [w / float(scale) for w, scale in zip(weights, scales, strict=True)]
            row_scale = torch.cat(
                [torch.full((m.out_features,), float(sc)) for m, sc in zip(linears, scales, strict=True)]
            )
        weight = decomposition.stack_weights(weights)
        basis = decomposition.data_aware_basis(weight, covariance)
        if row_scale is not None:  # W x ~ diag(scale) A_balanced (mask * B x)
            basis.up = basis.up * row_scale.to(basis.up.device)[:, None]
        codes = sample.to(basis.down.device) @ basis.down.T
        rank_plan = allocation.rank_plans(codes, weight.shape[1], weight.shape[0], [budget])[0]
        info = {
            "budget_macs": budget,
            "expected_macs": rank_plan.macs_per_token,
            "rel_error": rank_plan.relative_error,
        }
        if rank_plan.dense:
            for name, module in zip(group.names, linears, strict=True):
                plan[name] = _entry(DENSE, module)
            plan[group.names[0]]["stats"] = info
            return
        rank, offsets = rank_plan.rank, 0
        for index, (name, module) in enumerate(zip(group.names, linears, strict=True)):
            rows = slice(offsets, offsets + module.out_features)
            offsets += module.out_features
            role = OWN if group.kind == LINEAR else (OWNER if index == 0 else MEMBER)
            entry = _entry(RANK, module, role=role, rank=rank)
            if role != MEMBER:
                entry["mean_kept"] = rank_plan.mean_kept
            tensors = {"rana_hf_A": basis.up[rows, :rank]}
            if role != MEMBER:
                tensors["rana_hf_B"] = basis.down[:rank]
                tensors["rana_hf_threshold"] = torch.tensor(rank_plan.threshold, dtype=torch.float32)
            else:
                entry["owner"] = group.names[0]
            plan[name], fills[name] = entry, tensors
        plan[group.names[0]]["stats"] = info
    elif group.kind == MLP:
        gate, up, down = linears
        gate_basis = decomposition.data_aware_basis(gate.weight.float(), covariance)
        up_basis = decomposition.data_aware_basis(up.weight.float(), covariance)
        mlp_plan = allocation.search_mlp_split(
            sample.to(gate.weight.device),
            gate.weight.float(),
            up.weight.float(),
            down.weight.float(),
            modules[group.names[0].rpartition(".")[0]].act_fn,
            gate_basis,
            up_basis,
            budget,
        )
        info = {
            "budget_macs": budget,
            "expected_macs": mlp_plan.macs_per_token,
            "rel_error": mlp_plan.relative_error,
            "split": list(mlp_plan.split),
        }
        for name, module, basis, rank_plan in (
            (group.names[0], gate, gate_basis, mlp_plan.gate),
            (group.names[1], up, up_basis, mlp_plan.up),
        ):
            if rank_plan.dense:
                plan[name] = _entry(DENSE, module)
                continue
            plan[name] = _entry(RANK, module, role=OWN, rank=rank_plan.rank, mean_kept=rank_plan.mean_kept)
            fills[name] = {
                "rana_hf_A": basis.up[:, : rank_plan.rank],
                "rana_hf_B": basis.down[: rank_plan.rank],
                "rana_hf_threshold": torch.tensor(rank_plan.threshold, dtype=torch.float32),
            }
        _plan_neuron(group.names[2], down, mlp_plan.down_threshold, mlp_plan.down_keep_fraction, plan, fills)
        plan[group.names[0]]["stats"] = info
    else:  # NEURON: a down projection on its own, on the dense gated product
        (down,) = linears
        importance = sample.abs() * decomposition.column_norms(down.weight).to(sample.device)
        tau = allocation.neuron_threshold(importance, keep_fraction)
        _plan_neuron(group.names[0], down, tau, keep_fraction, plan, fills)
        plan[group.names[0]]["stats"] = {"budget_macs": budget, "expected_macs": budget}


def _plan_neuron(name, down, tau, keep_fraction, plan, fills) -> None:
    if tau <= 0:
        plan[name] = _entry(DENSE, down)
        return
    per_neuron = allocation.per_neuron_thresholds(tau, decomposition.column_norms(down.weight))
    plan[name] = _entry(NEURON, down, keep_fraction=keep_fraction)
    fills[name] = {"rana_hf_threshold": per_neuron.float()}


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


def compress(
    model: nn.Module,
    config: RaNAConfig | None = None,
    calibration=None,
    tokenizer=None,
    *,
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
    if calibration is None:
        raise ValueError("compress needs calibration data: a list of strings, a Dataset, or token ids")
    started = time.perf_counter()
    if getattr(getattr(model, "hf_quantizer", None), "quantization_config", None) is not None:
        logger.warning(
            "The base model was loaded with a quantization config (e.g. from a GGUF file): the saved adapter names "
            "%r as its base, which `from_pretrained` may not load the same way. Save the dequantized base with "
            "`save_pretrained` and compress that (rana_hf.real_models does this for its models).",
            getattr(model, "name_or_path", None),
        )

    targets = resolve_targets(model, config)
    modules = dict(model.named_modules())
    for name in targets:
        if not bool(torch.isfinite(modules[name].weight).all()):
            raise ValueError(f"the weight of {name!r} has NaN/inf values; RaNA cannot calibrate a broken checkpoint")
    groups = group_targets(model, targets, config.fuse_qkv)
    chunks = calibration_chunks(
        calibration,
        tokenizer,
        seq_len=config.calibration_seq_len,
        max_tokens=config.calibration_tokens,
        text_column=text_column,
    )
    rank_widths = [modules[g.stream].in_features for g in groups if g.kind != NEURON]
    needed = max([config.min_calibration_tokens, *rank_widths])
    if chunks.numel() < needed:
        raise CalibrationError(
            f"calibration gives {chunks.numel()} tokens in {chunks.shape[0]} chunks of {config.calibration_seq_len}; "
            f"RaNA needs at least {needed} tokens here (the input second moment of a {max(rank_widths, default=0)}-"
            "wide layer, and stable thresholds). Pass more text, or a smaller calibration_seq_len."
        )
    if chunks.numel() < config.calibration_tokens:
        logger.warning(
            "calibration has %d tokens, fewer than calibration_tokens=%d", chunks.numel(), config.calibration_tokens
        )

    streams = {g.stream: (modules[g.stream], g.kind != NEURON) for g in groups}
    stats = collect_stats(
        model, chunks, streams, config.threshold_sample_tokens, batch_size=config.calibration_batch_size, seed=seed
    )
    calibrated = time.perf_counter()

    keep_fraction = 1.0 - config.flop_reduction
    plan, fills = {}, {}
    with torch.no_grad():
        for group in tqdm(groups, desc="RaNA allocation", unit="group"):
            _plan_group(group, modules, stats, keep_fraction, fills, plan, config.balance_qkv)
    del stats
    adapted = [name for name, entry in plan.items() if entry["kind"] != DENSE]
    if not adapted:
        raise ValueError(
            f"no targeted module has a RaNA plan cheaper than dense at flop_reduction={config.flop_reduction}; "
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
        refit_chunks = chunks[: max(1, config.refit_tokens // config.calibration_seq_len)]
        for _ in range(config.refit_passes):
            refit_thresholds(peft_model, refit_chunks, seed=seed)
    except Exception:
        peft_model.base_model.unload()
        raise
    peft_model.eval()
    expected = sum(entry["stats"]["expected_macs"] for entry in plan.values() if "stats" in entry)
    dense = _dense_macs(modules, list(plan))
    logger.info(
        "RaNA: %d of %d targeted linears adapted; expected FLOP reduction %.3f (target %.3f); statistics %.1fs, "
        "allocation %.1fs, threshold refit %.1fs",
        len(adapted),
        len(plan),
        1 - expected / dense,
        config.flop_reduction,
        calibrated - started,
        allocated - calibrated,
        time.perf_counter() - allocated,
    )
    return peft_model


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
    stats = collect_stats(model, chunks, streams, config.threshold_sample_tokens, config.calibration_batch_size, seed)
    thresholds = {}
    with torch.no_grad():
        for name, layer in layers.items():
            entry = config.plan[name]
            adapter_name = layer._active()
            sample = stats[name].sample
            container = layer.rana_hf_threshold[adapter_name]
            if entry["kind"] == NEURON:
                norms = decomposition.column_norms(layer.base_layer.weight).to(sample.device)
                tau = allocation.neuron_threshold(sample.abs() * norms, entry["keep_fraction"])
                new = allocation.per_neuron_thresholds(tau, norms)
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
    raise ValueError("this model has no RaNA adapter (no RaNAConfig in model.peft_config)")


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
    config = _rana_config(model)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    suffix_to_module = {}
    for name, entry in config.plan.items():
        if entry["kind"] == DENSE:
            matches = [m for n, m in modules.items() if n == name or n.endswith("." + name)]
            if matches:
                suffix_to_module[name] = matches[0]
    counter = FlopCounter()
    handles = []
    for name, module in suffix_to_module.items():

        def hook(mod, args, output, name=name):
            x = args[0]
            mask = counter.token_mask
            tokens = int(mask.sum()) if mask is not None else x.shape[:-1].numel()
            macs = tokens * mod.in_features * mod.out_features
            counter.add(name, tokens, macs, macs)

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with counting(counter):
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                mask = attention_mask[start : start + batch_size].to(device) if attention_mask is not None else None
                counter.token_mask = mask.bool() if mask is not None else None
                model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    per_module, dense, actual = {}, 0, 0
    for name, count in counter.modules.items():
        dense += count.dense_macs
        actual += count.actual_macs
        per_module[name] = {
            "tokens": count.tokens,
            "dense": 2 * count.dense_macs,
            "actual": 2 * count.actual_macs,
        }
    tokens = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
    return {
        "dense": 2 * dense,
        "actual": 2 * actual,
        "reduction": 1.0 - actual / dense if dense else 0.0,
        "tokens": tokens,
        "per_module": per_module,
    }

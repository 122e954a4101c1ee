"""Compare adapter methods at equal measured FLOPs: one calibration pass per token count, then every method x
allocation x FLOP reduction compressed from those statistics and compared to the dense model on held-out text.

`compare_methods` is what `rana-hf eval` runs; `plot_comparison` draws its report (matplotlib, optional).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import RaNAConfig, calibrate, compress
from .api import parameter_counts
from .config import ALLOCATIONS, METHODS
from .evaluation import compare_to_dense

logger = logging.getLogger(__name__)


def check_sweep(
    specs: Sequence[tuple[str, str]], reductions: Sequence[float], calibration_tokens: Sequence[int]
) -> None:
    """Refuse a sweep with an unknown method or allocation, a FLOP reduction outside (0, 1) or no positive token
    count, before anything runs."""
    if not specs:
        raise ValueError("specs is empty: give at least one (method, allocation) pair")
    for method, allocation in specs:
        if method not in METHODS or allocation not in ALLOCATIONS:
            raise ValueError(f"unknown method/allocation {method}:{allocation}; methods {METHODS}, {ALLOCATIONS}")
    if not reductions or not all(0 < r < 1 for r in reductions):
        raise ValueError(f"FLOP reductions must be in (0, 1), got {list(reductions)}")
    if not calibration_tokens or min(calibration_tokens) <= 0:
        raise ValueError(f"calibration token counts must be positive integers, got {list(calibration_tokens)}")


def compare_methods(
    model: nn.Module,
    tokenizer,
    calibration,
    eval_chunks: torch.Tensor,
    specs: Sequence[tuple[str, str]],
    reductions: Sequence[float],
    *,
    calibration_tokens: Sequence[int] = (32768,),
    config_kwargs: dict | None = None,
    eval_batch_size: int = 2,
    on_row: Callable[[dict, dict], None] | None = None,
    other_chunks: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Compress `model` with every method x allocation x FLOP reduction and compare each to the dense model.

    The calibration pass runs once per entry of `calibration_tokens` and serves every method of that entry. Each
    adapted model is compared to its dense original (`evaluation.compare_to_dense`) on `eval_chunks`, then unloaded:
    `model` is changed in place while a row runs and is dense again after it.

    Args:
        model: the base causal LM.
        tokenizer: its tokenizer (for text calibration data).
        calibration: calibration data as `calibrate` takes it (texts, a `datasets.Dataset`, token ids).
        eval_chunks: [num_chunks, seq_len] held-out token ids.
        specs: (method, allocation) pairs, e.g. `[("teal", "global"), ("rana", "uniform")]`.
        reductions: FLOP reduction targets, each in (0, 1).
        calibration_tokens: calibration token counts; one timed calibration pass each.
        config_kwargs: other `RaNAConfig` fields shared by every row (e.g. `calibration_seq_len`, `target_modules`,
            `budget_mode`); not the ones swept (method, allocation, flop_reduction, calibration_tokens).
        eval_batch_size: chunks per forward pass when comparing.
        on_row: called as `on_row(row, report)` after each row (e.g. to print it or save the report so far).
        other_chunks: more texts to compare each adapted model on, by name (e.g. another domain): the same plan,
            without compressing again.

    Returns:
        A report: `calibrations` (`tokens`, `seconds` per pass), `eval_tokens`, `target_modules`, `dense_perplexity`
        and `rows`, one per (method, allocation, reduction, calibration): `perplexity`, `kl_to_dense`,
        `top1_agreement`, `flop_reduction_measured`, `params_ratio`, `adapters` (units per chosen adapter kind,
        `planned_adapters`), timings; or `error` for a target the method cannot reach. With `other_chunks`, each row's
        `other_texts` holds the same measures per text (`perplexity`, `kl_to_dense`, `top1_agreement`,
        `flop_reduction_measured`) and the report's `other_texts` each text's `eval_tokens` and `dense_perplexity`.
    """
    calibration_tokens = [int(t) for t in calibration_tokens]
    check_sweep(specs, reductions, calibration_tokens)

    def measures(adapted: nn.Module, chunks: torch.Tensor) -> dict:
        quality = compare_to_dense(adapted, chunks, batch_size=eval_batch_size)
        quality["flop_reduction_measured"] = quality.pop("flop_reduction")
        return quality

    settings = dict(config_kwargs or {})
    swept = sorted(settings.keys() & {"method", "allocation", "flop_reduction", "calibration_tokens"})
    if swept:
        raise ValueError(f"config_kwargs sets {swept}, which the sweep sets per row: pass them as specs/reductions")
    report: dict = {"calibrations": [], "eval_tokens": int(eval_chunks.numel()), "rows": []}
    for tokens in calibration_tokens:
        config = RaNAConfig(**settings, calibration_tokens=tokens)
        started = time.perf_counter()
        methods = sorted({m for m, _ in specs})
        statistics = calibrate(
            model, config, calibration, tokenizer, methods=methods, fisher=any(a == "global" for _, a in specs)
        )
        calibrated = {"tokens": int(statistics.chunks.numel()), "seconds": time.perf_counter() - started}
        report["calibrations"].append(calibrated)
        report["target_modules"] = statistics.targets
        for method, allocation in specs:
            for reduction in reductions:
                row = {"method": method, "allocation": allocation, "flop_reduction_target": reduction}
                row.update(calibration_tokens=calibrated["tokens"], calibration_seconds=calibrated["seconds"])
                started = time.perf_counter()
                try:
                    row_config = RaNAConfig(
                        **settings,
                        calibration_tokens=tokens,
                        method=method,
                        allocation=allocation,
                        flop_reduction=reduction,
                    )
                    adapted = compress(model, row_config, statistics=statistics)
                except ValueError as error:  # a method that cannot reach the target says so
                    row["error"] = str(error)
                    report["rows"].append(row)
                    logger.info("%s/%s at %s: %s", method, allocation, reduction, error)
                    if on_row is not None:
                        on_row(row, report)
                    continue
                row["compress_seconds"] = time.perf_counter() - started
                quality = measures(adapted, eval_chunks)
                params = parameter_counts(adapted)
                row.update(quality)
                row["params_ratio"] = params["adapted"] / params["dense"]
                row["adapters"] = planned_adapters(adapted.peft_config[adapted.active_adapter].plan)
                report["dense_perplexity"] = quality["dense_perplexity"]
                for name, chunks in (other_chunks or {}).items():
                    other = measures(adapted, chunks)
                    dense_perplexity = other.pop("dense_perplexity")
                    report.setdefault("other_texts", {})[name] = {
                        "eval_tokens": int(chunks.numel()),
                        "dense_perplexity": dense_perplexity,
                    }
                    row.setdefault("other_texts", {})[name] = other
                row["seconds"] = time.perf_counter() - started
                report["rows"].append(row)
                model = adapted.unload()
                if on_row is not None:
                    on_row(row, report)
        del statistics
    return report


def planned_adapters(plan: dict) -> dict[str, int]:
    """How many planning units of a plan chose each adapter kind (`plan[first name]["stats"]["adapter"]`; each linear
    of a unit whose budget was split between its linears counts as a unit). A kind that chose rank 0 (a compensation
    that compensates nothing: a plain mask) counts as `"<kind> (rank 0)"`."""
    counts: dict[str, int] = {}
    for entry in plan.values():
        stats = entry.get("stats", {})
        kind = stats.get("adapter")
        if kind is not None:
            kind += " (rank 0)" if stats.get("rank") == 0 else ""
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def plot_comparison(report: dict, path: str, title: str | None = None) -> None:
    """Perplexity against measured FLOP reduction, one line per method/allocation, dense as a dashed line; saved to
    `path` (needs matplotlib: `pip install "rana_hf[eval]"`).

    Args:
        report: what `compare_methods` returns.
        path: image file to write (e.g. `rana_eval.png`).
        title: the plot's title (default: "no fine-tuning").
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in report["rows"]:
        if "error" not in row:
            label = f"{row['method']} ({row['allocation']})"
            if len(report["calibrations"]) > 1:
                label += f", {row['calibration_tokens']} calibration tokens"
            lines.setdefault(label, []).append((row["flop_reduction_measured"], row["perplexity"]))
    for label, points in lines.items():
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if "dense_perplexity" in report:
        axes.axhline(report["dense_perplexity"], color="black", linestyle="--", label="dense")
    axes.set_yscale("log")
    axes.set_xlabel("measured FLOP reduction of the targeted linears (held-out text)")
    axes.set_ylabel("held-out perplexity")
    axes.set_title(title or "no fine-tuning")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


# Adapter kinds whose error-vs-FLOPs curves `kind_curves` measures by default, and the shares of a linear's dense MACs
# at which it summarises them.
CURVE_KINDS = ("rank", "neuron", "magnitude", "compensated")
CURVE_SHARES = (0.4, 0.56, 0.72)  # on the planner's budget grid; 0.56: a 44% reduction


def kind_curves(
    model: nn.Module,
    calibration,
    tokenizer=None,
    *,
    kinds: Sequence[str] = CURVE_KINDS,
    target_modules: list[str] | str | None = None,
    calibration_tokens: int = 32768,
    rotated: bool = True,
    seed: int = 0,
) -> dict:
    """Each targeted linear's error-vs-FLOPs curve for each adapter kind, as the allocator sees it: relative output
    error `E ||W x - adapted(x)||^2 / E ||W x||^2` on the calibration sample (squared error per token from the kind's
    `options`, over the sample's output energy) against the share of the linear's dense MACs spent, extra matrices
    (a rank adapter's router, a compensation's term) included. One calibration pass; nothing in `model` changes.

    Every linear is its own unit (q, k and v each with a router of their own: no shared q/k/v basis), so the curves of
    the kinds are comparable linear by linear. The input masks' errors are measured exactly on the sample
    (`||W ((1 - keep) * x)||^2`, where their `options` model it without the cross terms of the dropped inputs); the
    compensation's are exact too, the rank adapters' are their own estimate (exact for the masked components, the
    truncation beyond the rank from the second moment).

    With `rotated=True` one more curve, `rotated_free`, is a reference for a rotated identity basis (LaRoSA-style):
    the linear's input rotated into the principal axes of its calibration sample, `z = Q^T x`, the same magnitude
    mask on `z`, the weight `W Q`, and the rotation counted as free (as if folded into the weights upstream), exact
    error on the sample. No adapter builds it; it bounds what such a rotation could gain over `magnitude` at the
    layer, before the residual stream's adapters or run-time rotations are paid for.

    Args:
        model: the base causal LM.
        calibration: calibration text or token ids (as `calibrate` takes them).
        tokenizer: required for text.
        kinds: adapter kinds (names in `adapters.KINDS`) to measure.
        target_modules: the linears (None: the architecture's preset).
        calibration_tokens: calibration tokens.
        rotated: also measure the `rotated_free` reference curve.
        seed: seed of the token sampling.

    Returns:
        `{"kinds", "shares", "calibration_tokens", "linears": {name: {"in_features", "out_features",
        "output_energy", "curves": {kind: [[share, relative error], ...]}}}, "summary": {leaf name: {kind: [median
        relative error at each of `shares`]}}}` (None where a kind does not reach a share).
    """
    from . import planning
    from .adapters import KINDS, Unit

    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown adapter kinds {unknown or list(kinds)}; choose from {sorted(KINDS)}")
    config = RaNAConfig(
        method="auto",  # statistics for every kind: second moments (rank) and token samples (the masks)
        allocation="uniform",
        fuse_qkv=False,
        target_modules=target_modules,
        calibration_tokens=calibration_tokens,
    )
    statistics = calibrate(model, config, calibration, tokenizer, fisher=False, seed=seed)
    modules = dict(model.named_modules())
    planner = planning.Planner(modules, statistics.stats, None, cache=statistics.cache)
    units = [
        Unit([name], unit.stream, unit.kinds)
        for unit in planning.make_units("auto", "uniform", statistics.groups)
        for name in unit.names
    ]
    linears = {}
    with torch.no_grad():
        for unit in units:
            (name,) = unit.names
            module = modules[name]
            dense = float(module.in_features * module.out_features)
            sample = planner.sample(unit)
            weight = planner.weights(unit.names)[0].to(sample.device)
            energy = float((sample @ weight.T).pow(2).sum(1).mean())
            curves = {}
            for kind in kinds:
                options = planner.curve(Unit(unit.names, unit.stream, (kind,), unit.loss_names), kind)
                points = []
                for option in options:
                    if option.kind == "dense":
                        continue
                    error = option.error
                    if option.kind in ("neuron", "magnitude"):  # exact, with the dropped inputs' cross terms
                        mask_plan, norms = option.payload
                        score = sample.abs() * (norms if option.kind == "neuron" else 1.0)
                        error = _dropped_error(sample, weight, score < mask_plan.threshold)
                    points.append((option.macs / dense, error / energy))
                curves[kind] = [[round(share, 4), error] for share, error in sorted(points)]
            if rotated:
                curves["rotated_free"] = _rotated_curve(sample, weight, energy)
            linears[name] = {
                "in_features": module.in_features,
                "out_features": module.out_features,
                "output_energy": energy,
                "curves": curves,
            }
            logger.info("curves of %s done", name)
    summary: dict[str, dict[str, list[float | None]]] = {}
    for leaf in sorted({name.rpartition(".")[2] for name in linears}):
        rows = [entry for name, entry in linears.items() if name.rpartition(".")[2] == leaf]
        summary[leaf] = {}
        for kind in [*kinds, *(["rotated_free"] if rotated else [])]:
            medians = []
            for share in CURVE_SHARES:
                values = [_error_at(entry["curves"][kind], share) for entry in rows]
                values = [v for v in values if v is not None]
                medians.append(float(torch.tensor(values).median()) if len(values) == len(rows) else None)
            summary[leaf][kind] = medians
    return {
        "kinds": list(kinds),
        "shares": list(CURVE_SHARES),
        "calibration_tokens": int(statistics.chunks.numel()),
        "linears": linears,
        "summary": summary,
    }


def _dropped_error(sample: torch.Tensor, weight: torch.Tensor, dropped: torch.Tensor) -> float:
    """Mean over the sample's tokens of `||W (dropped * x)||^2`: a mask's exact squared output error."""
    return float(((sample * dropped) @ weight.T).pow(2).sum(1).mean())


def _rotated_curve(sample: torch.Tensor, weight: torch.Tensor, energy: float) -> list[list[float]]:
    """The `rotated_free` reference curve of `kind_curves`: [[share of dense MACs, relative error], ...]."""
    from .allocation import sorted_threshold
    from .planning import KEEP_GRID

    moment = sample.double().T @ sample.double() / sample.shape[0]
    _, axes = torch.linalg.eigh(moment)  # columns: the principal axes of the sample
    axes = axes.to(sample.dtype)
    rotated, rotated_weight = sample @ axes, weight @ axes  # z = Q^T x per token; W Q
    order = rotated.abs().flatten().sort(descending=True).values
    points = []
    for share in KEEP_GRID:
        threshold = sorted_threshold(order, share)
        error = _dropped_error(rotated, rotated_weight, rotated.abs() < threshold)
        points.append([share, error / energy])
    return points


def _error_at(curve: list[list[float]], share: float) -> float | None:
    """The least relative error of a curve's points within `share` of the dense MACs (None: no point that cheap)."""
    errors = [error for point_share, error in curve if point_share <= share + 1e-9]
    return min(errors) if errors else None

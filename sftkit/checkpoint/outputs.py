"""Atomic output directories: `final_hf/`, `final_adapter/` and `sftkit export`'s output
are written beside their place and renamed into it, so a kill never leaves half a model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sftkit.checkpoint.layout import fsync_dir


@contextmanager
def atomic_output_dir(final: Path, write: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to write into; once the block ends it replaces
    `final` by a rename, so a kill never leaves a half-written model (final_hf, exports).
    `write=False` (ranks that take part in a gather but write nothing) only yields the path.
    """
    tmp = final.parent / f".tmp_{final.name}"
    if not write:
        yield tmp
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _follow_umask(tmp)
    old = final.parent / f".old_{final.name}"
    if final.exists() or final.is_symlink():
        _remove(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _remove(old)
    fsync_dir(final.parent)


def _follow_umask(directory: Path) -> None:
    """Give what was written under `directory` the modes the user's umask asks for:
    transformers writes weights through a temporary file, which leaves them 0600 (unreadable
    to a group that shares the models) whatever the umask."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it; put it straight back
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _remove(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a directory tree."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)

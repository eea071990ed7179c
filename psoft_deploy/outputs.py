"""Output directories that appear complete or not at all, checked before any work."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory: Path) -> None:
    """Give ``directory`` and everything in it the mode the umask gives new files and directories."""
    mask = current_umask()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def check_writable(path: str | Path, what: str = "output") -> None:
    """Refuse (`UserError`) a ``path`` this process could not create or replace: its nearest
    existing ancestor must be a directory it may write to, and an existing ``path`` writable."""
    path = Path(path).expanduser().absolute()
    ancestor = next(parent for parent in path.parents if parent.exists())
    if not ancestor.is_dir():
        raise UserError(f"cannot write {what} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: directory {ancestor} is not writable")
    if path.is_file() and not os.access(path, os.W_OK):
        raise UserError(f"cannot write {what} {path}: the file is not writable")


def check_output(output: str | Path, overwrite: bool = False) -> None:
    """What `atomic_output_dir` refuses, checked up front (before a command does any work): an
    ``output`` that is a file, non-empty without ``overwrite``, or whose directory is not writable."""
    output = Path(output).expanduser().absolute()
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(f"output {output} exists and is not empty; pass --overwrite to replace it")
    check_writable(output)


@contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``output``; rename it to ``output`` only if the block succeeds.

    An existing non-empty ``output`` is refused unless ``overwrite``; it is replaced only
    once the new directory is complete. Everything in it gets the permissions the umask gives
    any new file or directory (not 0700 or 0600 from temporary files, as some writers use).
    """
    output = Path(output).expanduser().absolute()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        apply_umask(staging)
        if output.exists():
            retired = output.with_name(f".{output.name}.old-{staging.name.rsplit('-', 1)[-1]}")
            output.rename(retired)
            staging.rename(output)
            try:
                shutil.rmtree(retired)
            except OSError as error:
                warnings.warn(f"{output} is written; its previous contents, moved to {retired}, could not all be "
                              f"removed ({error.strerror}: {error.filename}); delete that directory yourself",
                              stacklevel=3)
        else:
            staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

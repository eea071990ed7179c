"""Output directories that appear complete or not at all, checked before any work."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from .errors import UserError

Inputs = Mapping[str, "str | Path | None"]  # what each input is (base, adapter, ...) -> where it is


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


def format_size(size: int) -> str:
    """``size`` bytes as people read it: 3.2 GiB, 140.5 MiB, 12.0 KiB, 800 bytes."""
    units = [(2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")]
    return next((f"{size / scale:.1f} {unit}" for scale, unit in units if size >= scale), f"{size} bytes")


def describe_os_error(error: OSError) -> str:
    """An OSError as one line: its reason and, where it names one, its file."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason} ({error.filename})" if error.filename else reason


def write_failure(output: str | Path, error: OSError) -> UserError:
    """The one line for an OSError met while writing ``output`` (disk full, permissions, ...)."""
    if error.errno == errno.ENOSPC:
        return UserError(f"disk full while writing {output}; free space in {Path(output).parent} and run it again "
                         "(nothing was written)")
    return UserError(f"could not write {output}: {describe_os_error(error)} (nothing was written)")


def check_apart(output: str | Path, inputs: Inputs) -> None:
    """Refuse (`UserError`) an ``output`` that is, contains or lies inside one of ``inputs``, symlinks
    resolved. Only local paths are compared: an input that is not one (a hub id) cannot be overwritten."""
    target = Path(output).expanduser().resolve()
    for role, given in inputs.items():
        if given is None or not Path(given).expanduser().exists():
            continue
        path = Path(given).expanduser().resolve()
        relation = ("is" if target == path else "lies inside" if target.is_relative_to(path)
                    else "contains" if path.is_relative_to(target) else None)
        if relation:
            raise UserError(f"output {output} {relation} the {role} {given}: choose an output apart from the "
                            "command's inputs")


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


def check_output(output: str | Path, overwrite: bool = False, inputs: Inputs | None = None) -> None:
    """What `atomic_output_dir` refuses, checked up front (before a command does any work): an
    ``output`` that is, contains or lies inside one of ``inputs`` (`check_apart`), is a file, is
    non-empty without ``overwrite``, or whose directory is not writable. A symlink is followed."""
    check_apart(output, inputs or {})
    output = Path(output).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(f"output {output} exists and is not empty; pass --overwrite to replace it")
    check_writable(output)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write the file ``path`` whole or not at all (a temporary sibling renamed into place); an
    OSError becomes one `UserError` line."""
    path = Path(path).expanduser().resolve()
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.partial-", delete=False) as file:
            staging = Path(file.name)
            file.write(text)
        staging.chmod(0o666 & ~current_umask())
        staging.replace(path)
    except OSError as error:
        raise write_failure(path, error) from None
    finally:
        if staging is not None:
            staging.unlink(missing_ok=True)


@contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``output``; rename it to ``output`` only if the block succeeds.

    ``output`` is checked by `check_output` (commands check it against their inputs before any
    work); a symlink is followed: the link stays and what it points to is written. An existing
    non-empty ``output`` is replaced only once the new directory is complete. Everything in it gets
    the permissions the umask gives any new file or directory (not 0700 or 0600 from temporary
    files, as some writers use). An OSError while writing (disk full, permissions) becomes one
    `UserError` line, and nothing is left behind.
    """
    check_output(output, overwrite)
    output = Path(output).expanduser().resolve()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as error:
        raise write_failure(output, error) from None
    try:
        yield staging
        apply_umask(staging)
        if output.exists():
            _replace(output, staging)
        else:
            staging.rename(output)
    except OSError as error:
        raise write_failure(output, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_files_into(output: str | Path, last: str) -> Iterator[Path]:
    """Yield a temporary directory inside ``output`` (made if need be); if the block succeeds, move
    each file in it into ``output`` in place of its namesake, ``last`` last (and removed first: its
    presence marks a complete output). What else ``output`` holds stays (train's checkpoints). An
    OSError while writing becomes one `UserError` line, and the temporary directory goes either way.
    """
    output = Path(output).expanduser()
    try:
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".final-", dir=output))
    except OSError as error:
        raise write_failure(output, error) from None
    try:
        yield staging
        (output / last).unlink(missing_ok=True)
        apply_umask(staging)
        for file in sorted(staging.iterdir(), key=lambda file: file.name == last):
            file.replace(output / file.name)
    except OSError as error:
        raise write_failure(output, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(output: Path, staging: Path) -> None:
    """Put ``staging`` in place of the existing ``output`` (back as it was if that fails), then
    delete the previous contents, with one warning if some cannot be."""
    retired = output.with_name(f".{output.name}.old-{staging.name.rsplit('-', 1)[-1]}")
    output.rename(retired)
    try:
        staging.rename(output)
    except OSError:
        retired.rename(output)
        raise
    try:
        shutil.rmtree(retired)
    except OSError as error:
        warnings.warn(f"{output} is written; its previous contents, moved to {retired}, could not all be removed "
                      f"({describe_os_error(error)}); delete that directory yourself", stacklevel=4)

"""Output directories that appear complete or not at all."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError


@contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``output``; rename it to ``output`` only if the block succeeds.

    An existing non-empty ``output`` is refused unless ``overwrite``; it is replaced only
    once the new directory is complete.
    """
    output = Path(output).expanduser().absolute()
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(f"output {output} exists and is not empty; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        if output.exists():
            retired = output.with_name(f".{output.name}.old-{staging.name.rsplit('-', 1)[-1]}")
            output.rename(retired)
            staging.rename(output)
            shutil.rmtree(retired)
        else:
            staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

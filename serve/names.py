"""The names `serve` gives adapters, checked before torch or vLLM is imported."""

from __future__ import annotations

import re
from pathlib import Path

from psoft_deploy.errors import UserError

# One path component: letters, digits, '.', '_', '-'; no leading dot (so no '..').
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_served_names(base: str, adapters: dict[str, str], adapter_root: str | None) -> None:
    """Refuse (`UserError`) an adapter name that is not one safe path component or is the base's,
    and an ``adapter_root`` that is not a directory."""
    for name in adapters:
        if not SAFE_NAME.fullmatch(name) or name == base:
            raise UserError(f"adapter name {name!r} must be letters, digits, '.', '_', '-' and differ from the base")
    if adapter_root and not Path(adapter_root).is_dir():
        raise UserError(f"--adapter-root {adapter_root} is not a directory")

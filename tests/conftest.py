"""Shared fixtures: tiny local models and a PEFT PSOFT adapter, built once per session. Shared helpers
are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_peft_adapter
from transformers.utils import logging as hf_logging

from psoft_deploy.converters.verify.inputs import DEFAULT_PROMPTS
from psoft_deploy.testing import build_tiny_model

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """``tiny_base(kind, trained=False, **sizes) -> Path``: a tiny model directory, built once per
    session; ``trained`` ones have memorized verify's prompts, so their top-1 choices there are
    decisive (as a real model's are) instead of random weights' near-ties."""
    built: dict[tuple, Path] = {}

    def build(kind: str = "llama", trained: bool = False, **sizes) -> Path:
        key = (kind, trained, tuple(sorted(sizes.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"base-{kind}")
            build_tiny_model(path, kind, memorize=DEFAULT_PROMPTS if trained else None, **sizes)
            built[key] = path
        return built[key]

    return build


@pytest.fixture(scope="session")
def llama_adapter(tiny_base, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Llama and a PEFT PSOFT adapter (r = 8) for it, built once per session: copy them
    before changing them."""
    base = tiny_base("llama")
    adapter = tmp_path_factory.mktemp("llama-adapter") / "adapter"
    make_peft_adapter(base, adapter, r=8)
    return base, adapter

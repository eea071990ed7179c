"""How an adapter is read and its factors derived: one typed value, the same in every command,
the server's cache and its resolver (which receives it through the environment)."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import click

from .dtypes import CHOICES

ENV_VARIABLE = "PSOFT_DEPLOY_READ_OPTIONS"


@dataclass(frozen=True)
class ReadOptions:
    """``svd_device``/``svd_dtype``: where and in which dtype PEFT adapters' A and B are rebuilt
    (the device and dtype the base had in training; ``None``: as stored). ``force_unseeded``:
    accept PEFT 0.19 low-rank adapters although A and B cannot be reproduced.
    ``paper_neumann_terms``: Cayley–Neumann terms of a paper-repository checkpoint (``None``:
    the exact Cayley transform; 5 is that repository's default). ``allow_base_mismatch``: warn
    instead of failing when the base differs from the one the adapter was made for, or when that
    cannot be checked (fingerprints the adapter records, else its ``base_model_name_or_path``,
    compared by architecture, layer shapes and weights where that base is on this machine, else by
    hub id)."""

    svd_device: str = "cpu"
    svd_dtype: str | None = None
    force_unseeded: bool = False
    paper_neumann_terms: int | None = 5
    allow_base_mismatch: bool = False

    def to_env(self) -> dict[str, str]:
        """The options as an environment entry (for processes started by `serve`)."""
        return {ENV_VARIABLE: json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_env(cls, env) -> ReadOptions:
        """The options `to_env` put in ``env`` (defaults where absent)."""
        return cls(**json.loads(env[ENV_VARIABLE])) if env.get(ENV_VARIABLE) else cls()


DEFAULTS = ReadOptions()


def read_options(command):
    """Add the shared adapter-reading options to a click command; it receives them as one
    ``read_options`` keyword argument (a `ReadOptions`)."""

    @functools.wraps(command)
    def wrapper(*args, svd_device, svd_dtype, force_unseeded, paper_cayley, paper_neumann_terms,
                allow_base_mismatch, **kwargs):
        options = ReadOptions(
            svd_device=svd_device, svd_dtype=svd_dtype, force_unseeded=force_unseeded,
            paper_neumann_terms=paper_neumann_terms if paper_cayley == "neumann" else None,
            allow_base_mismatch=allow_base_mismatch,
        )
        return command(*args, read_options=options, **kwargs)

    options = [
        click.option("--svd-device", default=DEFAULTS.svd_device, show_default=True,
                     help="Device for rebuilding A, B of PEFT adapters (the device the adapter was trained on)."),
        click.option("--svd-dtype", type=click.Choice(CHOICES), default=None,
                     help="Dtype the base was loaded in when the adapter was trained (PEFT adapters; default: "
                          "as stored). An fp32 base trained in bf16 needs bfloat16 here."),
        click.option("--force-unseeded", is_flag=True,
                     help="Accept a PEFT 0.19 low-rank adapter although its A, B cannot be reproduced."),
        click.option("--paper-cayley", type=click.Choice(["neumann", "exact"]), default="neumann",
                     show_default=True, help="How a paper-repository checkpoint built R when trained."),
        click.option("--paper-neumann-terms", type=click.IntRange(min=0), default=DEFAULTS.paper_neumann_terms,
                     show_default=True, help="Cayley–Neumann terms of a paper-repository checkpoint."),
        click.option("--allow-base-mismatch", is_flag=True,
                     help="Warn instead of failing when the base is not the one the adapter was made for, or when "
                          "that cannot be checked: the base fingerprints the adapter records differ, or its "
                          "base_model_name_or_path names another model (other architecture, layer shapes or "
                          "weights where that model is on this machine, else another hub id)."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), wrapper)

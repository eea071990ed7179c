"""How an adapter is read and its factors derived (`ReadOptions`: the same in every command, the
server's cache and its resolver, which receives it through the environment), and how an artifact
is written (`WriteOptions`); each with the click decorator that builds it."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, fields

import click

from .dtypes import BY_NAME, CHOICES, GGUF_FILE_TYPES
from .errors import UserError

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


@dataclass(frozen=True)
class WriteOptions:
    """How a command writes its artifact; each field's metadata is its command-line option (help
    and click type). ``verify_mode`` None: not verified (``--no-verify``)."""

    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output directory.",
                                                     "is_flag": True})
    verify_mode: str | None = field(default="auto", metadata={
        "help": "full: run the candidate and the reference (in float64) on prompts; layerwise: check each weight "
                "while streaming (for models too large to run in float64); auto: full up to 0.5B parameters.",
        "type": click.Choice(["auto", "full", "layerwise"]), "show_default": True})
    dtype: str = field(default="auto", metadata={
        "help": "dtype of the written floating weights (auto: the base's).",
        "type": click.Choice(["auto", *CHOICES]), "show_default": True})
    rank: int | None = field(default=None, metadata={
        "help": "Optimal rank-K truncation of every layer (default: exact).", "type": click.IntRange(min=1)})
    energy: float | None = field(default=None, metadata={
        "help": "Per layer, the smallest rank keeping this fraction of ‖ΔW‖² (e.g. 0.99).",
        "type": click.FloatRange(0, 1, min_open=True)})
    target: str = field(default="peft", metadata={
        "help": "vllm, sglang: one rank for all layers (zero-padded) and that server's limits checked now, not at "
                "serve time; mlx: an mlx-lm adapter directory (adapters.safetensors); gguf: a llama.cpp LoRA "
                "(adapter.gguf) and an Ollama Modelfile.",
        "type": click.Choice(["peft", "vllm", "sglang", "mlx", "gguf"]), "show_default": True})
    to: str = field(default="safetensors", metadata={
        "help": "safetensors: a model directory; gguf: one llama.cpp model file (model.gguf) and an Ollama Modelfile.",
        "type": click.Choice(["safetensors", "gguf"]), "show_default": True})
    with_base: bool = field(default=False, metadata={
        "help": "--target gguf: also write the base as base.gguf beside adapter.gguf (the LoRA's GGUF type), "
                "checked against transformers; the LoRA is verified on it and the Modelfile reads it.",
        "is_flag": True})
    quant: str | None = field(default=None, metadata={
        "help": "GGUF type (--target gguf, --to gguf): F32, F16, BF16 or Q8_0 for a LoRA; for a model also the "
                "k-quants (Q4_K_M, ...), made by llama.cpp's quantizer. Default: --dtype's type.",
        "type": click.Choice(list(GGUF_FILE_TYPES), case_sensitive=False)})

    def __post_init__(self):
        if self.rank is not None and self.energy is not None:
            raise UserError("pass --rank or --energy, not both")
        if self.quant is not None and "gguf" not in (self.target, self.to):
            raise UserError("--quant is a GGUF type; it applies with --target gguf (export-lora) or --to gguf (merge)")
        if self.with_base and self.target != "gguf":
            raise UserError("--with-base writes the base as GGUF beside a llama.cpp LoRA; it applies to --target gguf")

    def gguf_quant(self, auto: str = "float32") -> str:
        """The GGUF type to write: --quant, else --dtype's (``auto``: the dtype auto stands for)."""
        return self.quant or BY_NAME[auto if self.dtype == "auto" else self.dtype].gguf


WRITE_DEFAULTS = WriteOptions()


def verify_mode_option(command):
    """The --verify-mode option alone (for commands that verify without writing)."""
    return _option("verify_mode")(command)


def write_options(*names: str):
    """Add --overwrite and the named `WriteOptions` fields' options to a click command
    (``verify_mode`` brings --no-verify too); it receives them as one ``write_options`` keyword
    argument (a `WriteOptions`)."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in ("overwrite", *names)}
            if kwargs.pop("no_verify", False):
                values["verify_mode"] = None
            return command(*args, write_options=WriteOptions(**values), **kwargs)

        options = [_option(name) for name in names]
        if "verify_mode" in names:
            options.append(click.option("--no-verify", is_flag=True,
                                        help="Skip the verification against the reference forward."))
        options.append(_option("overwrite"))
        return functools.reduce(lambda cmd, option: option(cmd), reversed(options), wrapper)

    return decorate


def _option(name: str):
    """The click option of `WriteOptions` field ``name`` (its metadata, its default)."""
    spec = next(each for each in fields(WriteOptions) if each.name == name)
    return click.option(f"--{name.replace('_', '-')}", default=spec.default, **spec.metadata)

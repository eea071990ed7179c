"""The reference forward: the base model from transformers with `PsoftLinear` layers."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from .base import meta_model
from .errors import UserError
from .factors import AdapterFactors
from .families import model_class
from .layer import apply_factors, tied_groups


def tied_parameter_groups(path: str | Path) -> list[set[str]]:
    """Names of the parameters that share one tensor in the model at ``path`` (no weights read)."""
    return tied_groups(meta_model(Path(path)))


def load_base_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model class named in ``config.json`` (e.g. LlamaForCausalLM), loaded in ``dtype``, in eval mode."""
    config = transformers.AutoConfig.from_pretrained(path)
    try:
        model = model_class(config).from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserError(f"transformers cannot load the base model at {path}: {error}") from None
    return model.eval()


def reference_model(base_path: str | Path, factors: AdapterFactors | None, dtype: torch.dtype = torch.float32):
    """The base with the adapter applied through the one PSOFT implementation (the bare base for None)."""
    model = load_base_model(base_path, dtype)
    return model if factors is None else apply_factors(model, factors.modules, factors.replaced_tensors)

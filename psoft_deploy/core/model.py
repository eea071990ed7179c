"""The reference forward: the base model from transformers with `PsoftLinear` layers."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from .architectures import model_class
from .base import BaseCheckpoint, meta_model
from .dtypes import from_safetensors
from .errors import UserError
from .factors import AdapterFactors
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


def reference_model_stored(base_path: str | Path, factors: AdapterFactors | None, dtype: torch.dtype):
    """`reference_model` computing in ``dtype`` with the weights kept as the checkpoint stores them
    where that is narrower (a bfloat16 base computed in float32: the same values and the same
    arithmetic, in half the memory). Each module's own floating parameters are cast to ``dtype``
    for its forward, and the stored tensors (memory-mapped from the checkpoint) put back after it."""
    stored = {from_safetensors(info.dtype).torch for info in BaseCheckpoint(str(base_path)).index.values()}
    floating = [kind for kind in stored if kind.is_floating_point]
    widest = max(floating, key=lambda kind: kind.itemsize, default=dtype)
    if widest.itemsize >= dtype.itemsize:
        return reference_model(base_path, factors, dtype)
    model = reference_model(base_path, factors, widest)
    for module in model.modules():
        parameters = [parameter for parameter in module.parameters(recurse=False) if parameter.dtype == widest]
        if parameters:
            kept: list[torch.Tensor] = []
            module.register_forward_pre_hook(lambda _, args, parameters=parameters, kept=kept: _widen(parameters,
                                                                                                        kept, dtype))
            module.register_forward_hook(lambda _, args, output, parameters=parameters, kept=kept: _restore(parameters,
                                                                                                          kept))
    return model


def _widen(parameters: list[torch.nn.Parameter], kept: list[torch.Tensor], dtype: torch.dtype) -> None:
    kept[:] = [parameter.data for parameter in parameters]
    for parameter in parameters:
        parameter.data = parameter.data.to(dtype)


def _restore(parameters: list[torch.nn.Parameter], kept: list[torch.Tensor]) -> None:
    for parameter, data in zip(parameters, kept):
        parameter.data = data
    kept.clear()

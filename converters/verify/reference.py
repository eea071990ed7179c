"""The reference side of every comparison: the base with the adapter applied through
`PsoftLinear` (for PEFT adapters this equals PEFT's own forward; the tests pin it), in float64
(the truth) and in the candidate's dtype, the bare base, and greedy continuations."""

from __future__ import annotations

import gc
from typing import Callable

import torch

from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.factors import AdapterFactors
from psoft_deploy.core.layer import PsoftLinear, replace_module
from psoft_deploy.core.model import reference_model

from .rule import compare_logits


def strip_adapter(model, factors: AdapterFactors, base: BaseCheckpoint) -> None:
    """Turn a float64 reference model into the bare base, in place: each `PsoftLinear` replaced by
    its base layer, the adapter's replaced tensors (``modules_to_save``) by the base's."""
    for name in factors.modules:
        replace_module(model, name, model.get_submodule(name).base_layer)
    model.load_state_dict({key: base.tensor(key).double() for key in factors.replaced_tensors}, strict=False)


def reference_runs(base: BaseCheckpoint, factors: AdapterFactors | None, dtype: torch.dtype, forward) -> dict:
    """The float64 truth, and deviations from it: the reference forward in ``dtype`` (what the
    precision does alone), the truth with every adapted weight replaced by ``W + ΔW`` as a
    correct merge to ``dtype`` stores it (what rounding the conversion adds), and the bare base
    (``modules_to_save`` tensors included)."""
    model = reference_model(base.path, factors, torch.float64)
    truth = forward(model)
    runs = {"truth": truth, "rounding": None, "bare_base": None}
    if factors is not None:
        merged = {name: reference_merged_weight(model.get_submodule(name)) for name in factors.modules}
        strip_adapter(model, factors, base)
        runs["bare_base"] = compare_logits(truth, forward(model))
        for name, weight in merged.items():
            model.get_submodule(name).weight.data = weight.float().to(dtype).double()
        model.load_state_dict({key: tensor.double() for key, tensor in factors.replaced_tensors.items()}, strict=False)
        runs["rounding"] = compare_logits(truth, forward(model))
    del model
    runs["precision"] = compare_logits(truth, outputs_freed(lambda: reference_model(base.path, factors, dtype),
                                                            forward))
    return runs


def outputs_freed(load: Callable[[], torch.nn.Module],
                  forward: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
    """``forward(load())``, the model freed before it returns: transformers models hold reference
    cycles, so dropping the last reference leaves one in memory until the garbage collector runs,
    beside whatever loads next (another model, an exported graph)."""
    model = load()
    try:
        return forward(model)
    finally:
        del model
        gc.collect()


def reference_merged_weight(layer: PsoftLinear, chunk: int = 1024) -> torch.Tensor:
    """``W + ΔW`` in float64, ΔW as the reference layer computes it (its update applied to the
    identity, ``chunk`` columns at a time), independently of the dense ΔW the converters build."""
    size = layer.base_layer.in_features
    with torch.no_grad():
        delta = torch.cat([layer.update(torch.eye(size, dtype=torch.float64)[start:start + chunk]).T
                           for start in range(0, size, chunk)], dim=1)
    return layer.base_layer.weight.double() + delta


def greedy(model, tokens: list[int], count: int, stop: set[int]) -> list[int]:
    """``count`` greedy tokens after ``tokens`` (fewer if one in ``stop`` comes first, kept)."""
    new: list[int] = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), use_cache=True)
        while True:
            new.append(int(out.logits[0, -1].argmax()))
            if new[-1] in stop or len(new) == count:
                return new
            out = model(input_ids=torch.tensor([new[-1:]]), past_key_values=out.past_key_values, use_cache=True)

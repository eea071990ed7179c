"""From a read adapter to the per-module factors every command consumes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .base import BaseCheckpoint
from .errors import UserError
from .formats import PsoftAdapter, read_adapter
from .options import DEFAULTS, ReadOptions
from .psoft import ModuleFactors, principal_subspace, rotation
from .streaming import DTYPES


@dataclass
class AdapterFactors:
    """Exact factors of every adapted module, the base fingerprints they belong to, and how
    they were obtained (``svd``: backend, device and dtype, or ``None`` when no SVD ran)."""

    adapter: PsoftAdapter
    modules: dict[str, ModuleFactors]
    fingerprints: dict[str, dict]
    svd: dict | None

    @property
    def replaced_tensors(self) -> dict[str, torch.Tensor]:
        return self.adapter.replaced_tensors


def base_tensor_key(module_name: str) -> str:
    return f"{module_name}.weight"


def derive_factors(adapter: PsoftAdapter, base: BaseCheckpoint | None, options: ReadOptions = DEFAULTS) -> AdapterFactors:
    """Factors for ``adapter`` on ``base``.

    PEFT adapters rebuild A and B by PEFT's SVD of each base weight, first cast to
    ``options.svd_dtype`` (the dtype the base was loaded in for training; default: as stored)
    on ``options.svd_device``. Paper and materialized adapters carry A and B: no SVD runs. A
    materialized adapter's base fingerprints must match ``base`` (a warning instead with
    ``options.allow_base_mismatch``).
    """
    svd_device, svd_dtype = options.svd_device, options.svd_dtype
    if adapter.format == "peft" and base is None:
        raise UserError("a PEFT PSOFT adapter stores only R; pass --base so A and B can be rebuilt from it")
    if svd_dtype is not None and svd_dtype not in DTYPES:
        raise UserError(f"--svd-dtype must be one of {', '.join(DTYPES)}, got {svd_dtype!r}")
    if adapter.format == "peft":
        try:
            torch.empty(0, device=svd_device)
        except (RuntimeError, AssertionError) as error:
            raise UserError(f"--svd-device {svd_device!r} is not usable here ({str(error).splitlines()[0]})") from None
    modules: dict[str, ModuleFactors] = {}
    fingerprints: dict[str, dict] = {}
    stored = adapter.metadata.get("modules", {})
    for name, params in tqdm(adapter.modules.items(), desc="factors", unit="module", disable=None, leave=False):
        weight = base.tensor(base_tensor_key(name)) if base is not None else None
        if weight is not None:
            _check_base_shape(adapter, name, params, weight)
            fingerprints[name] = base.fingerprint(base_tensor_key(name), weight)
        elif name in stored:
            fingerprints[name] = stored[name]["fingerprint"]
        if adapter.format == "materialized" and weight is not None:
            _check_fingerprint(name, stored[name]["fingerprint"], fingerprints[name], options.allow_base_mismatch)
        if params.A is not None:
            A, B = params.A, params.B
        else:
            W = weight.to(DTYPES[svd_dtype]) if svd_dtype else weight
            A, B = principal_subspace(
                W.to(svd_device), adapter.rank, adapter.scale, adapter.subspace_spec, adapter.fan_in_fan_out
            )
            A, B = A.cpu(), B.cpu()
        R = params.R if params.R is not None else module_rotation(adapter, name)
        modules[name] = ModuleFactors(A=A, B=B, R=R, scale=adapter.scale, fan_in_fan_out=adapter.fan_in_fan_out)
    if adapter.format == "peft":
        svd = {
            "backend": adapter.subspace_spec.svd,
            "device": str(torch.device(svd_device)),
            "dtype": svd_dtype or "as stored",
            "torch": torch.__version__,
        }
    else:
        svd = adapter.metadata.get("svd")
    return AdapterFactors(adapter=adapter, modules=modules, fingerprints=fingerprints, svd=svd)


def module_rotation(adapter: PsoftAdapter, name: str, *, with_magnitudes: bool = True) -> torch.Tensor:
    """R of one module from its trained parameters (the rotation part alone without magnitudes)."""
    params = adapter.modules[name]
    vectors = (params.vector_a, params.vector_b) if with_magnitudes else (None, None)
    return rotation(params.generator, adapter.rank, adapter.rotation_spec, *vectors)


def _check_base_shape(adapter: PsoftAdapter, name: str, params, weight: torch.Tensor) -> None:
    shape = tuple(weight.shape)
    if weight.dim() != 2:
        raise UserError(f"base tensor {base_tensor_key(name)} has shape {shape}; PSOFT adapts 2-D linear weights")
    out_features, in_features = shape[::-1] if adapter.fan_in_fan_out else shape
    if adapter.rank > min(out_features, in_features):
        raise UserError(
            f"rank r={adapter.rank} exceeds the size of {name} ({out_features}×{in_features}); "
            "is this adapter for another base?"
        )
    if params.A is not None and (params.B.shape[0], params.A.shape[1]) != (out_features, in_features):
        raise UserError(
            f"adapter factors for {name} are {params.B.shape[0]}×{params.A.shape[1]}, the base layer is "
            f"{out_features}×{in_features}: this adapter was made for another base"
        )


def _check_fingerprint(name: str, expected: dict, actual: dict, allow_mismatch: bool) -> None:
    if expected == actual:
        return
    message = (
        f"base tensor {base_tensor_key(name)} differs from the one this adapter was materialized against "
        f"(sha256 {actual['sha256'][:12]}… {actual['dtype']} {actual['shape']} vs "
        f"{expected['sha256'][:12]}… {expected['dtype']} {expected['shape']})"
    )
    if not allow_mismatch:
        raise UserError(message + "; use the same base, or pass --allow-base-mismatch to proceed anyway")
    warnings.warn(message + "; proceeding because --allow-base-mismatch was given", stacklevel=3)


def load_factors(adapter_path: str, base: str | BaseCheckpoint | None, options: ReadOptions = DEFAULTS) -> AdapterFactors:
    """Read an adapter in any format and derive its factors on ``base`` (a path, hub id or checkpoint)."""
    if isinstance(base, str):
        base = BaseCheckpoint(base)
    return derive_factors(read_adapter(adapter_path, options), base, options)

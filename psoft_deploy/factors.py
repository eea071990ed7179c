"""From a read adapter to the per-module factors every command consumes."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import BaseCheckpoint
from .errors import UserError
from .formats import PsoftAdapter, read_adapter
from .options import DEFAULTS, ReadOptions
from .progress import track
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
    materialized adapter's base fingerprints must match ``base``, and a PEFT or paper adapter's
    record of its base must not contradict it (`check_base_identity`); a warning instead with
    ``options.allow_base_mismatch``. Every shape is checked before any SVD runs.
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
    if base is not None:
        for name, params in adapter.modules.items():
            _check_base_shape(adapter, name, params, base.shape(base_tensor_key(name)))
        check_base_identity(adapter, base, options)
    modules: dict[str, ModuleFactors] = {}
    fingerprints: dict[str, dict] = {}
    stored = adapter.metadata.get("modules", {})
    for name, params in track(adapter.modules.items(), desc="factors"):
        weight = base.tensor(base_tensor_key(name)) if base is not None else None
        if weight is not None:
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


def _check_base_shape(adapter: PsoftAdapter, name: str, params, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
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


def check_base_identity(adapter: PsoftAdapter, base: BaseCheckpoint, options: ReadOptions = DEFAULTS) -> None:
    """Refuse (`UserError`) a PEFT or paper adapter whose ``base_model_name_or_path`` contradicts
    ``base``; a warning instead with ``options.allow_base_mismatch``. Where the recorded base is on
    this machine (a directory, or a hub id in the hub cache) its architecture, adapted layer shapes
    and weights are compared; otherwise hub ids, where both bases have one (a hub id given as the
    base, a hub-cache snapshot path, the config's ``_name_or_path``). What cannot be compared (a
    path on another machine, a local base of unknown origin) passes."""
    claimed = adapter.base_model_name_or_path
    if adapter.format == "materialized" or not claimed or claimed == base.name:
        return
    difference = _base_difference(claimed, adapter, base)
    if difference is None:
        return
    message = f"adapter {adapter.path} was trained on {claimed}, not on the base given ({base.name}): {difference}"
    if not options.allow_base_mismatch:
        raise UserError(message + "; pass the adapter's own base, or --allow-base-mismatch to proceed anyway")
    warnings.warn(message + "; proceeding because --allow-base-mismatch was given (A and B come from the base "
                  "given: whether they are the ones the adapter was trained with cannot be checked)", stacklevel=3)


def _base_difference(claimed: str, adapter: PsoftAdapter, base: BaseCheckpoint) -> str | None:
    """How the base the adapter names differs from ``base`` (None: same, or not comparable)."""
    other = _local_base(claimed)
    if other is not None:
        return None if other.path.resolve() == base.path.resolve() else _weights_difference(adapter, other, base)
    ids = hub_ids(base)
    if HUB_ID.fullmatch(claimed) and ids and claimed.lower() not in ids:
        return f"the base is {', '.join(sorted(ids))} on the hub"
    return None


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hub_ids(base: BaseCheckpoint) -> set[str]:
    """The hub ids ``base`` is known by (lower case): as given, from a hub-cache snapshot path
    (``models--org--name/snapshots/...``), or from its config's ``_name_or_path``."""
    ids = {base.name} if not Path(base.name).expanduser().is_dir() else set()
    ids |= {part.removeprefix("models--").replace("--", "/") for part in base.path.absolute().parts
            if part.startswith("models--")}
    recorded = base.config.get("_name_or_path")
    if isinstance(recorded, str) and HUB_ID.fullmatch(recorded) and not Path(recorded).exists():
        ids.add(recorded)
    return {name.lower() for name in ids}


def _local_base(claimed: str) -> BaseCheckpoint | None:
    """The base ``claimed`` names, if its weights are on this machine (never downloaded)."""
    path = Path(claimed).expanduser()
    if not path.is_dir() and HUB_ID.fullmatch(claimed):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(claimed, local_files_only=True))
        except Exception:  # not in the hub cache (or not a valid hub id): nothing local to compare
            return None
    try:
        return BaseCheckpoint(str(path)) if path.is_dir() else None
    except UserError:  # no safetensors there
        return None


def _weights_difference(adapter: PsoftAdapter, other: BaseCheckpoint, base: BaseCheckpoint) -> str | None:
    architectures = other.config.get("architectures"), base.config.get("architectures")
    if all(architectures) and architectures[0] != architectures[1]:
        return f"architecture {architectures[0][0]} there, {architectures[1][0]} here"
    keys = [base_tensor_key(name) for name in adapter.modules]
    for key in keys:
        if other.stored_key(key) not in other.files:
            return f"{other.name} has no tensor {key}"
        if other.shape(key) != base.shape(key):
            shapes = ["×".join(map(str, checkpoint.shape(key))) for checkpoint in (other, base)]
            return f"{key} is {shapes[0]} there, {shapes[1]} here"
    for key in keys:
        if other.fingerprint(key) != base.fingerprint(key):
            return f"{key} holds other weights"
    return None


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

"""From a read adapter to the per-module factors every command consumes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .base import HUB_ID, INDEX_FILE, SINGLE_FILE, BaseCheckpoint, base_tensor_key
from .dtypes import BY_NAME, CHOICES
from .errors import UserError
from .formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PsoftAdapter, read_adapter
from .options import DEFAULTS, ReadOptions
from .progress import track
from .psoft import ModuleFactors, principal_subspace, rotation


@dataclass
class AdapterFactors:
    """Exact factors of every adapted module, the base fingerprints they belong to, how they were
    obtained (``svd``: backend, device and dtype, or ``None`` when no SVD ran) and what the base check
    decided (``base_identity``, see `check_base_identity`; ``None`` without a base)."""

    adapter: PsoftAdapter
    modules: dict[str, ModuleFactors]
    fingerprints: dict[str, dict]
    svd: dict | None
    base_identity: dict | None = None

    @property
    def replaced_tensors(self) -> dict[str, torch.Tensor]:
        return self.adapter.replaced_tensors


def derive_factors(adapter: PsoftAdapter, base: BaseCheckpoint | None, options: ReadOptions = DEFAULTS) -> AdapterFactors:
    """Factors for ``adapter`` on ``base``.

    PEFT adapters rebuild A and B by PEFT's SVD of each base weight, first cast to
    ``options.svd_dtype`` (the dtype the base was loaded in for training; default: as stored)
    on ``options.svd_device``. Paper and materialized adapters carry A and B: no SVD runs. The
    adapter's record of its base must not contradict ``base`` (`check_base_identity`; a warning
    instead with ``options.allow_base_mismatch``), and a PEFT adapter's weights must be the ones
    its config targets (`check_targets`). All of it is checked before any SVD runs.
    """
    svd_device, svd_dtype = options.svd_device, options.svd_dtype
    if adapter.format == "peft" and base is None:
        raise UserError("a PEFT PSOFT adapter stores only R; pass --base so A and B can be rebuilt from it")
    if svd_dtype is not None and svd_dtype not in CHOICES:
        raise UserError(f"--svd-dtype must be one of {', '.join(CHOICES)}, got {svd_dtype!r}")
    if adapter.format == "peft":
        try:
            torch.empty(0, device=svd_device)
        except (RuntimeError, AssertionError) as error:
            raise UserError(f"--svd-device {svd_device!r} is not usable here ({str(error).splitlines()[0]})") from None
    identity = check_fits_base(adapter, base, options) if base is not None else None
    modules: dict[str, ModuleFactors] = {}
    fingerprints: dict[str, dict] = {}
    stored = adapter.metadata.get("modules", {})
    for name, params in track(adapter.modules.items(), desc="factors"):
        weight = base.tensor(base_tensor_key(name)) if base is not None else None
        if weight is not None:
            fingerprints[name] = base.fingerprint(base_tensor_key(name), weight)
        elif name in stored:
            fingerprints[name] = stored[name]["fingerprint"]
        if params.A is not None:
            A, B = params.A, params.B
        else:
            W = weight.to(BY_NAME[svd_dtype].torch) if svd_dtype else weight
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
    return AdapterFactors(adapter=adapter, modules=modules, fingerprints=fingerprints, svd=svd, base_identity=identity)


def check_fits_base(adapter: PsoftAdapter, base: BaseCheckpoint, options: ReadOptions = DEFAULTS) -> dict:
    """Refuse (`UserError`, one line) an adapter whose shapes, recorded base or (PEFT) targets do not
    fit ``base``: every check `derive_factors` makes before an SVD runs. Returns what the base check
    decided (`check_base_identity`)."""
    for name, params in adapter.modules.items():
        _check_base_shape(adapter, name, params, base.shape(base_tensor_key(name)))
    identity = check_base_identity(adapter, base, options)
    if adapter.format == "peft":
        check_targets(adapter, base)
    return identity


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


# The config fields PEFT's target matching reads (`peft.tuners.tuners_utils.check_target_module_exists`).
MATCHING_FIELDS = ("exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")


def check_targets(adapter: PsoftAdapter, base: BaseCheckpoint) -> None:
    """Hold a PEFT adapter's weights to its config as PEFT loads it (PEFT's own target matching).
    Weights of a module the config does not target are refused: PEFT drops them without a word. A
    targeted module of ``base`` without weights keeps its weight, as in PEFT (R stays at its initial
    identity), with a warning; refused where PEFT would start R at random (``init_weights`` false)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils import TRANSFORMERS_MODELS_TO_PSOFT_TARGET_MODULES_MAPPING
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

    config = adapter.source["adapter_config"]
    targets = config.get("target_modules")
    if targets is None:  # PEFT's default for the architecture
        targets = TRANSFORMERS_MODELS_TO_PSOFT_TARGET_MODULES_MAPPING.get(base.config.get("model_type"))
        if targets is None:
            raise UserError(f"{adapter.path / ADAPTER_CONFIG} names no target_modules, and PEFT has no default for "
                            f"model type {base.config.get('model_type')!r}: PEFT cannot load it; set target_modules")
    if targets == INCLUDE_LINEAR_LAYERS_SHORTHAND:  # PEFT resolves it from the model's layer types and saves the names
        return
    matcher = SimpleNamespace(target_modules=targets, target_parameters=None,
                              **{field: config.get(field) for field in MATCHING_FIELDS})
    untargeted = [name for name in adapter.modules if not check_target_module_exists(matcher, name)]
    if untargeted:
        raise UserError(f"{adapter.path / ADAPTER_WEIGHTS} holds weights for {untargeted[0]}"
                        f"{f' and {len(untargeted) - 1} more modules' if len(untargeted) > 1 else ''}, which "
                        f"{ADAPTER_CONFIG} does not target (target_modules {targets}): PEFT would load the adapter "
                        f"without them. Correct target_modules in {ADAPTER_CONFIG}")
    present = {base.stored_key(base_tensor_key(name)) for name in adapter.modules}
    missing = [key.removesuffix(".weight") for key in base.files if key.endswith(".weight") and key not in present
               and check_target_module_exists(matcher, key.removesuffix(".weight"))]
    if not missing:
        return
    message = (f"{adapter.path / ADAPTER_CONFIG} targets {missing[0]}"
               f"{f' and {len(missing) - 1} more modules' if len(missing) > 1 else ''}, but "
               f"{ADAPTER_WEIGHTS} holds no weights for it")
    if config.get("init_weights", True) is not True:
        raise UserError(message + ": with init_weights false PEFT starts its R at random. Correct target_modules")
    warnings.warn(message + ": it stays unchanged (R = I), as PEFT loads it", stacklevel=2)


def check_base_identity(adapter: PsoftAdapter, base: BaseCheckpoint, options: ReadOptions = DEFAULTS) -> dict:
    """Decide what can be decided about whether ``base`` is the base ``adapter`` was made for, and
    return it for the artifact's report (``{"status": "confirmed" | "not checked" | "mismatch
    allowed", "detail": ...}``).

    Refused (`UserError`, one line; a warning with ``options.allow_base_mismatch``) is what
    contradicts ``base``: recorded fingerprints that differ, or the base the adapter names reachable
    here (a directory, or a hub id in the hub cache) with another architecture, shapes or weights;
    and a comparison that failed (fail closed). Confirmed: equal fingerprints or weights, or the same
    name (as given, or the origin ``base``'s own files record: its hub cache entry, its config's
    ``_name_or_path``). Neither (a path on another machine, a hub id beside a plain local directory,
    no record at all): one warning line says what was not checked, and the work goes on."""
    claimed = adapter.base_model_name_or_path
    contradiction = confirmation = unchecked = None
    try:
        if adapter.base_fingerprints:
            contradiction = _recorded_difference(adapter, base)
            confirmation = f"the {len(adapter.base_fingerprints)} recorded base fingerprints match"
        elif claimed:
            contradiction, confirmation, unchecked = _claimed_difference(claimed, adapter, base)
        else:
            unchecked = "it records neither its base's fingerprints nor its base_model_name_or_path"
    except Exception as error:  # fail closed: a comparison that could not be made is no match
        detail = str(error).splitlines()[0] if str(error) else ""
        contradiction = (f"could not check that {base.name} is the base adapter {adapter.path} was trained on "
                         f"({claimed or 'its recorded fingerprints'}): {type(error).__name__}: {detail}")
    if contradiction is not None:
        if not options.allow_base_mismatch:
            raise UserError(contradiction + "; pass the adapter's own base, or --allow-base-mismatch to proceed anyway")
        rebuilt = (" (A and B come from the base given: whether they are the ones the adapter was trained with "
                   "cannot be checked)") if adapter.format == "peft" else ""
        warnings.warn(contradiction + f"; proceeding because --allow-base-mismatch was given{rebuilt}", stacklevel=2)
        return {"status": "mismatch allowed", "detail": contradiction}
    if confirmation is not None:
        return {"status": "confirmed", "detail": confirmation}
    detail = (f"not checked that {base.name} is the base adapter {adapter.path} was trained on"
              f"{f' ({claimed})' if claimed else ''}: {unchecked}")
    warnings.warn(detail + "; proceeding, as nothing contradicts it", stacklevel=2)
    return {"status": "not checked", "detail": detail}


def _recorded_difference(adapter: PsoftAdapter, base: BaseCheckpoint) -> str | None:
    """How ``base`` differs from the base fingerprints ``adapter`` records (None: it does not)."""
    for key, recorded in adapter.base_fingerprints.items():
        actual = base.fingerprint(key)
        if actual != recorded:
            differing = [field for field in ("dtype", "shape") if actual[field] != recorded[field]] or ["values"]
            return (f"base tensor {key} differs from the one adapter {adapter.path} was trained on in its "
                    f"{' and '.join(differing)} ({_described(actual)} in {base.name}, {_described(recorded)} "
                    "when trained)")
    return None


def _described(fingerprint: dict) -> str:
    return f"{fingerprint['dtype']} {'×'.join(map(str, fingerprint['shape']))}, sha256 {fingerprint['sha256'][:12]}…"


def _claimed_difference(claimed: str, adapter: PsoftAdapter,
                        base: BaseCheckpoint) -> tuple[str | None, str | None, str | None]:
    """(what contradicts ``base``, what confirms it, why neither) from the base the adapter names."""
    if claimed == base.name:
        return None, f"the adapter names the base as given ({claimed})", None
    other = _local_base(claimed)
    if other is not None:
        if other.path.resolve() == base.path.resolve():
            return None, f"the adapter names this base ({claimed})", None
        difference = _weights_difference(adapter, other, base)
        if difference is not None:
            return (f"adapter {adapter.path} was trained on {claimed}, not on the base given ({base.name}): "
                    f"{difference}"), None, None
        return None, f"the adapted weights equal those of {claimed}, which the adapter names", None
    origins = base.origins()
    if claimed.rstrip("/").lower() in origins:
        return None, f"the base's own files name it {claimed}, as the adapter does", None
    known = f"{base.name} is known as {', '.join(sorted(origins))}" if origins else f"{base.name} names no origin"
    where = "a path absent here" if not HUB_ID.fullmatch(claimed) else "neither here nor in the hub cache"
    return None, None, f"{claimed} is {where} to compare weights with, and {known}"


def _local_base(claimed: str) -> BaseCheckpoint | None:
    """The base ``claimed`` names, if it is on this machine (never downloaded)."""
    path = Path(claimed).expanduser()
    if not path.is_dir() and HUB_ID.fullmatch(claimed):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(claimed, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError):  # not in the hub cache, or not a hub id
            return None
        if not any((path / name).is_file() for name in (INDEX_FILE, SINGLE_FILE)):
            return None  # only its configs or tokenizer are cached: no weights to compare
    return BaseCheckpoint(str(path)) if path.is_dir() else None


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


def load_factors(adapter_path: str, base: str | BaseCheckpoint | None, options: ReadOptions = DEFAULTS) -> AdapterFactors:
    """Read an adapter in any format and derive its factors on ``base`` (a path, hub id or checkpoint)."""
    if isinstance(base, str):
        base = BaseCheckpoint(base)
    return derive_factors(read_adapter(adapter_path, options), base, options)

"""Readers for the three on-disk PSOFT formats, auto-detected from an adapter directory.

* ``peft``: PEFT's PSOFT adapters (``peft_type: PSOFT``), which store only R's parameters;
  A and B are rebuilt from the base weight by an SVD.
* ``paper``: the paper repository's checkpoints (``peft_type: LORA`` with ``lora_orth.*``
  keys), which store A and B; R uses the lower-triangle convention.
* ``materialized``: psoft-deploy's own self-contained format (see `psoft_deploy.core.materialize`).

A PEFT adapter written by psoft-deploy (`write_peft_adapter`) also holds ``psoft_deploy_base.json``:
the fingerprints of the base tensors it was trained on (sha256, dtype, shape), its absolute path or
hub id, and its hub ids. PEFT never reads the file; psoft-deploy refuses another base with it.

All readers produce a `PsoftAdapter`; `psoft_deploy.core.factors.derive_factors` turns it into
the per-module factors every command consumes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from packaging.version import InvalidVersion, Version

from .base import BaseCheckpoint, base_tensor_key
from .errors import UserError
from .options import DEFAULTS, ReadOptions
from .psoft import RotationSpec, SubspaceSpec
from .tensorfile import open_safetensors, read_safetensors, write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MATERIALIZED_META = "psoft_deploy.json"
MATERIALIZED_WEIGHTS = "psoft_factors.safetensors"
BASE_RECORD = "psoft_deploy_base.json"
BASE_RECORD_FORMAT = "psoft-deploy/base"
PEFT_PREFIX = "base_model.model."
FIRST_SEEDED_PEFT = Version("0.20.0")
MATERIALIZED_FORMAT = "psoft-deploy/materialized"
MATERIALIZED_FORMAT_VERSION = 1
REPLACED_PREFIX = "replaced."


@dataclass
class ModuleParams:
    """One targeted module's stored tensors: R's parameters, and A, B, R where the format keeps them."""

    generator: torch.Tensor
    vector_a: torch.Tensor | None = None
    vector_b: torch.Tensor | None = None
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    R: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclass
class PsoftAdapter:
    """A PSOFT adapter as read from disk, before anything is derived from the base."""

    path: Path
    format: str
    rank: int
    scale: float
    rotation_spec: RotationSpec
    subspace_spec: SubspaceSpec | None
    modules: dict[str, ModuleParams]
    replaced_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    source: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    base_fingerprints: dict[str, dict] = field(default_factory=dict)  # base tensor key → `fingerprint`, if recorded

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.source.get("base_model_name_or_path")

    @property
    def modules_to_save(self) -> list[str] | None:
        """``modules_to_save`` as the adapter declares it (PEFT's names, e.g. ``classifier``), else
        the modules its replaced tensors belong to."""
        declared = self.source.get("adapter_config", {}).get("modules_to_save")
        return declared or sorted({key.rsplit(".", 1)[0] for key in self.replaced_tensors}) or None

    @property
    def file_size(self) -> int:
        return sum(file.stat().st_size for file in self.files)

    @property
    def trainable_parameter_count(self) -> int:
        count = 0
        for module in self.modules.values():
            for vector in (module.generator, module.vector_a, module.vector_b):
                count += vector.numel() if vector is not None else 0
        return count


def adapter_format(path: str | Path) -> str:
    """Which format the adapter directory ``path`` holds: ``materialized``, ``peft``, ``paper``,
    or ``lora`` (a plain LoRA adapter, not PSOFT); anything else is a `UserError`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"adapter {path} does not exist")
    if not path.is_dir():
        raise UserError(f"adapter {path} is a file; pass the directory that holds {ADAPTER_CONFIG}")
    if (path / MATERIALIZED_META).is_file():
        return "materialized"
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise UserError(f"{path} holds no {ADAPTER_CONFIG} or {MATERIALIZED_META}; is it an adapter directory?")
    config = read_json(config_file)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "PSOFT":
        return "peft"
    if peft_type == "LORA":
        with open_safetensors(_adapter_weights(path)) as handle:
            return "paper" if any(".lora_orth." in key for key in handle.keys()) else "lora"
    raise UserError(f"{config_file} has peft_type {config.get('peft_type')!r}; psoft-deploy reads PSOFT adapters")


def read_adapter(path: str | Path, options: ReadOptions = DEFAULTS, format: str | None = None) -> PsoftAdapter:
    """Read an adapter directory in any supported format (``format``: as `adapter_format` found
    it, if already known). ``options.force_unseeded`` and ``options.paper_neumann_terms`` apply to
    PEFT 0.19 low-rank and paper checkpoints."""
    path = Path(path).expanduser()
    format = format or adapter_format(path)
    if format == "materialized":
        return read_materialized(path)
    if format == "lora":
        raise UserError(f"{path} is a plain LoRA adapter, not PSOFT; load it with PEFT directly")
    config_file = path / ADAPTER_CONFIG
    config, tensors = read_json(config_file), read_safetensors(_adapter_weights(path))
    if format == "peft":
        adapter = _read_peft(path, config, tensors, options.force_unseeded)
    else:
        adapter = _read_paper(path, config, tensors, options.paper_neumann_terms)
    adapter.files = [config_file, path / ADAPTER_WEIGHTS]
    if (path / BASE_RECORD).is_file():
        adapter.base_fingerprints = _read_base_record(path / BASE_RECORD)
    check_finite(adapter)
    return adapter


def write_peft_adapter(directory: str | Path, config, parameters: dict[str, dict[str, torch.Tensor]],
                       base: BaseCheckpoint | None = None) -> None:
    """A PSOFT adapter as PEFT saves it: ``config`` (a `PsoftConfig`) as adapter_config.json and,
    per module, R's parameters (``weight``, ``vector_a``, ``vector_b``) under PEFT's keys. With the
    ``base`` it was trained on: ``base_model_name_or_path`` is its hub id or absolute path, and
    psoft_deploy_base.json records it (fingerprints of the adapted base tensors, hub ids)."""
    directory = Path(directory)
    if base is not None:
        config.base_model_name_or_path = base.reference
        keys = [base_tensor_key(name) for name in parameters]
        record = {"format": BASE_RECORD_FORMAT, "name_or_path": base.reference, "hub_ids": sorted(base.hub_ids()),
                  "tensors": {key: base.fingerprint(key) for key in keys}}
        directory.mkdir(parents=True, exist_ok=True)
        (directory / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    config.save_pretrained(directory)
    tensors = {f"{PEFT_PREFIX}{name}.psoft_R.{key}": value.detach().float().cpu().contiguous()
               for name, params in parameters.items() for key, value in params.items()}
    write_safetensors(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def _read_base_record(file: Path) -> dict[str, dict]:
    """The base fingerprints `write_peft_adapter` recorded in ``file``."""
    record = read_json(file)
    tensors = record.get("tensors")
    if record.get("format") != BASE_RECORD_FORMAT or not isinstance(tensors, dict) or not all(
            isinstance(value, dict) and {"sha256", "dtype", "shape"} <= value.keys() for value in tensors.values()):
        raise UserError(f"{file} is not a {BASE_RECORD_FORMAT} record of base fingerprints; restore it from the "
                        "adapter's source, or delete it to rely on base_model_name_or_path alone")
    return tensors


def read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{file} is not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{file} must hold a JSON object")
    return value


def check_finite(adapter: PsoftAdapter) -> None:
    for name, module in adapter.modules.items():
        for kind, tensor in module.tensors().items():
            if not torch.isfinite(tensor).all():
                raise UserError(f"{adapter.path}: {kind} of {name} holds NaN or Inf; the adapter is broken")


def _adapter_weights(path: Path) -> Path:
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file() and (path / "adapter_model.bin").is_file():
        raise UserError(
            f"{path} has only adapter_model.bin (pickle); psoft-deploy reads safetensors only. Re-save it with "
            "PEFT's save_pretrained(dir, safe_serialization=True)"
        )
    return weights


def _group_modules(tensors: dict[str, torch.Tensor], markers: dict[str, str]) -> tuple[dict, dict]:
    """Split state-dict keys into per-module adapter tensors and replaced base tensors."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for marker, kind in markers.items():
            if name.endswith(marker):
                modules.setdefault(name.removesuffix(marker), {})[kind] = tensor
                break
        else:
            replaced[name] = tensor
    return modules, replaced


def _peft_version(config: dict) -> Version | None:
    try:
        return Version(str(config["peft_version"]).split("@")[0])
    except (KeyError, InvalidVersion):
        return None


def _read_peft(path: Path, config: dict, tensors: dict, force_unseeded: bool) -> PsoftAdapter:
    rank = _positive_int(config, "r", path)
    if isinstance(config.get("target_modules"), str) and config.get("layers_to_transform") is not None:
        raise UserError(f"{path / ADAPTER_CONFIG} has a regex target_modules with layers_to_transform, which PEFT "
                        "refuses to load (its matching would ignore the layers); remove layers_to_transform or list "
                        "the adapted modules in target_modules")
    markers = {".psoft_R.weight": "generator", ".psoft_R.vector_a": "vector_a", ".psoft_R.vector_b": "vector_b"}
    grouped, replaced = _group_modules(tensors, markers)
    if not grouped:
        raise UserError(f"{path / ADAPTER_WEIGHTS} holds no psoft_R tensors; is it a PSOFT adapter?")
    orth = bool(config.get("psoft_orth", True))
    expected = (rank * (rank - 1) // 2,) if orth else (rank, rank)
    modules = {}
    for name, parts in sorted(grouped.items()):
        if "generator" not in parts:
            raise UserError(f"{path / ADAPTER_WEIGHTS} lacks {PEFT_PREFIX}{name}.psoft_R.weight")
        if tuple(parts["generator"].shape) != expected:
            raise UserError(
                f"{name}.psoft_R.weight has shape {tuple(parts['generator'].shape)}, expected {expected} for r={rank}"
            )
        modules[name] = ModuleParams(**parts)

    version = _peft_version(config)
    svd = config.get("psoft_svd", "full")
    seeded = "random_seed" in config and (version is None or version >= FIRST_SEEDED_PEFT)
    if svd == "lowrank" and not seeded:
        if not force_unseeded:
            raise UserError(
                f"{path} was written by PEFT {version or '< 0.20'} with psoft_svd='lowrank', which ran the SVD "
                "unseeded: its A and B cannot be reproduced. Pass --force-unseeded to rebuild them anyway (the "
                "result will differ from the trained model)"
            )
    subspace = SubspaceSpec(
        svd=svd,
        niter=int(config.get("psoft_svd_lowrank_niter", 10)),
        seed=int(config.get("random_seed", 0)) if seeded else None,
        init=config.get("ab_svd_init", "psoft_init"),
    )
    if subspace.svd not in ("full", "lowrank") or subspace.init not in ("psoft_init", "pissa_init"):
        raise UserError(f"{path / ADAPTER_CONFIG}: unknown psoft_svd {svd!r} or ab_svd_init {subspace.init!r}")
    rotation = RotationSpec(
        convention="peft",
        orth=orth,
        cayley_neumann=bool(config.get("use_cayley_neumann", False)),
        neumann_terms=int(config.get("num_cayley_neumann_terms", 5)),
        neumann_eps=config.get("cayley_neumann_eps"),
    )
    return _adapter(path, "peft", config, str(version) if version else None, rank=rank,
                    scale=float(config.get("psoft_alpha", rank)) / rank, rotation_spec=rotation,
                    subspace_spec=subspace, modules=modules, replaced_tensors=replaced)


def _adapter(path: Path, format: str, config: dict, peft_version: str | None, **fields) -> PsoftAdapter:
    """A `PsoftAdapter` read from an ``adapter_config.json`` (its source recorded as read)."""
    source = {"format": format, "peft_version": peft_version,
              "base_model_name_or_path": config.get("base_model_name_or_path"), "adapter_config": config}
    return PsoftAdapter(path=path, format=format, fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
                        source=source, **fields)


def _read_paper(path: Path, config: dict, tensors: dict, neumann_terms: int | None) -> PsoftAdapter:
    rank = _positive_int(config, "r", path)
    markers = {
        ".lora_A.weight": "A",
        ".lora_B.weight": "B",
        ".lora_orth.a_params": "generator",
        ".lora_orth.mag_vector_a": "vector_a",
        ".lora_orth.mag_vector_b": "vector_b",
        ".lora_orth.indices_lower": "indices",
    }
    grouped, replaced = _group_modules(tensors, markers)
    modules = {}
    for name, parts in sorted(grouped.items()):
        missing = {"A", "B", "generator"} - parts.keys()
        if missing:
            raise UserError(f"{path / ADAPTER_WEIGHTS}: module {name} lacks {', '.join(sorted(missing))}")
        parts.pop("indices", None)  # always torch.tril_indices(r, r, -1): the convention is fixed
        if parts["A"].shape[0] != rank or parts["B"].shape[1] != rank:
            raise UserError(f"{name}: lora_A/lora_B shapes {tuple(parts['A'].shape)}/{tuple(parts['B'].shape)} "
                            f"do not have rank r={rank}")
        modules[name] = ModuleParams(**parts)
    orth = next(iter(modules.values())).generator.dim() == 1
    terms = config.get("num_cayley_neumann_terms", neumann_terms)
    use_neumann = bool(config.get("use_cayley_neumann", terms is not None))
    alpha = float(config.get("lora_alpha", rank))
    return _adapter(path, "paper", config, config.get("peft_version"), rank=rank,
                    scale=lora_scaling(alpha, rank, bool(config.get("use_rslora"))),
                    rotation_spec=RotationSpec(convention="paper", orth=orth, cayley_neumann=use_neumann,
                                               neumann_terms=int(terms or 0)),
                    subspace_spec=None, modules=modules, replaced_tensors=replaced)


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha over the rank, over √rank with rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def _positive_int(config: dict, key: str, path: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{path / ADAPTER_CONFIG}: {key!r} must be a positive integer, got {value!r}")
    return value


def read_materialized(path: Path) -> PsoftAdapter:
    """Read a materialized adapter directory (no SVD, no base needed)."""
    meta_file = path / MATERIALIZED_META
    metadata = read_json(meta_file)
    if metadata.get("format") != MATERIALIZED_FORMAT or metadata.get("format_version") != MATERIALIZED_FORMAT_VERSION:
        raise UserError(
            f"{meta_file} is not a {MATERIALIZED_FORMAT} v{MATERIALIZED_FORMAT_VERSION} file "
            f"(format {metadata.get('format')!r}, version {metadata.get('format_version')!r}); "
            "re-materialize the adapter with this psoft-deploy"
        )
    tensors = read_safetensors(path / MATERIALIZED_WEIGHTS)
    try:
        modules = {}
        for name in metadata["modules"]:
            parts = {
                kind: tensors[f"{name}.{kind}"]
                for kind in ("A", "B", "R", "generator", "vector_a", "vector_b")
                if f"{name}.{kind}" in tensors
            }
            modules[name] = ModuleParams(**parts)
            if modules[name].A is None or modules[name].B is None or modules[name].R is None:
                raise KeyError(f"{name}.A/B/R")
        replaced = {key: tensors[REPLACED_PREFIX + key] for key in metadata["replaced_tensors"]}
        subspace = metadata["subspace"]
        adapter = PsoftAdapter(
            path=path,
            format="materialized",
            rank=int(metadata["rank"]),
            scale=float(metadata["scale"]),
            rotation_spec=RotationSpec(**metadata["rotation"]),
            subspace_spec=SubspaceSpec(**subspace) if subspace else None,
            modules=modules,
            replaced_tensors=replaced,
            fan_in_fan_out=bool(metadata["fan_in_fan_out"]),
            source=metadata["source"],
            metadata=metadata,
            files=[meta_file, path / MATERIALIZED_WEIGHTS],
            base_fingerprints={module["base_tensor"]: module["fingerprint"] for module in metadata["modules"].values()},
        )
    except (KeyError, TypeError) as error:
        raise UserError(f"{path} is an incomplete materialized adapter (missing {error}); re-materialize it") from None
    check_finite(adapter)
    return adapter

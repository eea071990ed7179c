"""psoft-deploy's materialized adapter: exact factors plus base fingerprints, no SVD to load.

Layout of a materialized directory:

* ``psoft_factors.safetensors``: per module ``<module>.A`` (r, in), ``<module>.B`` (out, r),
  ``<module>.R`` (r, r), and the trained parameters R came from (``<module>.generator``,
  ``.vector_a``, ``.vector_b``); ``modules_to_save`` tensors under ``replaced.<key>``.
* ``psoft_deploy.json``: rank, scale, rotation and subspace specs, the source format and
  versions, the SVD backend/device/dtype used, and each base tensor's fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from . import __version__
from .errors import UserError
from .factors import AdapterFactors, base_tensor_key
from .formats import (
    MATERIALIZED_META,
    MATERIALIZED_WEIGHTS,
    ModuleParams,
    PsoftAdapter,
    check_finite,
    read_json,
    read_safetensors,
)
from .outputs import atomic_output_dir
from .psoft import RotationSpec, SubspaceSpec

FORMAT = "psoft-deploy/materialized"
FORMAT_VERSION = 1
REPLACED_PREFIX = "replaced."


def write_materialized(factors: AdapterFactors, output: str | Path, *, base_name: str, overwrite: bool = False) -> Path:
    """Write ``factors`` as a self-contained materialized adapter directory (complete or not at all)."""
    with atomic_output_dir(output, overwrite) as staging:
        save_materialized_files(factors, staging, base_name)
    return Path(output)


def save_materialized_files(factors: AdapterFactors, directory: Path, base_name: str) -> None:
    """Write the materialized adapter's two files into ``directory``."""
    adapter = factors.adapter
    tensors = {}
    for name, module in factors.modules.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"], tensors[f"{name}.R"] = module.A, module.B, module.R
        for kind, tensor in adapter.modules[name].tensors().items():
            if kind not in ("A", "B", "R"):
                tensors[f"{name}.{kind}"] = tensor
    for key, tensor in factors.replaced_tensors.items():
        tensors[REPLACED_PREFIX + key] = tensor
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "psoft-deploy", "version": __version__},
        "source": adapter.source,
        "base": {"name_or_path": base_name},
        "rank": adapter.rank,
        "scale": adapter.scale,
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "rotation": asdict(adapter.rotation_spec),
        "subspace": asdict(adapter.subspace_spec) if adapter.subspace_spec else None,
        "svd": factors.svd,
        "modules": {
            name: {"base_tensor": base_tensor_key(name), "fingerprint": factors.fingerprints[name]}
            for name in factors.modules
        },
        "replaced_tensors": sorted(factors.replaced_tensors),
    }
    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    save_file(tensors, directory / MATERIALIZED_WEIGHTS, metadata={"format": FORMAT})
    (directory / MATERIALIZED_META).write_text(json.dumps(metadata, indent=2) + "\n")


def read_materialized(path: Path) -> PsoftAdapter:
    """Read a materialized adapter directory (no SVD, no base needed)."""
    meta_file = path / MATERIALIZED_META
    metadata = read_json(meta_file)
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{meta_file} is not a {FORMAT} v{FORMAT_VERSION} file "
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
        )
    except (KeyError, TypeError) as error:
        raise UserError(f"{path} is an incomplete materialized adapter (missing {error}); re-materialize it") from None
    check_finite(adapter)
    return adapter

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

from . import __version__
from .factors import AdapterFactors, base_tensor_key
from .formats import (
    MATERIALIZED_FORMAT,
    MATERIALIZED_FORMAT_VERSION,
    MATERIALIZED_META,
    MATERIALIZED_WEIGHTS,
    REPLACED_PREFIX,
)
from .tensorfile import write_safetensors


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
        "format": MATERIALIZED_FORMAT,
        "format_version": MATERIALIZED_FORMAT_VERSION,
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
    # Own copies: R of a non-orthogonal adapter is its stored parameter itself, and safetensors
    # refuses tensors that share memory.
    tensors = {key: value.detach().cpu().clone().contiguous() for key, value in tensors.items()}
    write_safetensors(tensors, directory / MATERIALIZED_WEIGHTS, metadata={"format": MATERIALIZED_FORMAT})
    (directory / MATERIALIZED_META).write_text(json.dumps(metadata, indent=2) + "\n")

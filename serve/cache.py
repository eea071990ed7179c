"""Exact LoRA forms of PSOFT adapters, converted once and kept by content hash.

Each conversion goes through the shared pipeline (verified layer by layer). The key covers the
adapter's files, the fingerprints of the base tensors it adapts and the reading options, so a restart converts nothing twice and a changed base or
adapter never reuses a stale conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch

from psoft_deploy.converters.lora import EXPORT_META, read_export_metadata
from psoft_deploy.converters.lora_format import LoraAdapter, lora_keys, vllm_max_lora_rank
from psoft_deploy.converters.pipeline import export_lora
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import base_tensor_key, derive_factors
from psoft_deploy.core.formats import adapter_format, read_adapter
from psoft_deploy.core.options import DEFAULTS, ReadOptions, WriteOptions
from psoft_deploy.core.outputs import atomic_output_dir, check_writable
from psoft_deploy.core.progress import warning
from psoft_deploy.core.tensorfile import SafetensorError

CACHE_VERSION = b"psoft-deploy/lora-cache/v2"  # v2: entries carry a layerwise verification report


def default_cache_dir() -> Path:
    """``$PSOFT_DEPLOY_CACHE``, else ``$XDG_CACHE_HOME/psoft-deploy/lora`` (``~/.cache`` by default)."""
    if os.environ.get("PSOFT_DEPLOY_CACHE"):
        return Path(os.environ["PSOFT_DEPLOY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "psoft-deploy" / "lora"


T = TypeVar("T")


def read_back(entry: Path, read: Callable[[Path], T]) -> T | None:
    """``read(entry)`` for a cache entry, None where there is none. An entry that does not read back
    (truncated, corrupt, tensors missing) is removed, with one line, to be built again."""
    if not entry.exists():
        return None
    try:
        return read(entry)
    except (UserError, SafetensorError, OSError, ValueError, KeyError) as error:
        warning(f"cache entry {entry} does not read back ({error}); building it again")
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _converted_rank(entry: Path) -> int:
    """The PSOFT rank of the conversion in ``entry``, once its LoRA form reads back whole."""
    record = json.loads((entry / EXPORT_META).read_text())
    missing = set(record["modules"]) - set(LoraAdapter.read(entry).modules)
    if missing:
        raise KeyError(f"no LoRA weights for {', '.join(sorted(missing))}")
    return record["psoft_rank"]


class LoraCache:
    """Converts adapters for one base into vLLM-ready exact LoRA directories under ``root``."""

    def __init__(self, root: Path, base: BaseCheckpoint, options: ReadOptions = DEFAULTS):
        self.root = Path(root)
        self.base = base
        self.options = options

    def prepare(self, adapter_path: Path) -> tuple[Path, int]:
        """A LoRA directory vLLM can load for ``adapter_path`` (PSOFT in any format, or LoRA),
        and its rank. PSOFT adapters are converted (or found in the cache); LoRA adapters are
        checked against the base and used in place."""
        adapter_path = Path(adapter_path)
        format = adapter_format(adapter_path)
        if format == "lora":
            return adapter_path, self._check_lora(adapter_path)
        return self._convert(adapter_path, format)

    def _convert(self, adapter_path: Path, format: str) -> tuple[Path, int]:
        adapter = read_adapter(adapter_path, self.options, format)
        vllm_max_lora_rank(adapter.rank, f"adapter {adapter_path}")  # refused before anything is converted
        digest = hashlib.sha256(CACHE_VERSION)
        for file in sorted(adapter.files):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        for name in sorted(adapter.modules):
            digest.update(self.base.fingerprint(base_tensor_key(name))["sha256"].encode())
        digest.update(json.dumps(asdict(self.options), sort_keys=True).encode())
        entry = self.root / digest.hexdigest()[:32]
        rank = read_back(entry, _converted_rank)
        if rank is None:
            check_writable(entry, "converted adapter")
            factors = derive_factors(adapter, self.base, self.options)
            try:
                export_lora(self.base, factors, entry, options=WriteOptions(target="vllm", verify_mode="layerwise"))
            except UserError:
                if not (entry / EXPORT_META).is_file():  # not a concurrent conversion of the same adapter
                    raise
            rank = _converted_rank(entry)
        return entry, rank

    def _check_lora(self, adapter_path: Path) -> int:
        """A LoRA adapter checked (PEFT's rules, its shapes against the base, vLLM's limits and, for
        export-lora outputs, the base fingerprints); its rank."""
        lora = LoraAdapter.read(adapter_path)
        lora.check_fits(self.base)
        lora.check_vllm(f"adapter {adapter_path}")
        for module, record in read_export_metadata(adapter_path).get("modules", {}).items():
            expected = record.get("fingerprint")
            if expected and expected != self.base.fingerprint(base_tensor_key(module)):
                raise UserError(f"LoRA adapter {adapter_path} was exported for another base ({module} differs)")
        return lora.max_rank

    def zero_adapter(self, module: str) -> Path:
        """A rank-1 all-zero LoRA on one module: served in place of the bare base on CPU (see serve)."""
        out_features, in_features = self.base.shape(base_tensor_key(module))
        entry = self.root / f"zero-{hashlib.sha256(f'{module}:{out_features}x{in_features}'.encode()).hexdigest()[:16]}"
        if read_back(entry, LoraAdapter.read) is None:
            with atomic_output_dir(entry, overwrite=True) as staging:
                zero = LoraAdapter(r=1, lora_alpha=1, target_modules=[module.rsplit(".", 1)[-1]],
                                   base_model_name_or_path=str(self.base.path))
                zero.write(staging, dict(zip(lora_keys(module), (torch.zeros(1, in_features),
                                                                 torch.zeros(out_features, 1)))))
        return entry


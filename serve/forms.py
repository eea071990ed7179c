"""What vLLM gets for an adapter serve makes servable, named at start or arriving later.

Where the base's shared basis is held, a PEFT PSOFT adapter from PEFT's full SVD becomes its k×k
cores straight from R (`SharedBasis.psoft_form`: no SVD, no forward, k² numbers per module); any
other adapter gets its exact LoRA form (`LoraCache`, verified layer by layer), kept as cores when
that form lies in the basis (`SharedBasis.shared_form`), else served as exact LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from psoft_deploy.converters.lora_format import LoraAdapter, vllm_max_lora_rank
from psoft_deploy.core.factors import check_fits_base
from psoft_deploy.core.formats import adapter_format, read_adapter
from psoft_deploy.serve.cache import LoraCache
from psoft_deploy.serve.shared import SharedBasis


@dataclass(frozen=True)
class Servable:
    """The directory vLLM loads for an adapter, its rank, whether it holds cores, and how they were
    obtained and checked (or why the adapter is served as exact LoRA)."""

    path: Path
    rank: int
    cores: bool
    why: str
    modules: tuple[str, ...]


class AdapterForms:
    """Makes adapters servable for one base: cores over ``basis`` where they are exact, else exact LoRA."""

    def __init__(self, cache: LoraCache, basis: SharedBasis | None):
        self.cache = cache
        self.basis = basis

    def prepare(self, adapter_path: Path) -> Servable:
        """``adapter_path`` (PSOFT in any format, or LoRA) as vLLM loads it; a `UserError` (one line) for
        an adapter that does not fit the base."""
        adapter_path = Path(adapter_path)
        format = adapter_format(adapter_path)
        if self.basis is not None and format == "peft":
            adapter = read_adapter(adapter_path, self.cache.options, format)
            vllm_max_lora_rank(adapter.rank, f"adapter {adapter_path}")
            check_fits_base(adapter, self.cache.base, self.cache.options)
            entry, why = self.basis.psoft_form(adapter, self.cache.root, self.cache.options)
            if entry is not None:
                return Servable(entry, adapter.rank, True, why, tuple(adapter.modules))
        lora_dir, rank = self.cache.prepare(adapter_path)
        modules = tuple(LoraAdapter.read(lora_dir).modules)
        if self.basis is None:
            return Servable(lora_dir, rank, False, "no shared basis is held", modules)
        entry, why = self.basis.shared_form(lora_dir, self.cache.root)
        return Servable(entry or lora_dir, rank, entry is not None, why, modules)

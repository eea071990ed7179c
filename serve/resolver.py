"""A vLLM LoRA resolver: a request for an unknown model ``NAME`` is served from
``ADAPTER_ROOT/NAME`` when that directory holds a PSOFT (or LoRA) adapter for the served base.

Registered by psoft-deploy's vLLM plugin (`psoft_deploy.serve.plugin`); configured by the
environment `psoft-deploy serve` sets (``PSOFT_DEPLOY_ADAPTER_ROOT``, ``PSOFT_DEPLOY_BASE``,
``PSOFT_DEPLOY_CACHE``, ``PSOFT_DEPLOY_MAX_LORA_RANK``, the adapter-reading options as
``PSOFT_DEPLOY_READ_OPTIONS``, and ``PSOFT_DEPLOY_SHARED_BASIS`` where adapters that lie in the
base's shared basis are served as its cores). vLLM consults it only with
``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from psoft_deploy.serve.names import SAFE_NAME

RESOLVER_NAME = "psoft-deploy"
logger = logging.getLogger("vllm.psoft_deploy.resolver")  # under vLLM's logger: in its log


def directory_inside(root: Path, path: str) -> Path | None:
    """The directory ``path`` names (absolute, or relative to ``root``), symlinks resolved, if it lies
    inside ``root`` at any depth (not ``root`` itself); else None. A path whose text leads outside
    ``root`` is refused before anything on disk is looked at."""
    try:
        given = Path(os.path.abspath(root)) / path  # an absolute ``path`` stands for itself
        real_root = Path(root).resolve()
        lexical = Path(os.path.normpath(given))
        if not any(top in lexical.parents for top in (Path(os.path.abspath(root)), real_root)):
            return None
        candidate = given.resolve()
        return candidate if real_root in candidate.parents and candidate.is_dir() else None
    except (OSError, ValueError):  # a loop of links, a NUL byte
        return None


def adapter_directory(root: Path, name: str) -> Path | None:
    """``root/name`` if ``name`` is a safe single component and the directory, symlinks resolved,
    lies directly in ``root``; else None."""
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        return None
    candidate = directory_inside(root, name)
    return candidate if candidate is not None and candidate.parent == Path(root).resolve() else None


class PsoftResolver(LoRAResolver):
    """Resolves adapter names to exact LoRA conversions of ``ADAPTER_ROOT/NAME``."""

    def __init__(self, root: Path, base: str, cache_dir: Path, max_lora_rank: int | None, basis: Path | None = None,
                 require_cores: bool = False):
        self.root = Path(root)
        self.base = base
        self.cache_dir = Path(cache_dir)
        self.max_lora_rank = max_lora_rank
        self.basis = basis
        self.require_cores = require_cores  # --adapter-form shared: an adapter outside the basis is refused
        self._forms = None

    def prepare(self, directory: Path) -> tuple[Path, int]:
        """The directory vLLM loads for the adapter in ``directory`` (cores, or exact LoRA) and its rank."""
        if self._forms is None:
            from psoft_deploy.core.base import BaseCheckpoint
            from psoft_deploy.core.options import ReadOptions
            from psoft_deploy.serve.cache import LoraCache
            from psoft_deploy.serve.forms import AdapterForms
            from psoft_deploy.serve.shared import SharedBasis

            cache = LoraCache(self.cache_dir, BaseCheckpoint(self.base), ReadOptions.from_env(os.environ))
            self._forms = AdapterForms(cache, SharedBasis(self.basis) if self.basis is not None else None)
        servable = self._forms.prepare(directory)
        if self.require_cores and not servable.cores:
            from psoft_deploy.core.errors import UserError

            raise UserError(f"{directory} is not in the base's shared basis ({servable.why}) and this server holds "
                            "cores only (--adapter-form shared)")
        logger.info("psoft-deploy resolver: %s served as %s (%s)", directory,
                    "cores over the shared basis" if servable.cores else "exact LoRA", servable.why)
        return servable.path, servable.rank

    async def servable(self, directory: Path) -> Path:
        """What vLLM loads for the adapter in ``directory`` (`prepare`, run off the event loop); raises
        where it cannot be served (a rank above vLLM's ``--max-lora-rank`` included)."""
        lora_path, rank = await asyncio.to_thread(self.prepare, directory)
        if self.max_lora_rank is not None and rank > self.max_lora_rank:
            raise ValueError(f"rank {rank} is above this server's --max-lora-rank {self.max_lora_rank}")
        return lora_path

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if Path(base_model_name).resolve() != Path(self.base).resolve():
            return None
        directory = adapter_directory(self.root, lora_name)
        if directory is None:
            logger.warning("psoft-deploy resolver: refused adapter name %r", lora_name)
            return None
        try:
            lora_path = await self.servable(directory)
        except Exception as error:  # a bad adapter must not take the server down
            logger.warning("psoft-deploy resolver: %s is not usable: %s", directory, error)
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(lora_path))


def register() -> None:
    """Register the resolver serve configured (``PSOFT_DEPLOY_ADAPTER_ROOT``), once per process."""
    root = os.environ.get("PSOFT_DEPLOY_ADAPTER_ROOT")
    if not root or RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        return
    max_rank = os.environ.get("PSOFT_DEPLOY_MAX_LORA_RANK")
    resolver = PsoftResolver(
        root=Path(root),
        base=os.environ["PSOFT_DEPLOY_BASE"],
        cache_dir=Path(os.environ["PSOFT_DEPLOY_CACHE"]),
        max_lora_rank=int(max_rank) if max_rank else None,
        basis=Path(os.environ["PSOFT_DEPLOY_SHARED_BASIS"]) if os.environ.get("PSOFT_DEPLOY_SHARED_BASIS") else None,
        require_cores=os.environ.get("PSOFT_DEPLOY_REQUIRE_CORES") == "1",
    )
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)

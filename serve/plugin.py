"""psoft-deploy's vLLM plugin (entry point ``vllm.general_plugins: psoft_deploy``), loaded by vLLM in
each of its processes. It does nothing unless `psoft-deploy serve` configured it through the
environment: ``PSOFT_DEPLOY_ADAPTER_ROOT`` registers the adapter resolver
(`psoft_deploy.serve.resolver`) and restricts vLLM's load endpoint to the root
(`psoft_deploy.serve.endpoint`; patched in every process, so the API server's never misses it);
``PSOFT_DEPLOY_SHARED_BASIS`` extends vLLM's LoRA layers to hold
PSOFT adapters as cores over that basis (`psoft_deploy.serve.vllm_shared`), with
``PSOFT_DEPLOY_REQUIRE_CORES`` when an adapter vLLM cannot hold as cores in every module must be
refused (``--adapter-form shared``), and ``PSOFT_DEPLOY_EXACT_LORA`` when an adapter served at start is exact
LoRA (the layers holding cores then run vLLM's LoRA path from the start)."""

from __future__ import annotations

import os

_installed: set[str] = set()


def register() -> None:
    """Entry point for vLLM's plugin loader; safe to call more than once per process."""
    if os.environ.get("PSOFT_DEPLOY_ADAPTER_ROOT"):
        from psoft_deploy.serve import endpoint, resolver

        resolver.register()
        endpoint.install()
    basis = os.environ.get("PSOFT_DEPLOY_SHARED_BASIS")
    if basis and "shared" not in _installed:
        from psoft_deploy.serve import vllm_shared

        vllm_shared.install(basis, require_cores=os.environ.get("PSOFT_DEPLOY_REQUIRE_CORES") == "1",
                            exact_lora=os.environ.get("PSOFT_DEPLOY_EXACT_LORA") == "1")
        _installed.add("shared")

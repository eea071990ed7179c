"""vLLM's load endpoint (``POST /v1/load_lora_adapter``) for every adapter serve reads, inside the
adapter root only.

Installed by psoft-deploy's plugin (in each of vLLM's processes; the API server's serves the endpoint)
when serve has an adapter root (which turns the endpoint on). The posted ``lora_path`` (absolute, or relative to the root) must name a
directory inside the root, at any depth, symlinks resolved (`directory_inside`); any other path gets a
400 before anything under it is read. The adapter is made servable as the resolver makes the root's
adapters servable (`PsoftResolver.servable`: cores over the shared basis, or exact LoRA), off the event
loop, and vLLM loads that; an adapter that cannot be served gets a 400 saying why in one line. vLLM's
own loads of the ``--lora-modules`` serve passes at start (`init_static_loras`) pass unchanged.

The handler's method is patched, not the route, so that vLLM's API key check and request validation
run first. Relies on `RELIED_ON` and `READS` (vLLM 0.32); a vLLM without it refuses to start rather than serve
the endpoint unrestricted.
"""

from __future__ import annotations

from http import HTTPStatus

from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest
from vllm.lora.resolver import LoRAResolverRegistry

from psoft_deploy.core.errors import UserError
from psoft_deploy.core.tensorfile import SafetensorError
from psoft_deploy.serve.resolver import RESOLVER_NAME, directory_inside
from psoft_deploy.serve.vllm_shared import missing_internals

RELIED_ON = {
    (OpenAIServingModels, "load_lora_adapter"): "(self, request, base_model_name)",
    (OpenAIServingModels, "__init__"): "(self, engine_client, base_model_paths, *, lora_modules)",
    (LoadLoRAAdapterRequest, "model_copy"): "(self, *, update, deep)",
}
READS = {OpenAIServingModels: ("static_lora_modules",), LoadLoRAAdapterRequest: ("lora_name", "lora_path")}


def install() -> None:
    """Restrict and extend ``OpenAIServingModels.load_lora_adapter`` in this process (once)."""
    missing = missing_internals(RELIED_ON, READS)
    if missing:
        raise RuntimeError(f"psoft-deploy: {missing}; the load endpoint cannot be restricted to the adapter root")
    load = OpenAIServingModels.load_lora_adapter
    if getattr(load, "psoft_deploy", False):
        return
    resolver = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)

    async def load_lora_adapter(self, request, base_model_name=None):
        static = getattr(self, "static_lora_modules", None) or []
        if any((module.name, module.path) == (request.lora_name, request.lora_path) for module in static):
            return await load(self, request, base_model_name)
        directory = directory_inside(resolver.root, request.lora_path)
        if directory is None:
            return refused(f"lora_path {request.lora_path!r} is not a directory inside this server's adapter root")
        try:
            servable = await resolver.servable(directory)
        except (UserError, SafetensorError, OSError, ValueError, KeyError) as error:  # the adapter's, not the server's
            return refused(f"lora_path {request.lora_path!r} is not a servable adapter: {one_line(error)}")
        answer = await load(self, request.model_copy(update={"lora_path": str(servable)}), base_model_name)
        if isinstance(answer, str) or answer.error.code != HTTPStatus.INTERNAL_SERVER_ERROR:
            return answer
        return refused(f"lora_path {request.lora_path!r}: vLLM could not load it: {one_line(answer.error.message)}")

    load_lora_adapter.psoft_deploy = True
    OpenAIServingModels.load_lora_adapter = load_lora_adapter


def refused(message: str):
    return create_error_response(message=message, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST,
                                 param="lora_path")


def one_line(error: Exception | str) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else repr(error)


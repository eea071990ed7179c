"""`psoft-deploy serve`: PSOFT adapters on one vLLM OpenAI-compatible server.

Each adapter is converted to its exact LoRA form (through `LoraCache`), and vLLM's server
is started with ``--enable-lora --lora-modules ...``; with an adapter root, the resolver
plugin serves adapters dropped there later.

vLLM CPU defect handled here: a request without an adapter that shares a batch with adapter
requests gets the adapter in the last LoRA slot (upstream PR 48421). On CPU the base model is
therefore served as an all-zero rank-1 LoRA under the base's name, so every request carries an
adapter and none takes that path; the engine's own name for the bare base is kept internal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import click

from psoft_deploy.base import BaseCheckpoint, open_safetensors
from psoft_deploy.converters.lora import vllm_lora_target_modules, vllm_max_lora_rank
from psoft_deploy.errors import UserError
from psoft_deploy.formats import ADAPTER_WEIGHTS, PEFT_PREFIX
from psoft_deploy.serve.cache import LoraCache
from psoft_deploy.serve.resolver import SAFE_NAME

INTERNAL_BASE_NAME = "psoft-deploy-internal-bare-base"
RESOLVER_HEADROOM = 4  # extra LoRA slots for adapters resolved from the adapter root
HEALTH_TIMEOUT_S = 900


@dataclass
class ServePlan:
    """The vLLM command line and environment that serve the given adapters."""

    command: list[str]
    env: dict[str, str]
    served: dict[str, Path] = field(default_factory=dict)  # client-visible name -> LoRA directory
    base_name: str = ""


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def plan_serve(
    base: str,
    adapters: dict[str, str],
    *,
    adapter_root: str | None,
    host: str,
    port: int,
    cache_dir: Path,
    vllm_args: tuple[str, ...] = (),
    factor_options: dict | None = None,
    cpu: bool | None = None,
) -> ServePlan:
    """Convert the adapters (or find them in the cache) and lay out the vLLM invocation."""
    checkpoint = BaseCheckpoint(base)
    cache = LoraCache(cache_dir, checkpoint, factor_options)
    for name in adapters:
        if not SAFE_NAME.fullmatch(name) or name == base:
            raise UserError(f"adapter name {name!r} must be letters, digits, '.', '_', '-' and differ from the base")
    served, ranks = {}, []
    for name, path in adapters.items():
        click.echo(f"psoft-deploy: preparing adapter {name} from {path}", err=True)
        served[name], rank = cache.prepare(Path(path))
        ranks.append(rank)
    cpu = on_cpu() if cpu is None else cpu
    if cpu:
        served[base] = cache.zero_adapter(_zero_target(checkpoint, served))
    explicit = " ".join(vllm_args)
    max_rank = vllm_max_lora_rank(max(ranks, default=1)) if adapter_root is None else max(
        vllm_max_lora_rank(max(ranks, default=1)), 64)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(checkpoint.path),
        "--served-model-name", INTERNAL_BASE_NAME if cpu else base,
        "--host", host, "--port", str(port),
        "--enable-lora",
        "--lora-modules", *[f"{name}={path}" for name, path in served.items()],
    ]
    targets = vllm_lora_target_modules(_lora_modules(served))
    if targets and not adapter_root and "--lora-target-modules" not in explicit:
        command += ["--lora-target-modules", *targets]
    if "--max-lora-rank" not in explicit:
        command += ["--max-lora-rank", str(max_rank)]
    if "--max-loras" not in explicit:
        command += ["--max-loras", str(len(served) + (RESOLVER_HEADROOM if adapter_root else 0))]
    command += list(vllm_args)
    env = dict(os.environ)
    if cpu:
        env["VLLM_TARGET_DEVICE"] = "cpu"
    if adapter_root:
        root = Path(adapter_root)
        if not root.is_dir():
            raise UserError(f"--adapter-root {root} is not a directory")
        env |= {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "PSOFT_DEPLOY_ADAPTER_ROOT": str(root.absolute()),
            "PSOFT_DEPLOY_BASE": str(checkpoint.path),
            "PSOFT_DEPLOY_CACHE": str(Path(cache_dir).absolute()),
            "PSOFT_DEPLOY_MAX_LORA_RANK": _max_rank_arg(vllm_args) or str(max_rank),
        }
        if env.get("VLLM_PLUGINS") is not None and "psoft_deploy" not in env["VLLM_PLUGINS"].split(","):
            env["VLLM_PLUGINS"] = ",".join(filter(None, [env["VLLM_PLUGINS"], "psoft_deploy"]))
    return ServePlan(command=command, env=env, served=served, base_name=base)


def run_server(plan: ServePlan, host: str, port: int) -> int:
    """Start vLLM, wait for /health, print the endpoint; on Ctrl-C or SIGTERM stop vLLM's whole
    process group (SIGTERM, then SIGKILL after 30 s) and return 0."""
    process = subprocess.Popen(plan.command, env=plan.env, start_new_session=True)
    stop_requested: list[float] = []

    def request_stop(signum, frame):
        if not stop_requested:
            stop_requested.append(time.monotonic())
            _signal_group(process, signal.SIGTERM)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    health = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}/health"
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    announced = False
    try:
        while process.poll() is None:
            if stop_requested:
                if time.monotonic() - stop_requested[0] > 30:
                    _signal_group(process, signal.SIGKILL)
            elif not announced:
                announced = _healthy(health)
                if announced:
                    names = ", ".join(plan.served)
                    click.echo(f"psoft-deploy: serving on http://{host}:{port}/v1 — models: {names}", err=True)
                elif time.monotonic() > deadline:
                    raise UserError(f"vLLM did not become healthy within {HEALTH_TIMEOUT_S} s")
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    if stop_requested:
        return 0
    if not announced:
        raise UserError(f"vLLM exited with status {process.returncode} before it was ready (see its log above)")
    return process.returncode


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _lora_modules(served: dict[str, Path]) -> list[str]:
    """The module names the served LoRA adapters adapt."""
    modules = []
    for lora_dir in served.values():
        with open_safetensors(lora_dir / ADAPTER_WEIGHTS) as handle:
            modules += [key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
                        for key in handle.keys() if key.endswith(".lora_A.weight")]
    return modules


def _zero_target(checkpoint: BaseCheckpoint, served: dict[str, Path]) -> str:
    """A module the all-zero base adapter can sit on: one the served adapters target, else a q_proj."""
    modules = _lora_modules(served)
    if modules:
        return modules[0]
    for key in checkpoint.files:
        if key.endswith(("q_proj.weight", "query.weight")):
            return key.removesuffix(".weight")
    raise UserError("found no linear layer for the base adapter; pass at least one --adapter")


def _max_rank_arg(vllm_args: tuple[str, ...]) -> str | None:
    for index, arg in enumerate(vllm_args):
        if arg == "--max-lora-rank" and index + 1 < len(vllm_args):
            return vllm_args[index + 1]
        if arg.startswith("--max-lora-rank="):
            return arg.split("=", 1)[1]
    return None

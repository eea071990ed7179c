"""`psoft-deploy serve`'s plan: the vLLM command line and environment that serve PSOFT adapters.

Each adapter is prepared in the form it is served in (`AdapterForms`: r×r cores over the base's
shared basis, else its exact LoRA through `LoraCache`), and vLLM's server is laid out with
``--enable-lora --lora-modules ...``; with an adapter root, the resolver plugin serves adapters
dropped there later.

vLLM CPU defect handled here: a request without an adapter that shares a batch with adapter
requests gets the adapter in the last LoRA slot (upstream PR 48421). On CPU the base model is
therefore served as an all-zero rank-1 LoRA under the base's name, so every request carries an
adapter and none takes that path; the engine's own name for the bare base is kept internal.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from psoft_deploy.converters.lora_format import vllm_max_lora_rank
from psoft_deploy.core.architectures import architecture
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.formats import PsoftAdapter, adapter_format, read_adapter
from psoft_deploy.core.options import DEFAULTS, ReadOptions
from psoft_deploy.core.outputs import check_writable
from psoft_deploy.core.progress import stage, warning
from psoft_deploy.serve.cache import LoraCache
from psoft_deploy.serve.forms import AdapterForms, Servable
from psoft_deploy.serve.names import check_served_names
from psoft_deploy.serve.preflight import (
    CPU_MAX_NUM_SEQS,
    check_base,
    check_tokenizer,
    cpu_memory_args,
    stored_dtype,
    vllm_flag,
)
from psoft_deploy.serve.shared import SharedBasis

INTERNAL_BASE_NAME = "psoft-deploy-internal-bare-base"
RESOLVER_HEADROOM = 4  # extra LoRA slots for adapters resolved from the adapter root
SHARED_CPU_HEADROOM = 16384  # adapters resolved later kept in vLLM's CPU cache when cores are served (k² each)
SHUTDOWN_TIMEOUT_S = 10  # vLLM's --shutdown-timeout: in-flight requests' drain and its engine's teardown


@dataclass
class ServePlan:
    """The vLLM command line and environment that serve the given adapters."""

    command: list[str]
    env: dict[str, str]
    served: dict[str, Path] = field(default_factory=dict)  # client-visible name -> LoRA directory
    base_name: str = ""
    dtype: str = ""


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
    read_options: ReadOptions = DEFAULTS,
    adapter_form: str = "auto",
    basis_rank: int | None = None,
    basis_modules: tuple[str, ...] = (),
    cpu: bool | None = None,
    free_bytes: int | None = None,
) -> ServePlan:
    """Check the base, convert the adapters (or find them in the cache), choose which are served as
    cores over the base's shared basis (``adapter_form``: auto, shared or lora) and lay out the
    vLLM invocation; on CPU size the KV cache from ``free_bytes`` (default: the memory available now)."""
    check_served_names(base, adapters, adapter_root)
    checkpoint = BaseCheckpoint(base)
    cpu = on_cpu() if cpu is None else cpu
    check_base(checkpoint, cpu)
    vocab_guard = check_tokenizer(checkpoint, vllm_args)
    check_writable(Path(cache_dir) / "new-entry", "adapter cache entry")  # before any SVD or conversion
    cache = LoraCache(cache_dir, checkpoint, read_options)
    basis = _shared_basis(checkpoint, cache_dir, adapters, adapter_root, adapter_form, read_options, basis_rank,
                          basis_modules)
    forms = AdapterForms(cache, basis)
    prepared = {}
    for name, path in adapters.items():
        stage(f"preparing adapter {name} from {path}")
        prepared[name] = forms.prepare(Path(path))
    basis = _say_forms(prepared, basis, adapter_form, adapter_root)
    served = {name: servable.path for name, servable in prepared.items()}
    modules = [module for servable in prepared.values() for module in servable.modules]
    if cpu:
        zero_target = _zero_target(checkpoint, modules)
        served[base] = (basis.zero_adapter(zero_target, cache_dir) if basis and zero_target in basis.modules
                        else cache.zero_adapter(zero_target))
    limits = _lora_limits(prepared, len(served), basis, adapter_root, vllm_args)
    dtype = vllm_flag(vllm_args, "--dtype") or stored_dtype(checkpoint)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(checkpoint.path),
        "--served-model-name", INTERNAL_BASE_NAME if cpu else base,
        "--host", host, "--port", str(port),
        "--enable-lora",
        "--lora-modules", *[f"{name}={path}" for name, path in served.items()],
    ]
    targets = architecture(checkpoint.config).vllm_target_modules(modules)
    if targets and not adapter_root and vllm_flag(vllm_args, "--lora-target-modules") is None:
        command += ["--lora-target-modules", *targets]
    for flag, value in [*limits.items(), ("--dtype", dtype), ("--shutdown-timeout", SHUTDOWN_TIMEOUT_S)]:
        if vllm_flag(vllm_args, flag) is None:
            command += [flag, str(value)]
    cores_only = basis is not None and all(servable.cores for servable in prepared.values())
    if cpu:
        # With a basis, vLLM's LoRA buffers are allocated only once an exact LoRA is loaded (see vllm_shared).
        command += cpu_memory_args(checkpoint, dtype, vllm_args, 0 if cores_only else limits["--max-loras"],
                                   limits["--max-lora-rank"], free_bytes)
    command += [argument for middleware in _middlewares(cpu, vocab_guard) for argument in ("--middleware", middleware)]
    command += list(vllm_args)
    env = _environment(checkpoint, base, basis, cores_only, cpu, vocab_guard, adapter_form, adapter_root, cache_dir,
                       limits["--max-lora-rank"], read_options)
    return ServePlan(command=command, env=env, served=served, base_name=base, dtype=dtype)


def _middlewares(cpu: bool, vocab_guard: int | None) -> list[str]:
    """serve's middlewares, outermost last (`AdapterMetrics`, which counts refusals too)."""
    names = ["HideInternalName"] if cpu else []
    names += ["RefuseUnknownTokens"] if vocab_guard is not None else []
    return [f"psoft_deploy.serve.middleware.{name}" for name in [*names, "AdapterMetrics"]]


def _environment(checkpoint: BaseCheckpoint, base: str, basis: SharedBasis | None, cores_only: bool, cpu: bool,
                 vocab_guard: int | None, adapter_form: str, adapter_root: str | None, cache_dir: Path, max_rank: int,
                 read_options: ReadOptions) -> dict[str, str]:
    """vLLM's environment: what psoft-deploy's plugin and middlewares read in vLLM's processes."""
    env = dict(os.environ)
    if basis:
        env["PSOFT_DEPLOY_SHARED_BASIS"] = str(basis.path.absolute())
        if adapter_form == "shared":
            env["PSOFT_DEPLOY_REQUIRE_CORES"] = "1"
        if not cores_only:
            env["PSOFT_DEPLOY_EXACT_LORA"] = "1"  # vLLM's LoRA path runs from the start (see vllm_shared.install)
    if cpu:
        env |= {"VLLM_TARGET_DEVICE": "cpu", "PSOFT_DEPLOY_INTERNAL_NAME": INTERNAL_BASE_NAME,
                "PSOFT_DEPLOY_BASE_NAME": base}
    if vocab_guard is not None:
        env["PSOFT_DEPLOY_VOCAB_SIZE"] = str(vocab_guard)
    if adapter_root:
        env |= {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "PSOFT_DEPLOY_ADAPTER_ROOT": str(Path(adapter_root).absolute()),
            "PSOFT_DEPLOY_BASE": str(checkpoint.path),
            "PSOFT_DEPLOY_CACHE": str(Path(cache_dir).absolute()),
            "PSOFT_DEPLOY_MAX_LORA_RANK": str(max_rank),
        } | read_options.to_env()
    plugins = env.get("VLLM_PLUGINS")
    if (adapter_root or basis) and plugins is not None and "psoft_deploy" not in plugins.split(","):
        env["VLLM_PLUGINS"] = ",".join(filter(None, [plugins, "psoft_deploy"]))
    return env


def _lora_limits(prepared: dict[str, Servable], served: int, basis: SharedBasis | None, adapter_root: str | None,
                 vllm_args) -> dict[str, int]:
    """vLLM's LoRA limits for ``served`` adapters (the user's own flags win): ``--max-lora-rank``,
    ``--max-loras`` (slots) and, with a basis, ``--max-cpu-loras`` (every adapter kept resident)."""
    # Adapters arriving in the root may be exact LoRA up to rank 64 (with a basis, vLLM allocates
    # its LoRA buffers only once one arrives); cores up to the basis's rank.
    ranks = [servable.rank for servable in prepared.values()]
    max_rank = vllm_max_lora_rank(max([*ranks, basis.rank if basis else 1, 64 if adapter_root else 1]))
    slots = served + (RESOLVER_HEADROOM if adapter_root else 0)
    if basis:  # cores cost k² per slot: as many slots as sequences in a batch, never more
        sequences = int(vllm_flag(vllm_args, "--max-num-seqs") or CPU_MAX_NUM_SEQS)
        slots = sequences if adapter_root else min(slots, sequences)
    limits = {"--max-lora-rank": int(vllm_flag(vllm_args, "--max-lora-rank") or max_rank),
              "--max-loras": int(vllm_flag(vllm_args, "--max-loras") or slots)}
    if basis:  # cores cost k² per module: keep every adapter resident rather than reload it from disk
        limits["--max-cpu-loras"] = max(limits["--max-loras"], served + (SHARED_CPU_HEADROOM if adapter_root else 0))
    return limits


def _shared_basis(checkpoint: BaseCheckpoint, cache_dir: Path, adapters: dict[str, str], adapter_root: str | None,
                  adapter_form: str, options: ReadOptions, rank: int | None,
                  modules: tuple[str, ...]) -> SharedBasis | None:
    """The base's shared basis, for the modules and rank of the PSOFT adapters named and in the
    adapter root (``rank``, ``modules``: the user's choice instead); None where no basis is used, with
    one line saying why where one was wanted."""
    if adapter_form == "lora":
        return None
    psoft = [read_adapter(path, options) for path in map(Path, adapters.values()) if adapter_format(path) != "lora"]
    for adapter in psoft:  # refused before any SVD runs
        vllm_max_lora_rank(adapter.rank, f"adapter {adapter.path}")
    psoft += _root_adapters(adapter_root, options)
    chosen = sorted({key.removesuffix(".weight") for key in checkpoint.files if key.endswith(
        tuple(f".{leaf}.weight" for leaf in modules)) and len(checkpoint.shape(key)) == 2}) if modules else None
    if modules and not chosen:
        raise UserError(f"--basis-modules {','.join(modules)} names no linear layer of {checkpoint.name}")
    modules = chosen or sorted({module for adapter in psoft for module in adapter.modules})
    rank = rank or max((adapter.rank for adapter in psoft), default=None)
    if not modules or not rank:
        if adapter_root and adapter_form != "lora":
            warning("no PSOFT adapter in the adapter root yet: adapters arriving there are served as exact LoRA; "
                    "pass --basis-rank K --basis-modules q_proj,v_proj,... to hold them as cores")
        return None
    why_not = _why_no_cores()
    if why_not:
        if adapter_form == "shared":
            raise UserError(f"--adapter-form shared: {why_not}; use --adapter-form auto or lora")
        warning(f"every adapter is served as exact LoRA: {why_not}")
        return None
    return SharedBasis.build(cache_dir, checkpoint, modules, rank, options)


def _root_adapters(adapter_root: str | None, options: ReadOptions) -> list[PsoftAdapter]:
    """The PSOFT adapters in the adapter root now (those that cannot be read are left to the resolver)."""
    if not adapter_root or not Path(adapter_root).is_dir():
        return []
    found = []
    for child in sorted(Path(adapter_root).iterdir()):
        try:
            if adapter_format(child) != "lora":
                adapter = read_adapter(child, options)
                vllm_max_lora_rank(adapter.rank, f"adapter {child}")
                found.append(adapter)
        except UserError:
            continue
    return found


def _say_forms(prepared: dict[str, Servable], basis: SharedBasis | None, adapter_form: str,
               adapter_root: str | None) -> SharedBasis | None:
    """Say in one line which adapters are cores and which exact LoRA (refused with ``shared``); the
    basis vLLM holds (None: no adapter is cores and none can arrive)."""
    if basis is None:
        return None
    shared = [name for name, servable in prepared.items() if servable.cores]
    outside = {name: servable.why for name, servable in prepared.items() if not servable.cores}
    if outside and adapter_form == "shared":
        name, why = next(iter(outside.items()))
        raise UserError(f"--adapter-form shared: adapter {name} is not in the base's shared basis ({why}); "
                        "use --adapter-form auto to serve it as exact LoRA")
    apart = [f"{name} ({why})" for name, why in outside.items()]
    if not shared and not adapter_root:
        warning(f"no adapter lies in the base's shared basis; exact LoRA: {', '.join(apart)}")
        return None
    stage(f"shared basis (rank ≤ {basis.rank}, {len(basis.modules)} modules), "
          f"as cores: {', '.join(shared) or 'none yet'}"
          + (f"; exact LoRA: {', '.join(apart)}" if apart else ""))
    return basis


def _why_no_cores() -> str | None:
    """Why this vLLM cannot hold cores (None: it can). Which layers hold them (tensor parallelism,
    sharded LoRA layers, fused modules) is decided in vLLM's workers, from the layers they build."""
    quiet = logging.getLogger("vllm")  # its import notices (Triton on CPU) are not the user's business
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from psoft_deploy.serve import vllm_shared
    except ImportError as error:
        return f"vLLM's LoRA internals are not where psoft-deploy expects them ({error})"
    finally:
        quiet.setLevel(level)
    return vllm_shared.missing_internals()


def _zero_target(checkpoint: BaseCheckpoint, modules: list[str]) -> str:
    """A module the all-zero base adapter can sit on: one the adapters target, else a layer vLLM
    adapts in this architecture (a q_proj where the registry names none)."""
    if modules:
        return modules[0]
    leaves = tuple(f".{leaf}.weight" for leaf in architecture(checkpoint.config).vllm_layers or ("q_proj",))
    for key in checkpoint.files:
        if key.endswith(leaves):
            return key.removesuffix(".weight")
    raise UserError("found no linear layer for the base adapter; pass at least one --adapter")

"""`psoft-deploy serve`: PSOFT adapters on one vLLM OpenAI-compatible server.

Each adapter is converted to its exact LoRA form (through `LoraCache`), and vLLM's server
is started with ``--enable-lora --lora-modules ...``; with an adapter root, the resolver
plugin serves adapters dropped there later.

vLLM CPU defect handled here: a request without an adapter that shares a batch with adapter
requests gets the adapter in the last LoRA slot (upstream PR 48421). On CPU the base model is
therefore served as an all-zero rank-1 LoRA under the base's name, so every request carries an
adapter and none takes that path; the engine's own name for the bare base is kept internal.

Stopping: vLLM's API server gets one SIGTERM and stops its engine itself, with
``--shutdown-timeout`` seconds for the engine and its workers to finish and free their shared
memory (vLLM's default, 0, force-kills them and leaves their ``/dev/shm`` segments behind). What a
killed engine still leaves there (segments seen mapped by vLLM's processes) is removed after it exits.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from psoft_deploy.base import BaseCheckpoint
from psoft_deploy.converters.lora_format import vllm_lora_target_modules, vllm_max_lora_rank
from psoft_deploy.errors import UserError
from psoft_deploy.formats import PsoftAdapter, adapter_format, read_adapter
from psoft_deploy.options import DEFAULTS, ReadOptions
from psoft_deploy.outputs import check_writable
from psoft_deploy.progress import stage, warning
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
HEALTH_TIMEOUT_S = 900  # for vLLM to start
HEALTH_INTERVAL_S = 5  # between health checks while serving
HEALTH_GRACE_S = 60  # without an answer to /health before serve gives up on vLLM
SHUTDOWN_TIMEOUT_S = 10  # vLLM's --shutdown-timeout: in-flight requests' drain and its engine's teardown
STOP_TIMEOUT_S = 30  # after the stop request, vLLM's processes are killed
SHM_DIR = Path("/dev/shm")
SHM_PREFIXES = ("psm_", "sem.mp-")  # Python's shared memory and semaphores, as vLLM's processes create them
# An exception line, after vLLM's "(EngineCore pid=N) ERROR 11-23 15:51:54 [core.py:1512] " prefix.
ERROR_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:[A-Z]+ \S+ \S+ \[[^\]]+\] )?(?:[A-Za-z_]\w*\.)*(\w+(?:Error|Exception): .+)$")
NOTICE_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:DEBUG|INFO|WARNING)\b")
# What psoft-deploy's plugin warns of in vLLM's processes (a module served as exact LoRA), said by serve too.
PLUGIN_WARNING = re.compile(r"^(?:\(\w+ pid=\d+\) )?psoft-deploy: warning: (.+)$")
# vLLM's follow-ups once its engine died; the cause, where there is one, was logged before them.
GENERIC_ERRORS = ("EngineDeadError", "EngineGenerateError")


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
    ranks = [servable.rank for servable in prepared.values()]
    modules = [module for servable in prepared.values() for module in servable.modules]
    if cpu:
        zero_target = _zero_target(checkpoint, modules)
        served[base] = (basis.zero_adapter(zero_target, cache_dir) if basis and zero_target in basis.modules
                        else cache.zero_adapter(zero_target))
    # Adapters arriving in the root may be exact LoRA up to rank 64 (with a basis, vLLM allocates
    # its LoRA buffers only once one arrives); cores up to the basis's rank.
    max_rank = vllm_max_lora_rank(max([*ranks, basis.rank if basis else 1, 64 if adapter_root else 1]))
    max_rank = int(vllm_flag(vllm_args, "--max-lora-rank") or max_rank)
    slots = len(served) + (RESOLVER_HEADROOM if adapter_root else 0)
    if basis:  # cores cost k² per slot: as many slots as sequences in a batch, never more
        sequences = int(vllm_flag(vllm_args, "--max-num-seqs") or CPU_MAX_NUM_SEQS)
        slots = sequences if adapter_root else min(slots, sequences)
    max_loras = int(vllm_flag(vllm_args, "--max-loras") or slots)
    dtype = vllm_flag(vllm_args, "--dtype") or stored_dtype(checkpoint)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(checkpoint.path),
        "--served-model-name", INTERNAL_BASE_NAME if cpu else base,
        "--host", host, "--port", str(port),
        "--enable-lora",
        "--lora-modules", *[f"{name}={path}" for name, path in served.items()],
    ]
    targets = vllm_lora_target_modules(modules)
    if targets and not adapter_root and vllm_flag(vllm_args, "--lora-target-modules") is None:
        command += ["--lora-target-modules", *targets]
    chosen = [("--max-lora-rank", max_rank), ("--max-loras", max_loras), ("--dtype", dtype),
              ("--shutdown-timeout", SHUTDOWN_TIMEOUT_S)]
    if basis:  # cores cost k² per module: keep every adapter resident rather than reload it from disk
        chosen.append(("--max-cpu-loras", max(max_loras, len(served) + (SHARED_CPU_HEADROOM if adapter_root else 0))))
    for flag, value in chosen:
        if vllm_flag(vllm_args, flag) is None:
            command += [flag, str(value)]
    env = dict(os.environ)
    if basis:
        env["PSOFT_DEPLOY_SHARED_BASIS"] = str(basis.path.absolute())
        if adapter_form == "shared":
            env["PSOFT_DEPLOY_REQUIRE_CORES"] = "1"
        if not all(servable.cores for servable in prepared.values()):
            env["PSOFT_DEPLOY_EXACT_LORA"] = "1"  # vLLM's LoRA path runs from the start (see vllm_shared.install)
    if cpu:
        # With a basis, vLLM's LoRA buffers are allocated only once an exact LoRA is loaded (see vllm_shared).
        cores_only = basis is not None and all(servable.cores for servable in prepared.values())
        command += cpu_memory_args(checkpoint, dtype, vllm_args, 0 if cores_only else max_loras, max_rank, free_bytes)
        command += ["--middleware", "psoft_deploy.serve.middleware.HideInternalName"]
        env |= {
            "VLLM_TARGET_DEVICE": "cpu",
            "PSOFT_DEPLOY_INTERNAL_NAME": INTERNAL_BASE_NAME,
            "PSOFT_DEPLOY_BASE_NAME": base,
        }
    if vocab_guard is not None:
        command += ["--middleware", "psoft_deploy.serve.middleware.RefuseUnknownTokens"]
        env["PSOFT_DEPLOY_VOCAB_SIZE"] = str(vocab_guard)
    command += ["--middleware", "psoft_deploy.serve.middleware.AdapterMetrics"]  # last: outermost, counts refusals
    command += list(vllm_args)
    if adapter_root:
        env |= {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "PSOFT_DEPLOY_ADAPTER_ROOT": str(Path(adapter_root).absolute()),
            "PSOFT_DEPLOY_BASE": str(checkpoint.path),
            "PSOFT_DEPLOY_CACHE": str(Path(cache_dir).absolute()),
            "PSOFT_DEPLOY_MAX_LORA_RANK": str(max_rank),
        } | read_options.to_env()
    if (adapter_root or basis) and env.get("VLLM_PLUGINS") is not None and "psoft_deploy" not in env["VLLM_PLUGINS"].split(","):
        env["VLLM_PLUGINS"] = ",".join(filter(None, [env["VLLM_PLUGINS"], "psoft_deploy"]))
    return ServePlan(command=command, env=env, served=served, base_name=base, dtype=dtype)


def default_log_file(cache_dir: Path, port: int) -> Path:
    """Where vLLM's log goes by default: ``vllm-PORT.log`` beside the cache directory."""
    return Path(cache_dir).absolute().parent / f"vllm-{port}.log"


def run_server(plan: ServePlan, host: str, port: int, log: Path, verbose: bool = False) -> int:
    """Start vLLM with its output in ``log`` (also copied to stderr with ``verbose``), wait for
    /health and print the endpoint. On Ctrl-C or SIGTERM while serving, let vLLM stop itself (a
    second one, or `STOP_TIMEOUT_S`, kills it) and return 0; during start-up, kill it and raise a
    `UserError` saying so. If vLLM exits, never answers /health or stops answering it, stop it and
    raise a `UserError` naming the cause (the last error in its log). Either way, remove the shared
    memory its processes left in /dev/shm."""
    log = Path(log).absolute()
    check_writable(log, "vLLM log")
    log.parent.mkdir(parents=True, exist_ok=True)
    shm_before = _shm_files()
    with open(log, "wb") as output:
        process = subprocess.Popen(plan.command, env=plan.env, start_new_session=True, stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT)
    stop_requested: list[float] = []
    announced = False

    def request_stop(signum, frame):
        stop_requested.append(time.monotonic())
        if len(stop_requested) > 1:
            _signal_group(process, signal.SIGKILL)
        elif announced:
            _signal(process.pid, signal.SIGTERM)  # the API server stops its engine and workers itself

    handlers = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    done = threading.Event()
    follower = threading.Thread(target=_follow, args=(log, done), daemon=True) if verbose else None
    if follower:
        follower.start()
    health = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}/health"
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    unhealthy = False
    last_healthy = last_check = time.monotonic()
    shm_used: set[Path] = set()
    relayed = 0
    try:
        while process.poll() is None:
            now = time.monotonic()
            if not verbose:
                relayed = _relay_plugin_warnings(log, relayed)
            if stop_requested:
                if not announced:  # nothing in flight: vLLM's processes are stopped at once
                    raise UserError("stopped during start-up, before vLLM answered")
                if now - stop_requested[0] > STOP_TIMEOUT_S:
                    _signal_group(process, signal.SIGKILL)
            elif not announced:
                announced = _healthy(health)
                if announced:
                    last_healthy = time.monotonic()
                    names = ", ".join(dict.fromkeys([plan.base_name, *plan.served]))
                    stage(f"serving on http://{host}:{port}/v1 ({plan.dtype}) — models: {names}; vLLM log: {log}")
                elif now > deadline:
                    raise UserError(f"vLLM did not answer {health} within {HEALTH_TIMEOUT_S} s and was stopped: "
                                    f"{last_error_line(log)} (log: {log})")
            elif now - last_check > HEALTH_INTERVAL_S:
                last_check = now
                if _healthy(health, timeout=HEALTH_INTERVAL_S):
                    last_healthy = time.monotonic()
                elif time.monotonic() - last_healthy > HEALTH_GRACE_S:
                    unhealthy = True
                    break
            if not stop_requested:
                shm_used |= _shm_mapped(process.pid)
            time.sleep(0.5)
    finally:
        shm_used |= _shm_mapped(process.pid)
        _signal_group(process, signal.SIGKILL)
        process.wait()
        done.set()
        if follower:
            follower.join()
        for path in shm_used - shm_before:
            path.unlink(missing_ok=True)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if stop_requested:
        return 0
    cause = last_error_line(log)
    if unhealthy:
        raise UserError(f"vLLM stopped answering /health for {HEALTH_GRACE_S} s and was stopped: {cause} (log: {log})")
    status = (f"killed by {signal.Signals(-process.returncode).name}" if process.returncode < 0
              else f"exit status {process.returncode}")
    when = "while serving" if announced else "before it was ready"
    raise UserError(f"vLLM stopped {when} ({status}): {cause} (log: {log})")


def last_error_line(log: Path) -> str:
    """The cause vLLM logged last: its last exception line (``RuntimeError: ...``) that is not one
    of its generic engine-died follow-ups, else its last exception line at all, else its last
    other line that names an error (``api_server.py: error: unrecognized arguments: ...``)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    errors = [match.group(1) for line in lines if (match := ERROR_LINE.match(line))]
    specific = [error for error in errors if not error.startswith(GENERIC_ERRORS)]
    others = [line for line in lines if re.search(r"\berror\b", line, re.IGNORECASE) and not NOTICE_LINE.match(line)]
    return (specific or errors or others or ["no error in its log"])[-1]


def _relay_plugin_warnings(log: Path, offset: int) -> int:
    """Say, as serve's own warnings, what psoft-deploy's plugin warned of in ``log`` past ``offset``
    (complete lines only); return the offset read up to."""
    with open(log, "rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
    complete = chunk[:chunk.rfind(b"\n") + 1]
    for line in complete.decode(errors="replace").splitlines():
        if match := PLUGIN_WARNING.search(line):
            warning(match.group(1))
    return offset + len(complete)


def _follow(log: Path, done: threading.Event) -> None:
    """Copy what vLLM writes to ``log`` onto stderr until ``done`` (and the rest after it)."""
    with open(log, "rb") as handle:
        while True:
            chunk = handle.read()
            if chunk:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            elif done.is_set():
                return
            else:
                time.sleep(0.2)


def _healthy(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _shm_files() -> set[Path]:
    """The shared-memory files of the kinds vLLM's processes create, in /dev/shm now."""
    return {path for path in SHM_DIR.glob("*") if path.name.startswith(SHM_PREFIXES)} if SHM_DIR.is_dir() else set()


def _shm_mapped(pid: int) -> set[Path]:
    """Those shared-memory files mapped by process ``pid`` and its descendants (from /proc)."""
    try:
        pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return set()
    mapped = set()
    for each in pids:
        try:
            lines = Path(f"/proc/{each}/maps").read_text().splitlines()
        except OSError:  # gone meanwhile, or no /proc
            continue
        for fields in (line.split(None, 5) for line in lines):
            path = Path(fields[5]) if len(fields) == 6 else None
            if path and path.parent == SHM_DIR and path.name.startswith(SHM_PREFIXES):
                mapped.add(path)
    return mapped


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
    """A module the all-zero base adapter can sit on: one the adapters target, else a q_proj."""
    if modules:
        return modules[0]
    for key in checkpoint.files:
        if key.endswith(("q_proj.weight", "query.weight")):
            return key.removesuffix(".weight")
    raise UserError("found no linear layer for the base adapter; pass at least one --adapter")

"""Running vLLM's server: start it with its log in a file, wait for /health, say where it serves,
watch it, stop it on Ctrl-C or SIGTERM, and say in one line why it stopped (the cause its log
names).

Stopping: vLLM's API server gets one SIGTERM and stops its engine itself, with
``--shutdown-timeout`` seconds for the engine and its workers to finish and free their shared
memory (vLLM's default, 0, force-kills them and leaves their ``/dev/shm`` segments behind). What a
killed engine still leaves there (segments seen mapped by vLLM's processes) is removed after it exits.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from psoft_deploy.core.errors import UserError
from psoft_deploy.core.outputs import check_writable
from psoft_deploy.core.progress import stage, warning
from psoft_deploy.serve.plan import ServePlan
from psoft_deploy.serve.shm import shm_files, shm_mapped

HEALTH_TIMEOUT_S = 900  # for vLLM to start
HEALTH_INTERVAL_S = 5  # between health checks while serving
HEALTH_GRACE_S = 60  # without an answer to /health before serve gives up on vLLM
STOP_TIMEOUT_S = 30  # after the stop request, vLLM's processes are killed
# An exception line, after vLLM's "(EngineCore pid=N) ERROR 11-23 15:51:54 [core.py:1512] " prefix.
ERROR_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:[A-Z]+ \S+ \S+ \[[^\]]+\] )?(?:[A-Za-z_]\w*\.)*(\w+(?:Error|Exception): .+)$")
NOTICE_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:DEBUG|INFO|WARNING)\b")
# What psoft-deploy's plugin says in vLLM's processes (a module served as exact LoRA, cores held at tensor
# parallelism 2), said by serve too.
PLUGIN_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?psoft-deploy: (warning: )?(.+)$")
# vLLM's follow-ups once its engine died; the cause, where there is one, was logged before them.
GENERIC_ERRORS = ("EngineDeadError", "EngineGenerateError")


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
    shm_before = shm_files()
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
                relayed = _relay_plugin_lines(log, relayed)
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
                shm_used |= shm_mapped(process.pid)
            time.sleep(0.5)
    finally:
        shm_used |= shm_mapped(process.pid)
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


def _relay_plugin_lines(log: Path, offset: int) -> int:
    """Say, as serve's own warnings and stage lines, what psoft-deploy's plugin said in ``log`` past
    ``offset`` (complete lines only); return the offset read up to."""
    with open(log, "rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
    complete = chunk[:chunk.rfind(b"\n") + 1]
    for line in complete.decode(errors="replace").splitlines():
        if match := PLUGIN_LINE.search(line):
            (warning if match.group(1) else stage)(match.group(2))
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

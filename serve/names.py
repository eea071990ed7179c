"""What `serve` checks before torch or vLLM is imported: the names it gives adapters and its address."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from psoft_deploy.core.errors import UserError

# One path component: letters, digits, '.', '_', '-'; no leading dot (so no '..').
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_served_names(base: str, adapters: dict[str, str], adapter_root: str | None) -> None:
    """Refuse (`UserError`) an adapter name that is not one safe path component or is the base's,
    and an ``adapter_root`` that is not a directory."""
    for name in adapters:
        if not SAFE_NAME.fullmatch(name) or name == base:
            raise UserError(f"adapter name {name!r} must be letters, digits, '.', '_', '-' and differ from the base")
    if adapter_root and not Path(adapter_root).is_dir():
        raise UserError(f"--adapter-root {adapter_root} is not a directory")


def check_port(host: str, port: int) -> None:
    """Refuse (`UserError`) a ``host:port`` that another process listens on (or that cannot be bound),
    as vLLM would only after loading the model."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closing port is free
            sock.bind(address)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); choose another port with --port") from None


def vllm_flag(vllm_args, name: str) -> str | None:
    """The value the user gave vLLM's option ``name`` (``--name value`` or ``--name=value``), else None."""
    for index, arg in enumerate(vllm_args):
        if arg == name and index + 1 < len(vllm_args):
            return vllm_args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def listen_address(host: str, port: int, vllm_args) -> tuple[str, int]:
    """Where vLLM will listen: serve's ``--host``/``--port``, unless given after ``--`` (vLLM's own flags win)."""
    given = vllm_flag(vllm_args, "--port")
    if given is not None and not given.isdigit():
        raise UserError(f"-- --port {given}: not a port number")
    return vllm_flag(vllm_args, "--host") or host, int(given) if given is not None else port

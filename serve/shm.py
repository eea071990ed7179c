"""The shared memory vLLM's processes leave in ``/dev/shm``: what they mapped is removed once they
have exited (a killed engine cannot free its own)."""

from __future__ import annotations

from pathlib import Path

import psutil

SHM_DIR = Path("/dev/shm")
SHM_PREFIXES = ("psm_", "sem.mp-")  # Python's shared memory and semaphores, as vLLM's processes create them


def shm_files() -> set[Path]:
    """The shared-memory files of the kinds vLLM's processes create, in /dev/shm now."""
    return {path for path in SHM_DIR.glob("*") if path.name.startswith(SHM_PREFIXES)} if SHM_DIR.is_dir() else set()


def shm_mapped(pid: int) -> set[Path]:
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

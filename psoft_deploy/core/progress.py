"""What a long command says while it works, and the third-party output it keeps quiet.

Stage lines (``psoft-deploy: verifying the merged model``) go to the ``psoft_deploy`` logger, which
the console entry point sends to stderr. Loops over layers show a bar on a terminal and, elsewhere
(a log file, CI), one line at every 10 %. Unless ``--verbose``, transformers' warnings and progress
bars, torch.onnx's progress, onnxruntime's warnings and other libraries' Python warnings are off.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys

logger = logging.getLogger("psoft_deploy")
_verbose = False  # set once by the CLI's --verbose


def log_to_stderr() -> None:
    """Send stage and progress lines to stderr as ``psoft-deploy: ...`` (the console entry point)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("psoft-deploy: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def quiet_third_party(verbose: bool) -> None:
    """Unless ``verbose``, turn off transformers' warnings and the hub's, transformers' and datasets'
    progress bars (set before they are imported)."""
    global _verbose
    _verbose = verbose
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def third_party_output():
    """Around a third-party step that prints progress to stdout and logs warnings (torch.onnx,
    onnxruntime): kept out of the tool's own output unless ``--verbose``."""
    if _verbose:
        yield
        return
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def verbose() -> bool:
    """Whether third-party output is on (``--verbose``)."""
    return _verbose


def stage(message: str) -> None:
    """One line saying what the command does now."""
    logger.info(message)


def warning(message: str) -> None:
    """One line about something the user should know before going on (``warning: ...``)."""
    logger.warning("warning: %s", message)


def track(iterable=None, *, desc: str, total: int | None = None, unit: str = "module"):
    """``iterable`` (or ``total`` steps counted by ``update()``) with progress: a tqdm bar on a
    terminal, elsewhere a ``desc: k/n units`` line at every 10 %."""
    total = len(iterable) if total is None else total
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)
    return LogProgress(iterable, desc, total, unit)


class LogProgress:
    """The non-terminal form of `track`: a log line whenever another 10 % is done."""

    def __init__(self, iterable, desc: str, total: int, unit: str):
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.done, self.every = 0, max(1, math.ceil(total / 10))
        self.next_line = self.every

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.done >= min(self.next_line, self.total):
            logger.info("%s: %d/%d %ss", self.desc, self.done, self.total, self.unit)
            self.next_line = self.done + self.every

    def close(self) -> None:
        pass

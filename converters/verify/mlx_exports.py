"""mlx-lm adapters (``export-lora --target mlx``), run by mlx-lm itself where mlx and mlx-lm are
installed (``pip install -e '.[mlx]'``): ``mlx_lm.load(BASE, adapter_path=DIR)`` and the base alone,
judged against the float64 truth as llama.cpp's GGUF are (`runtimes.judge_in_runtime`: the base run
by mlx is the noise of mlx's own arithmetic, the bare base the control, greedy continuations the
behaviour), once the base run by mlx-lm is checked against transformers' (`verify_base_in_mlx`). The
files are checked too (`candidates.verify_mlx_files`: whether they hold the exact
factors). Where mlx is not installed, or with ``--verify-mode layerwise``, the files alone are
judged, and the report says so."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import AdapterFactors
from psoft_deploy.core.generate import eos_token_ids
from psoft_deploy.core.model import load_base_model

from .candidates import candidate_dtype, resolve_mode, verify_mlx_files
from .inputs import prompt_sequences, verification_inputs
from .reference import outputs_freed
from .report import Report
from .rule import STATISTICS, compare_logits, dtype_name, judge
from .runtimes import judge_in_runtime

NOT_INSTALLED = ("mlx is not installed here: the MLX adapter's files were judged, it was not run "
                 "(pip install -e '.[mlx]')")


def mlx_lm_version() -> str | None:
    """mlx-lm's version where mlx and mlx-lm import here, else None."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm
    except ImportError:
        return None
    return mlx_lm.__version__


class MlxLm:
    """The base and the base with an mlx-lm adapter, each loaded by ``mlx_lm.load``, by name (``base``,
    ``candidate``); every run is one forward over the whole sequence from position 0 (no cache),
    greedy until ``stop``."""

    def __init__(self, base_dir: Path, adapter_dir: Path, stop: set[int]):
        from mlx_lm import load

        self.stop = stop
        try:
            self.models = {"base": load(str(base_dir))[0],
                           "candidate": load(str(base_dir), adapter_path=str(adapter_dir))[0]}
        except ValueError as error:  # a model type mlx-lm does not implement, or weights it does not expect
            raise UserError(f"mlx-lm cannot load {base_dir} with {adapter_dir}: {error}") from None

    def logits(self, tokens: list[int], name: str) -> np.ndarray:
        import mlx.core as mx

        return np.array(self.models[name](mx.array([tokens]))[0].astype(mx.float32), dtype=np.float64)

    def greedy(self, tokens: list[int], name: str, count: int) -> list[int]:
        new = []
        while True:
            new.append(int(np.argmax(self.logits(tokens + new, name)[-1])))
            if new[-1] in self.stop or len(new) == count:
                return new


def verify_mlx_adapter(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path, prompts=None, *,
                       mode: str = "auto") -> Report:
    """The files (`verify_mlx_files`), and where mlx-lm is installed and ``mode`` resolves to full, the
    adapter run by mlx-lm on the base against the float64 truth (`judge_in_runtime`, as a GGUF: in the
    base's stored dtype, the base run by mlx the noise; greedy continuations judged too below float32,
    as the other exports' lossy precisions are: in float32 the logits bounds decide)."""
    files = verify_mlx_files(base, factors, candidate_dir)
    version = mlx_lm_version()
    if version is None or resolve_mode(mode, base) == "layerwise":
        reason = "--verify-mode layerwise" if version is not None else NOT_INSTALLED
        if version is None:
            warnings.warn(NOT_INSTALLED, stacklevel=2)
        return Report(files.mode, files.dtype, f"{files.tolerance}; not run in mlx-lm ({reason})", files.failed_checks,
                      {**files.numbers, "runtime": f"not run: {reason}"})
    float_type = candidate_dtype(base, factors)  # mlx-lm computes in the dtype the base's weights are stored in
    adapter_type = getattr(torch, files.dtype)
    inputs, prompt_source = verification_inputs([base.path], prompts, base.config)
    stop = eos_token_ids(base.path)

    sequences, base_logits = prompt_sequences(inputs), []

    @contextmanager
    def runtime():
        loaded = MlxLm(base.path, candidate_dir, stop)
        base_logits.append(torch.cat([torch.from_numpy(loaded.logits(tokens, "base")) for tokens in sequences]))
        yield loaded

    precision = dtype_name(float_type)
    report = judge_in_runtime(
        base, factors, sequences, prompt_source, precision, runtime,
        names={"candidate": "candidate", "base": "base"}, base_run=f"the base in {precision}, in mlx-lm", stop=stop,
        float_type=float_type, lossy=float_type != torch.float32, judged_logits=True, stored_lora={
            name: tuple(factor.to(adapter_type) for factor in module.lora()) for name, module in factors.modules.items()
        } if torch.finfo(adapter_type).eps > torch.finfo(float_type).eps else None)
    base_check = verify_base_in_mlx(base, base_logits[0], sequences, float_type, prompt_source)
    failed = (report.failed_checks + [f"the base in mlx-lm vs transformers: {check}" for check in base_check.failed_checks]
              + [f"the adapter's files: {check}" for check in files.failed_checks])
    return Report(report.mode, report.dtype, f"mlx-lm adapter on the base, run by mlx-lm: {report.tolerance}; "
                  f"{base_check.tolerance}; the adapter's files: {files.tolerance}", failed,
                  {**report.numbers, "runtime": f"mlx-lm {version}", "base_in_mlx": base_check.to_dict(),
                   "files": files.to_dict()})


def verify_base_in_mlx(base: BaseCheckpoint, logits: torch.Tensor, sequences: list[list[int]], float_type: torch.dtype,
                       prompt_source: str) -> Report:
    """The base as mlx-lm runs it (``logits``, each sequence from position 0) `judge`d against transformers'
    base in float64, the noise being transformers' base in ``float_type``: the base whose run in mlx-lm is the
    candidate's noise must compute the base, or a runtime that computes another model (mlx-lm 0.32 reads
    ``rope_theta``, not transformers 5's ``rope_parameters``) would widen its own bounds."""

    def forward(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(input_ids=torch.tensor([tokens])).logits[0].double() for tokens in sequences])

    truth = outputs_freed(lambda: load_base_model(base.path, torch.float64), forward)
    precision = compare_logits(truth, outputs_freed(lambda: load_base_model(base.path, float_type), forward))
    report = judge({"truth": truth, "precision": precision, "rounding": None, "bare_base": None},
                   compare_logits(truth, logits), float_type, prompt_source)
    tolerance = (f"the base run by mlx-lm deviates from transformers' base in float64 by at most the bounds above, "
                 f"the noise being transformers' base in {dtype_name(float_type)}")
    kept = ("positions", *STATISTICS, "top1_agreement", "bounds", "decisive_top1_agreement")
    return Report("full", dtype_name(float_type), tolerance, report.failed_checks,
                  {key: report.numbers[key] for key in kept})

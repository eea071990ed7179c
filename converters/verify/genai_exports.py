"""onnxruntime-genai exports, verified by running their graph: with the adapter (its LoRA inputs,
or an ``.onnx_adapter`` file) against the float64 reference, with every LoRA input at rank 0
against the base; or, layer by layer, each module's LoRA factors against the exact ΔW."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from psoft_deploy.converters import genai, genai_runtime
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import AdapterFactors
from psoft_deploy.core.generate import read_adapter_file
from psoft_deploy.core.model import load_base_model, reference_model, reference_model_stored

from .candidates import FULL_MODE_MAX_PARAMETERS, parameter_count, resolve_mode
from .inputs import prompt_sequences, verification_inputs
from .reference import outputs_freed
from .report import Report
from .rule import (
    LOSSY_PRECISIONS,
    STATISTICS,
    bound_factors,
    compare_logits,
    dtype_name,
    judge,
    lora_factor_errors,
)
from .runtimes import judge_in_runtime
from .tolerances import DECISIVE_MARGIN, MAX_LOGIT_NOISE, ROUNDING_NOISE


def verify_genai(base: BaseCheckpoint, factors: AdapterFactors, export_dir: Path, prompts=None, *,
                 adapter_file: Path | None = None, mode: str = "auto") -> Report:
    """Verify an onnxruntime-genai export with its own adapter, or with ``adapter_file`` active.

    ``full``: as `verify_full`, except that the noise is what the export's precision does to the
    base: the same graph with every LoRA input at rank 0, against the base in float64 (for int4,
    the quantized base). ``layerwise`` (auto above `FULL_MODE_MAX_PARAMETERS`, or where the
    export's execution provider is missing): each module's LoRA factors in the export against the
    exact ΔW, and the graph at rank 0 against the base and with the adapter against the reference
    (`verify_graph`); a graph that cannot run here fails as inconclusive."""
    record = genai_runtime.export_record(export_dir)
    precision = record.get("precision", "onnxruntime-genai")
    arrays = read_adapter_file(adapter_file) if adapter_file else genai_runtime.graph_lora_arrays(export_dir)
    provider = record.get("execution_provider", "cpu")
    runs_here = genai_runtime.provider_available(provider)
    if mode == "full" and not runs_here:
        raise UserError(f"{export_dir} is built for {provider}, which onnxruntime-genai cannot use on this machine; "
                        f"verify it on a machine with {provider}")
    if not runs_here or resolve_mode(mode, base) == "layerwise":
        graphs = verify_graph(base, export_dir, arrays, precision, prompts, factors, adapter_file) if runs_here else (
            f"inconclusive: the graph was not run ({provider} is not available here), and its LoRA factors alone do "
            f"not show that it computes the model; verify it on a machine with {provider}, or export with "
            "--no-verify to write it unverified")
        return verify_lora_arrays(factors, arrays, precision, graphs)
    inputs, prompt_source = verification_inputs([export_dir, base.path], prompts, base.config)

    @contextmanager
    def runtime():
        with tempfile.TemporaryDirectory() as scratch:
            files = {"base": Path(scratch) / "rank0.onnx_adapter"}
            genai_runtime.write_adapter_file({name: genai_runtime.rank_zero(name, array)
                                              for name, array in arrays.items()}, files["base"])
            if adapter_file:
                files["candidate"] = adapter_file
            yield genai_runtime.GenaiModel(export_dir, files)

    report = judge_in_runtime(
        base, factors, prompt_sequences(inputs), prompt_source, precision, runtime,
        names={"candidate": "candidate" if adapter_file else None, "base": "base"},
        base_run=f"this graph with every LoRA input at rank 0 (the base at {precision})",
        stop=genai_runtime.eos_token_ids(export_dir), float_type=getattr(torch, genai_runtime.logits_type(
            export_dir).name), lossy=precision in LOSSY_PRECISIONS)
    graph_check = verify_base_graph(base, export_dir, arrays, precision, prompts)
    failed = report.failed_checks + [f"the graph at rank 0 vs the base: {check}" for check in graph_check.failed_checks]
    return Report(report.mode, report.dtype, report.tolerance, failed,
                  {**report.numbers, "graph_at_rank_zero": graph_check.to_dict()})


def verify_base_graph(base: BaseCheckpoint, export_dir: Path, arrays: dict, precision: str, prompts) -> Report:
    """The export's graph with every LoRA input at rank 0 against the base (`verify_graph`)."""
    return verify_graph(base, export_dir, arrays, precision, prompts)[0]


def verify_graph(base: BaseCheckpoint, export_dir: Path, arrays: dict, precision: str, prompts,
                 factors: AdapterFactors | None = None,
                 adapter_file: Path | None = None) -> tuple[Report, Report | None]:
    """Run the export's graph on the verification prompts and `judge` it against torch references in
    float64 (float32 above `FULL_MODE_MAX_PARAMETERS`).

    With every LoRA input at rank 0 (the base as the export computes it), against the base, the noise
    being that of the base simulated in torch at the export's precision, measured in this run:
    float32 (bfloat16 against a float32 reference: looser), float16, or float32 with the weights
    rounded as the builder's int4 stores them. The simulation does not come from the graph, so a
    graph that computes something else than the base (a head wired onto a layer: off by the logits'
    own scale, top-1 mostly wrong) fails at every precision, while a correct one measures at most
    2.5× that noise (max, mean and KL) on the tests' models.

    With ``factors``, also the graph with its adapter (its LoRA inputs' defaults, or ``adapter_file``)
    against the reference with the adapter: the noise is the graph at rank 0 minus the base reference,
    carried onto the adapted reference, plus the adapted reference simulated at the export's
    precision; the graph at rank 0 is the control (it must fail). A LoRA factor wired to another
    module than its own fails here, where the factors alone and the graph at rank 0 pass.

    Each torch model's outputs are computed, and the model freed, before the next model or the graph
    loads: one model in memory at a time; the references keep the checkpoint's weights as stored
    (`reference_model_stored`: a bfloat16 base computed in float32 holds half the memory); a float
    graph runs on its memory-mapped weights (`GraphSession`), the same graph og runs. At int4
    KL is not judged: the simulation rounds to nearest, the export k-quantizes; the sizes of their
    errors compare, not their shapes (KL weighs the few largest logits; seen 1.5× on a tiny Qwen2)."""
    inputs, prompt_source = verification_inputs([export_dir, base.path], prompts, base.config)
    sequences = prompt_sequences(inputs)

    def forward(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(input_ids=torch.tensor([tokens])).logits[0].double() for tokens in sequences])

    big = parameter_count(base) > FULL_MODE_MAX_PARAMETERS
    reference = torch.float32 if big else torch.float64
    simulated = {"fp16": torch.float16, "fp32": torch.bfloat16 if big else torch.float32}.get(precision, torch.float32)
    truth = outputs_freed(lambda: reference_model_stored(base.path, None, reference), forward)
    noise = compare_logits(truth, outputs_freed(
        lambda: genai.round_like_builder(load_base_model(base.path, simulated), precision), forward))
    if factors is not None:
        adapted = outputs_freed(lambda: reference_model_stored(base.path, factors, reference), forward)
        adapted_noise = compare_logits(adapted, outputs_freed(
            lambda: genai.round_like_builder(reference_model(base.path, factors, simulated), precision), forward))
    rank0 = {name: genai_runtime.rank_zero(name, array) for name, array in arrays.items()}
    graph = genai_runtime.GraphSession(export_dir, mapped_weights=precision != "int4")
    actual = _sequence_logits(graph, sequences, rank0)
    with_adapter = (_sequence_logits(graph, sequences, arrays if adapter_file else None) if factors is not None
                    else None)
    del graph
    simulation = dtype_name(simulated) + (" with int4-rounded weights and int8-rounded inputs" if precision == "int4"
                                          else "")
    bounds = bound_factors(truth.numel())
    rule = (f"by max |Δ| ≤ {MAX_LOGIT_NOISE:g}×, mean |Δ| ≤ {bounds['mean_abs_logits']:g}× and (but at int4) "
            f"KL ≤ {bounds['kl_divergence']:g}×")
    base_report = _graph_report(
        judge({"truth": truth, "precision": noise, "rounding": None, "bare_base": None},
              compare_logits(truth, actual), precision, prompt_source), precision, reference, simulation,
        f"this graph with every LoRA input at rank 0, run on {prompt_source}, deviates from the base in "
        f"{dtype_name(reference)} {rule} what the base in {simulation} does (measured in this run), with the same "
        f"top-1 where the margin exceeds {DECISIVE_MARGIN:g}× that")
    if factors is None:
        return base_report, None
    adapter_report = _graph_report(
        judge({"truth": adapted, "precision": compare_logits(adapted, adapted + (actual - truth)),
               "rounding": adapted_noise, "bare_base": compare_logits(adapted, actual)},
              compare_logits(adapted, with_adapter), precision, prompt_source), precision, reference, simulation,
        f"this graph with its adapter, run on {prompt_source}, deviates from the reference with the adapter in "
        f"{dtype_name(reference)} {rule} the noise (this graph at rank 0 minus the base, carried onto that "
        f"reference, plus the reference in {simulation}; measured in this run), with the same top-1 where the "
        f"margin exceeds {DECISIVE_MARGIN:g}× that; the graph at rank 0 must fail these bounds")
    return base_report, adapter_report


def _sequence_logits(graph: genai_runtime.GraphSession, sequences: list[list[int]], lora: dict | None) -> torch.Tensor:
    """The graph's logits at every position of each sequence, concatenated (``lora``: its LoRA inputs)."""
    return torch.cat([torch.from_numpy(graph.logits(tokens, lora)) for tokens in sequences])


def _graph_report(report: Report, precision: str, reference: torch.dtype, simulation: str, tolerance: str) -> Report:
    """A graph run's verdict, KL left out at int4 (see `verify_graph`), and at int4 the adapter not
    required to stand out of the noise (int4's noise is as large as an adapter's effect: its lossy
    exports are judged by behaviour, docs/int4.md); exceeding the bounds still fails."""
    failed = [check for check in report.failed_checks
              if precision != "int4" or not check.startswith(("kl_", "inconclusive"))]
    kept = ("prompts", "positions", *STATISTICS, "top1_agreement", "bounds", "decisive_top1_agreement", "bare_base")
    return Report("full", precision, tolerance, failed, {
        "family": "causal-lm", "compared": ["logits"], **{key: report.numbers[key] for key in kept},
        "reference": dtype_name(reference), "simulation": simulation})


def verify_base_export(base: BaseCheckpoint, export_dir: Path, prompts=None) -> Report:
    """Verify an onnxruntime-genai export of the base alone: its graph against the base
    (`verify_base_graph`), the one check there is."""
    record = genai_runtime.export_record(export_dir)
    provider, precision = record.get("execution_provider", "cpu"), record.get("precision", "fp32")
    if not genai_runtime.provider_available(provider):
        raise UserError(f"{export_dir} is built for {provider}, which onnxruntime-genai cannot use on this machine; "
                        f"verify it on a machine with {provider}, or export with --no-verify")
    return verify_base_graph(base, export_dir, {}, precision, prompts)


def verify_lora_arrays(factors: AdapterFactors, arrays: dict, precision: str,
                       graphs: tuple[Report, Report] | str) -> Report:
    """Each module's LoRA factors as an export holds them (builder layout: transposed) against the
    exact ΔW, within `ROUNDING_NOISE` times the error of rounding the exact factors to their type;
    with ``graphs``, the runs of the graph at rank 0 and with the adapter (`verify_graph`), or why
    they were not run (then the verdict is FAIL: factors alone do not show the graph computes the
    model)."""

    stored = {}
    for module in factors.modules:
        names = [genai.lora_input(module, factor) for factor in ("lora_A", "lora_B")]
        present = all(name in arrays and 0 not in arrays[name].shape for name in names)
        stored[module] = tuple(torch.tensor(arrays[name]).T for name in names) if present else None
    failed, errors, ratios, _ = lora_factor_errors(factors, stored)
    if isinstance(graphs, str):
        failed.append(graphs)
    else:
        for label, graph in zip(("the graph at rank 0 vs the base", "the graph with the adapter vs the reference"),
                                graphs):
            if graph.failed_checks:
                failed.append(f"{label}: {', '.join(graph.failed_checks)}")
    tolerance = (f"each module's LoRA factors in the export reproduce the exact ΔW within {ROUNDING_NOISE:g}× what "
                 "rounding them to the graph's float type costs, and "
                 + ("the graph runs (not run here)" if isinstance(graphs, str) else
                    f"{graphs[0].tolerance}; and {graphs[1].tolerance}"))
    return Report("layerwise", precision, tolerance, failed, {
        "family": "causal-lm",
        "layers_checked": len(errors),
        "max_layer_relative_error": max(errors.values(), default=0.0),
        "worst_ratio_to_bound": max(ratios.values(), default=0.0),
        "graph_at_rank_zero": None if isinstance(graphs, str) else graphs[0].to_dict(),
        "graph_with_adapter": None if isinstance(graphs, str) else graphs[1].to_dict(),
    })

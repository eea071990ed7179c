"""The one step between an adapter's factors and a published artifact.

Every artifact (materialize, merge, export-lora, export-onnx, and the server's LoRA cache) is
made by one of the functions below, and each goes through `publish` (as does `psoft-deploy train`'s
adapter): stage in a temporary
sibling of the output, write, verify, record one report (``psoft_verification.json``, one
schema), write the model card, publish by rename. A failed verification leaves nothing behind.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch

from psoft_deploy.converters import gguf
from psoft_deploy.converters.verify import (
    Report,
    VerificationFailed,
    verify_base_export,
    verify_candidate,
    verify_full,
    verify_genai,
)
from psoft_deploy.core import __version__
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import AdapterFactors
from psoft_deploy.core.options import WRITE_DEFAULTS, WriteOptions
from psoft_deploy.core.outputs import atomic_files_into, atomic_output_dir
from psoft_deploy.core.progress import stage, third_party_output

REPORT_FILE = "psoft_verification.json"
NOT_VERIFIED = "not run (--no-verify)"
Written = TypeVar("Written")


@dataclass
class Check:
    """One verification of the staged artifact: ``run(staging)`` returns a `Report` whose
    ``passed`` decides (see `psoft_deploy.converters.verify`)."""

    label: str
    run: Callable[[Path], Report]


@dataclass
class Published:
    """What `publish` wrote: the writer's own result and one verdict line per check."""

    written: object
    verdicts: dict[str, str]

    @property
    def verification(self) -> str:
        """The verdicts as one line (for model cards), or that none ran."""
        if len(self.verdicts) == 1:
            return next(iter(self.verdicts.values()))
        return "; ".join(f"{label}: {line}" for label, line in self.verdicts.items()) or NOT_VERIFIED


def publish(
    output: str | Path,
    artifact: str,
    write: Callable[[Path], Written],
    checks: list[Check] | None,
    *,
    overwrite: bool = False,
    model_card: Callable[[Path, str], None] | None = None,
    last_file: str | None = None,
    adapters: Iterable[AdapterFactors | None] = (),
) -> Published:
    """Write ``artifact`` with ``write(staging)``, run ``checks`` on it (None: not verified, and
    no report is written), record the reports and what the base check decided for each of
    ``adapters``, add the model card, and rename the staging
    directory to ``output`` (with ``last_file``: move its files into ``output``, that one last,
    beside what ``output`` holds; see `atomic_files_into`). Raises `VerificationFailed` (and
    publishes nothing) if a check fails."""
    place = atomic_output_dir(output, overwrite) if last_file is None else atomic_files_into(output, last_file)
    with place as staging:
        stage(f"writing the {artifact}")
        published = Published(write(staging), {})
        if checks is not None:
            reports = []
            for check in checks:
                stage(f"verifying the {check.label}")
                reports.append(check.run(staging))
                reports[-1].label = check.label
            published.verdicts = {report.label: report.line() for report in reports}
            record = {
                "tool": {"name": "psoft-deploy", "version": __version__},
                "artifact": artifact,
                "passed": all(report.passed for report in reports),
                "checks": [report.to_dict() for report in reports],
                "base_identity": [{"adapter": str(factors.adapter.path), **factors.base_identity}
                                  for factors in adapters if factors is not None and factors.base_identity],
            }
            (staging / REPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
            for report in reports:
                if not report.passed:
                    which = "" if report.label == artifact else f" ({report.label})"
                    raise VerificationFailed(f"the {artifact} failed verification{which}, nothing written: "
                                             f"{report.line()}", report)
        if model_card is not None:
            model_card(staging, published.verification)
    return published


def read_report(directory: Path) -> dict:
    """The verification record a published artifact carries."""
    return json.loads((Path(directory) / REPORT_FILE).read_text())


def materialize(factors: AdapterFactors, output: str | Path, *, base_name: str, overwrite: bool = False) -> Published:
    """A self-contained materialized adapter; verified by reading it back (factors bit-identical)."""
    from psoft_deploy.converters.verify.candidates import reread_matches
    from psoft_deploy.core.materialize import save_materialized_files

    return publish(output, "materialized adapter", lambda staging: save_materialized_files(factors, staging, base_name),
                   [Check("materialized adapter", lambda staging: reread_matches(factors, staging))],
                   overwrite=overwrite, adapters=[factors])


def merge(base: BaseCheckpoint, factors: AdapterFactors, output: str | Path, *, adapter_name: str,
          options: WriteOptions = WRITE_DEFAULTS, max_shard_size="5GB", prompts=None) -> Published:
    """A dense merged model directory, or with ``options.to`` gguf one llama.cpp model file
    (``model.gguf`` of type ``options.quant``) and an Ollama ``Modelfile`` (``options``: dtype,
    verify_mode, overwrite; ``prompts``: verification prompts, None: verify's defaults)."""
    from psoft_deploy.converters.lora import adapted_dtype
    from psoft_deploy.converters.merge import merge_to_directory, merged_checkpoint, write_model_card

    to_gguf = options.to == "gguf"
    quant = options.gguf_quant(adapted_dtype(factors)) if to_gguf else None
    if to_gguf:  # refused before any work: what llama.cpp cannot run, and a missing llama.cpp
        gguf.Layout.of(base.config)
        if options.verify_mode is not None:
            gguf.llama_cpp()
        elif quant not in gguf.FLOAT_TYPES:
            gguf.llama_cpp(f"quantizes to {quant}", "")

    def write(staging: Path):
        if not to_gguf:
            return merge_to_directory(base, factors, staging, dtype=options.dtype, max_shard_size=max_shard_size)
        with merged_checkpoint(base, factors, staging, dtype="float32") as merged:
            gguf.write_model(merged, staging / gguf.MODEL_FILE, quant)
        gguf.write_modelfile(staging, f"./{gguf.MODEL_FILE}")
        return quant

    checks = None if options.verify_mode is None else [
        Check("merged model", lambda staging: verify_candidate(base, factors, staging, mode=options.verify_mode,
                                                               prompts=prompts))]
    return publish(
        output, "merged model", write, checks, overwrite=options.overwrite,
        model_card=lambda staging, verification: write_model_card(staging, base=base, adapter=adapter_name,
                                                                  factors=factors, verification=verification,
                                                                  gguf=quant), adapters=[factors])


def export_lora(base: BaseCheckpoint, factors: AdapterFactors, output: str | Path, *,
                options: WriteOptions = WRITE_DEFAULTS, prompts=None) -> Published:
    """A PEFT LoRA adapter, mlx-lm's or llama.cpp's (``options``: rank, energy, dtype, target, quant,
    as `psoft_deploy.converters.lora.export_lora` takes them, verify_mode, overwrite; ``prompts``:
    verification prompts, None: verify's defaults)."""
    from psoft_deploy.converters.lora import export_lora as write_lora

    base_name = base.name if not Path(base.name).expanduser().is_dir() else str(base.path.absolute())
    mode = options.verify_mode
    if options.target == "gguf" and mode is not None:
        gguf.llama_cpp()
    checks = None if mode is None else [Check("LoRA adapter", lambda staging: verify_candidate(
        base, factors, staging, mode=mode, prompts=prompts))]
    return publish(output, "LoRA adapter", lambda staging: write_lora(
        factors, staging, base_name=base_name, options=options, base_config=base.config, base_dir=base.path),
                   checks, overwrite=options.overwrite, adapters=[factors])


def export_onnx(base: BaseCheckpoint, output: str | Path, *, merged: AdapterFactors | None = None,
                adapters: dict[str, AdapterFactors] | None = None, exporter: str = "auto", precision: str = "fp32",
                execution_provider: str = "cpu", options: WriteOptions = WRITE_DEFAULTS,
                prompts=None, quantize_adapted: bool = False, **graph_options) -> Published:
    """An ONNX graph of the base with ``merged`` (in LoRA form through the model builder, folded in
    through torch.onnx), or of the base with LoRA inputs and one
    ``adapters/NAME.onnx_adapter`` per entry of ``adapters``; each verified in onnxruntime
    (``options``: verify_mode, None: not; overwrite). ``exporter``: ``genai`` (onnxruntime-genai's model builder, see
    `psoft_deploy.converters.genai`), ``torch`` (torch.onnx; ``graph_options``: with_past,
    opset), or ``auto``: genai for the decoders the builder converts, else torch. ``prompts``:
    verification prompts (None: verify's defaults). int4 leaves the adapted modules' base
    weights unquantized unless ``quantize_adapted`` (`genai.quantization_options`)."""
    from psoft_deploy.converters import genai, genai_runtime

    refusal = genai.builder_refusal(base.config or {}, replaces_modules=any(
        factors.replaced_tensors for factors in [merged, *(adapters or {}).values()] if factors is not None))
    exporter = resolve_exporter(exporter, refusal)
    if exporter == "torch":
        if precision == "int4" or execution_provider != "cpu":
            raise UserError("--precision int4 and --execution-provider cuda need the onnxruntime-genai exporter" + (
                f", and its model builder {refusal}" if refusal else "; pass --exporter genai"))
        return _export_torch_onnx(base, output, merged=merged, adapters=adapters or {}, verify=options.verify_mode is not None,
                                  overwrite=options.overwrite, dtype=precision, prompts=prompts, **graph_options)
    if graph_options.get("with_past") or graph_options.get("opset", 18) != 18:
        raise UserError("--with-past and --opset are torch.onnx options (onnxruntime-genai graphs always carry their "
                        "KV cache); pass --exporter torch for them")
    adapters = adapters or {}
    adapted = {name for factors in [merged, *adapters.values()] if factors is not None for name in factors.modules}
    quantization = genai.quantization_options(adapted, quantize_adapted) if precision == "int4" else ()

    def write(staging: Path) -> None:
        if adapters:  # the graph gets a LoRA input pair for every module any adapter adapts
            shapes = {name: (module.A.shape[1], module.B.shape[0])
                      for factors in adapters.values() for name, module in factors.modules.items()}
            pairs = {name: (torch.zeros(1, size_in), torch.zeros(size_out, 1)) for name, (size_in, size_out) in
                     shapes.items()}
        else:
            pairs = {name: module.lora() for name, module in merged.modules.items()} if merged is not None else {}
        dtype = genai.build(base.path, staging, pairs, precision=precision, execution_provider=execution_provider,
                            as_inputs=bool(adapters), builder_options=quantization)
        if adapters:
            (staging / "adapters").mkdir()
        for name, factors in adapters.items():
            arrays = genai.lora_arrays({module: module_factors.lora() for module, module_factors in
                                        factors.modules.items()}, dtype)
            genai_runtime.write_adapter_file(arrays, genai_runtime.adapter_file(staging, name))
        record = {"exporter": "onnxruntime-genai", "precision": precision, "execution_provider": execution_provider,
                  "adapters": sorted(adapters), "adapter_in_graph": merged is not None,
                  "builder_options": list(quantization)}
        (staging / genai_runtime.EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    def check(factors: AdapterFactors, name: str | None = None) -> Check:
        return Check(f"adapter {name}" if name else "adapter (LoRA form)", lambda staging: verify_genai(
            base, factors, staging, prompts, adapter_file=genai_runtime.adapter_file(staging, name) if name else None,
            mode=options.verify_mode))

    checks = [check(factors, name) for name, factors in adapters.items()] or (
        [check(merged)] if merged is not None else
        [Check("base", lambda staging: verify_base_export(base, staging, prompts))])
    form = ("each adapter as LoRA inputs in exact form (lora_A = A, lora_B = s·B(R−I))" if adapters else
            "the adapter in exact LoRA form (lora_A = A, lora_B = s·B(R−I)), out of the weights' rounding"
            if merged is not None else "the base alone")
    if quantization:
        form += "; int4 options " + " ".join(option.split(",")[0] + (" …" if "," in option else "")
                                            for option in quantization) + (
            "" if quantize_adapted or not adapted else " (the adapted modules' base weights left unquantized)")
    return publish(output, "ONNX export", write, checks if options.verify_mode is not None else None,
                   overwrite=options.overwrite,
                   model_card=onnx_model_card(base, merged, adapters,
                                              f"onnxruntime-genai's model builder: {precision}, execution provider "
                                              f"{execution_provider}; {form}", "`og.Model(DIR)`"),
                   adapters=[merged, *adapters.values()])


def onnx_model_card(base: BaseCheckpoint, merged: AdapterFactors | None, adapters: dict[str, AdapterFactors],
                    exported: str, runtime: str) -> Callable[[Path, str], None]:
    """The model card of an ONNX export: its adapters, how it was ``exported``, how to run it, its
    verification."""
    from psoft_deploy.converters.merge import describe_adapter, write_card

    described = ([f"adapter (merged): {describe_adapter(str(merged.adapter.path), merged)}"] if merged is not None
                 else [f"adapter `{name}` (adapters/{name}.onnx_adapter): {describe_adapter(name, factors)}"
                       for name, factors in adapters.items()])
    run = "psoft-deploy generate --onnx DIR --prompt TEXT" + (" --adapter NAME" if adapters else "")
    return lambda staging, verification: write_card(staging, base, "PSOFT model in ONNX", ["psoft", "onnx"], [
        *described, f"exported by psoft-deploy {__version__} through {exported}", f"run it: `{run}` or {runtime}",
        f"verification: {verification}"])


def resolve_exporter(exporter: str, refusal: str | None) -> str:
    """``auto``: onnxruntime-genai's model builder unless it refuses (`genai.builder_refusal`), then
    torch.onnx with a one-line note."""
    if exporter == "genai" and refusal:
        raise UserError(f"onnxruntime-genai's model builder {refusal}; pass --exporter torch")
    if exporter != "auto":
        return exporter
    if refusal:
        stage(f"note: onnxruntime-genai's model builder {refusal}; exporting with torch.onnx")
    return "torch" if refusal else "genai"


def _export_torch_onnx(base: BaseCheckpoint, output: str | Path, *, merged: AdapterFactors | None,
                       adapters: dict[str, AdapterFactors], verify: bool, overwrite: bool, dtype: str,
                       prompts=None, **graph_options) -> Published:
    """The torch.onnx export (`psoft_deploy.converters.onnx`): the merged model through the
    streaming merge, or the base with LoRA inputs; verified by `verify_full` in onnxruntime."""
    from psoft_deploy.converters.merge import merged_checkpoint
    from psoft_deploy.converters.onnx import export_graph, write_onnx_adapter

    lora_modules = sorted({module for factors in adapters.values() for module in factors.modules})
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]

    def write(staging: Path) -> None:
        with merged_checkpoint(base, merged, staging, dtype="float32") if merged is not None else (
                nullcontext(base.path)) as source, third_party_output():
            export_graph(source, staging, lora_modules=lora_modules, dtype=torch_dtype, **graph_options)
        if adapters:
            (staging / "adapters").mkdir()
        for name, factors in adapters.items():
            write_onnx_adapter(factors, staging / "adapters" / f"{name}.onnx_adapter")

    def check(factors: AdapterFactors | None, name: str | None = None) -> Check:
        label = f"adapter {name}" if name else ("merged model" if factors is not None else "base")
        return Check(label, lambda staging: verify_full(
            base, factors, staging, prompts, kind="onnx",
            adapter_file=staging / "adapters" / f"{name}.onnx_adapter" if name else None))

    checks = [check(merged)] + [check(factors, name) for name, factors in adapters.items()]
    return publish(output, "ONNX export", write, checks if verify else None, overwrite=overwrite,
                   model_card=onnx_model_card(base, merged, adapters, f"torch.onnx: {dtype}, " + (
                       "adapters as LoRA inputs" if adapters else "the adapter merged in float32" if merged is not None else
                       "the base alone"), "onnxruntime"), adapters=[merged, *adapters.values()])

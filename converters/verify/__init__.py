"""`psoft-deploy verify`: compare a converted artifact (merged model, LoRA adapter, ONNX export)
with the reference PSOFT forward, against tolerances measured in the same run.

The package, by what a reader looks for:

* `inputs`: the prompts and inputs the models run on, the outputs each family compares;
* `reference`: the float64 truth, the reference in the candidate's dtype, the bare base;
* `rule`: the noise-derived bounds, top-1 on decisive positions, the bare-base control, the
  behaviour rule for lossy exports;
* `candidates`: merged models, LoRA adapters, torch.onnx exports (full and layerwise modes);
  `genai_exports`: onnxruntime-genai exports; `gguf_exports`: GGUF files run by llama.cpp;
  `mlx_exports`: mlx-lm adapters run by mlx-lm; `runtimes`: the judgement they share (the runtime's own
  base as the noise);
* `report`: the typed `Report` every check returns, and `VerificationFailed`.

`verify_candidate` picks the check for a candidate directory or file.
"""

from __future__ import annotations

from pathlib import Path

from psoft_deploy.converters.genai_runtime import is_genai_export
from psoft_deploy.converters.gguf import gguf_file
from psoft_deploy.converters.lora import read_export_metadata
from psoft_deploy.converters.mlx import MLX_WEIGHTS
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import AdapterFactors
from psoft_deploy.core.formats import ADAPTER_CONFIG, read_json

from .candidates import (
    resolve_mode,
    verify_full,
    verify_layerwise,
    verify_lora_in_peft,
    verify_lora_layerwise,
    verify_truncated_lora,
)
from .genai_exports import verify_base_export, verify_genai
from .gguf_exports import verify_gguf
from .inputs import read_prompts
from .mlx_exports import verify_mlx_adapter
from .report import Report, VerificationFailed

__all__ = ["Report", "VerificationFailed", "read_prompts", "verify_base_export", "verify_candidate", "verify_full",
           "verify_genai", "verify_gguf", "verify_lora_layerwise"]


def verify_candidate(
    base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path, *, mode: str = "auto", prompts=None
) -> Report:
    """Verify a merged model directory or a LoRA adapter directory (export-lora's or any PEFT
    LoRA; ``mode``: full, layerwise, or auto by size; a plain LoRA is checked layer by layer as PEFT
    loads it unless ``mode`` is full, `verify_lora_in_peft`), an exported ONNX directory, an
    ``.onnx_adapter`` file (run on the graph beside it), a GGUF file or export (always full), or an
    mlx-lm adapter (run by mlx-lm where it is installed, its files checked)."""
    candidate_dir = Path(candidate_dir)
    if (file := gguf_file(candidate_dir)) is not None:
        return verify_gguf(base, factors, file, prompts)
    if candidate_dir.suffix == ".onnx_adapter":
        graph_dir = next((d for d in (candidate_dir.parent, candidate_dir.parent.parent) if (d / "model.onnx").is_file()),
                         None)
        if graph_dir is None:
            raise UserError(f"found no model.onnx next to {candidate_dir} or one directory up")
        if is_genai_export(graph_dir):
            return verify_genai(base, factors, graph_dir, prompts, adapter_file=candidate_dir, mode=mode)
        return verify_full(base, factors, graph_dir, prompts, kind="onnx", adapter_file=candidate_dir)
    if is_genai_export(candidate_dir):
        return verify_genai(base, factors, candidate_dir, prompts, mode=mode)
    if (candidate_dir / MLX_WEIGHTS).is_file():
        return verify_mlx_adapter(base, factors, candidate_dir, prompts, mode=mode)
    if (candidate_dir / ADAPTER_CONFIG).is_file():
        config = read_json(candidate_dir / ADAPTER_CONFIG)
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise UserError(f"candidate {candidate_dir} is a {config.get('peft_type')} adapter; verify checks "
                            "conversions (a merged model, a LoRA adapter or an ONNX export)")
        if read_export_metadata(candidate_dir).get("exact") is False:
            return verify_truncated_lora(base, factors, candidate_dir)
        if base.config and mode != "full" and (report := verify_lora_in_peft(base, factors, candidate_dir)):
            return report
        if not base.config or resolve_mode(mode, base) == "layerwise":
            return verify_lora_layerwise(base, factors, candidate_dir)
        return verify_full(base, factors, candidate_dir, prompts, kind="lora")
    if (candidate_dir / "model.onnx").is_file():
        return verify_full(base, factors, candidate_dir, prompts, kind="onnx")
    if not base.config:  # not a transformers model: no forward to run, each weight is checked instead
        return verify_layerwise(base, factors, candidate_dir)
    if not (candidate_dir / "config.json").is_file():
        raise UserError(f"candidate {candidate_dir} is not a model directory (config.json), a LoRA adapter "
                        f"({ADAPTER_CONFIG}) or an ONNX export (model.onnx)")
    if resolve_mode(mode, BaseCheckpoint(str(candidate_dir))) == "full":
        return verify_full(base, factors, candidate_dir, prompts)
    return verify_layerwise(base, factors, candidate_dir)

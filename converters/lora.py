"""`psoft-deploy export-lora`: the exact LoRA form of a PSOFT adapter, in PEFT's layout.

``lora_A = A``, ``lora_B = s·B(R − I)``, ``lora_alpha = r`` (scaling 1): the same ΔW, and
what every LoRA runtime (vLLM, PEFT, LoRAX, SGLang, TensorRT-LLM) loads. ``rank``/``energy``
give the optimal rank-k truncation per layer from an r×r core (`ModuleFactors.truncated_lora`),
never a dense SVD.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from psoft_deploy.converters import gguf
from psoft_deploy.converters.lora_format import LoraAdapter, lora_keys
from psoft_deploy.converters.mlx import mlx_layout, write_mlx_adapter
from psoft_deploy.core import __version__
from psoft_deploy.core.dtypes import BY_NAME, CHOICES
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import AdapterFactors
from psoft_deploy.core.options import WRITE_DEFAULTS, WriteOptions
from psoft_deploy.core.progress import track
from psoft_deploy.core.psoft import rank_for_energy

EXPORT_META = "psoft_lora_export.json"
# Runtimes that read one rank per adapter: every layer is zero-padded to the largest rank (exact).
UNIFORM_RANK_TARGETS = ("vllm", "sglang", "mlx", "gguf")


@dataclass
class LoraExport:
    """What was exported: per-module rank and relative error, and the vLLM rank to serve it with."""

    ranks: dict[str, int]
    errors: dict[str, float]
    exact: bool
    max_lora_rank: int | None


def export_lora(factors: AdapterFactors, staging: Path, *, base_name: str,
                options: WriteOptions = WRITE_DEFAULTS, base_config: dict | None = None,
                base_dir: Path | None = None) -> LoraExport:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA) into ``staging``
    (``options``: rank or energy, dtype, target), or with target ``mlx`` mlx-lm's
    ``adapters.safetensors`` + ``adapter_config.json`` (`psoft_deploy.converters.mlx`), with target
    ``gguf`` llama.cpp's ``adapter.gguf`` (``options.quant``), with ``options.with_base`` the base
    in ``base_dir`` as ``base.gguf`` of the same type, and an Ollama ``Modelfile`` reading both from
    beside it (`psoft_deploy.converters.gguf`); those two exact only (``base_config``: the base's
    config.json).

    With targets ``vllm``, ``sglang``, ``mlx`` and ``gguf`` every layer gets the same rank (smaller ones
    zero-padded, which is exact) since they read one rank per adapter; otherwise differing ranks
    go to ``rank_pattern``/``alpha_pattern``.
    """
    rank, energy, dtype, target = options.rank, options.energy, options.dtype, options.target
    base_config = base_config or {}
    if target in ("mlx", "gguf") and (rank is not None or energy is not None):
        raise UserError(f"--target {target} writes the exact adapter only; drop --rank/--energy")
    if target == "mlx":
        layout = mlx_layout(factors.modules, factors.adapter.modules_to_save, base_config.get("num_hidden_layers"))
    dtype = adapted_dtype(factors) if dtype == "auto" else dtype
    if target == "gguf":
        quant = gguf.check_adapter(options.gguf_quant(dtype), base_config, factors.adapter.modules_to_save)
    psoft_rank = factors.adapter.rank
    pairs, errors = {}, {}
    for name, module in track(factors.modules.items(), desc="export-lora"):
        if rank is None and energy is None:
            pairs[name], errors[name] = module.lora(), 0.0
        else:
            keep = min(rank, psoft_rank) if rank is not None else rank_for_energy(module.spectrum()[1], energy)
            lora_A, lora_B, errors[name] = module.truncated_lora(keep)
            pairs[name] = (lora_A, lora_B)
    ranks = {name: lora_A.shape[0] for name, (lora_A, _) in pairs.items()}
    top_rank = max(ranks.values())
    uniform = target in UNIFORM_RANK_TARGETS
    pattern = {} if uniform else {name: r for name, r in ranks.items() if r != top_rank}
    adapter = LoraAdapter(
        r=top_rank, lora_alpha=top_rank, target_modules=sorted({name.rsplit(".", 1)[-1] for name in factors.modules}),
        rank_pattern=pattern, alpha_pattern=dict(pattern), modules_to_save=factors.adapter.modules_to_save,
        fan_in_fan_out=factors.adapter.fan_in_fan_out, base_model_name_or_path=base_name,
        task_type=factors.adapter.source.get("adapter_config", {}).get("task_type"))
    max_lora_rank = adapter.check_vllm("the export") if target == "vllm" else None
    if target == "sglang":
        adapter.check_sglang("the export")
    if uniform:
        pairs = {name: _zero_pad(lora_A, lora_B, top_rank) for name, (lora_A, lora_B) in pairs.items()}
    out_dtype = BY_NAME[dtype].torch
    if target == "mlx":
        write_mlx_adapter(staging, pairs, num_layers=layout[0], keys=layout[1], base_name=base_name, dtype=out_dtype)
    elif target == "gguf":
        gguf.write_adapter(pairs, staging / gguf.ADAPTER_FILE, base_config, quant, name=f"PSOFT adapter on {base_name}")
        if options.with_base:
            gguf.write_model(base_dir, staging / gguf.BASE_FILE, quant)
        gguf.write_modelfile(staging, f"./{gguf.BASE_FILE}", f"./{gguf.ADAPTER_FILE}")
    else:
        tensors = {key: tensor for name, pair in pairs.items() for key, tensor in zip(lora_keys(name), pair)}
        adapter.write(staging, {key: value.to(out_dtype) for key, value in (tensors | factors.replaced_tensors).items()})
    exact = all(error == 0.0 for error in errors.values())
    metadata = {
        "tool": {"name": "psoft-deploy", "version": __version__},
        "source": factors.adapter.source | {"read_as": factors.adapter.format},
        "base": {"name_or_path": base_name},
        "exact": exact,
        "psoft_rank": psoft_rank,
        "dtype": quant if target == "gguf" else dtype,
        "target": None if target == "peft" else target,
        "vllm_max_lora_rank": max_lora_rank,
        "modules": {
            name: {"rank": ranks[name], "relative_error": errors[name], "fingerprint": factors.fingerprints.get(name)}
            for name in ranks
        },
    }
    (staging / EXPORT_META).write_text(json.dumps(metadata, indent=2) + "\n")
    return LoraExport(ranks=ranks, errors=errors, exact=exact, max_lora_rank=max_lora_rank)


def adapted_dtype(factors: AdapterFactors) -> str:
    """What ``--dtype auto`` stands for: the base's dtype of its adapted weights, if a user can name
    it (else float32)."""
    dtype = next(iter(factors.fingerprints.values()), {}).get("dtype", "float32")
    return dtype if dtype in CHOICES else "float32"


def _zero_pad(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extra zero rows of A and columns of B: the same ΔW at a larger rank."""
    pad = rank - lora_A.shape[0]
    return F.pad(lora_A, (0, 0, 0, pad)), F.pad(lora_B, (0, pad))


def read_export_metadata(candidate: Path) -> dict:
    """The export record next to a LoRA adapter written by export-lora (empty for foreign adapters)."""
    meta = candidate / EXPORT_META
    return json.loads(meta.read_text()) if meta.is_file() else {}

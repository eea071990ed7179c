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
from safetensors.torch import save_file

from psoft_deploy import __version__
from psoft_deploy.dtypes import BY_NAME, CHOICES
from psoft_deploy.errors import UserError
from psoft_deploy.factors import AdapterFactors
from psoft_deploy.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from psoft_deploy.progress import track
from psoft_deploy.psoft import rank_for_energy

EXPORT_META = "psoft_lora_export.json"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_MODULES_TO_SAVE = {"classifier", "score"}
# How vLLM names the Llama-family linear layers it applies LoRA to (q/k/v and gate/up are fused).
VLLM_LORA_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                     "up_proj": "gate_up_proj", "o_proj": "o_proj", "down_proj": "down_proj"}


@dataclass
class LoraExport:
    """What was exported: per-module rank and relative error, and the vLLM rank to serve it with."""

    ranks: dict[str, int]
    errors: dict[str, float]
    exact: bool
    max_lora_rank: int | None


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that fits ``rank``."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise UserError(f"rank {rank} is above vLLM's largest --max-lora-rank (512); export with --rank 512 or lower")


def vllm_lora_target_modules(module_names) -> list[str] | None:
    """vLLM's names for the layers these modules live in (for ``--lora-target-modules``), or None
    when a module is not a known Llama-family projection. vLLM otherwise runs LoRA kernels on
    every linear layer, adapted or not, which on CPU costs more than the adapted ones."""
    leaves = {name.rsplit(".", 1)[-1] for name in module_names}
    if not leaves or not leaves <= VLLM_LORA_MODULES.keys():
        return None
    return sorted({VLLM_LORA_MODULES[leaf] for leaf in leaves})


def check_vllm(factors: AdapterFactors, rank: int) -> int:
    """Refuse what vLLM would refuse at serve time; return the --max-lora-rank to use."""
    modules = {key.rsplit(".", 1)[0] for key in factors.replaced_tensors}
    unsupported = sorted(name for name in modules if name.rsplit(".", 1)[-1] not in VLLM_MODULES_TO_SAVE)
    if unsupported:
        raise UserError(
            f"vLLM rejects LoRA adapters with modules_to_save other than classifier/score (this one replaces "
            f"{', '.join(unsupported)}); merge the adapter instead (psoft-deploy merge)"
        )
    return vllm_max_lora_rank(rank)


def export_lora(
    factors: AdapterFactors,
    staging: Path,
    *,
    base_name: str,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str = "auto",
    target: str | None = None,
) -> LoraExport:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA) into ``staging``.

    With ``target="vllm"`` every layer gets the same rank (smaller ones zero-padded, which is
    exact) since vLLM reads one ``r`` per adapter; otherwise differing ranks go to
    ``rank_pattern``/``alpha_pattern``.
    """
    if rank is not None and energy is not None:
        raise UserError("pass --rank or --energy, not both")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy must be in (0, 1], got {energy}")
    if dtype == "auto":  # the base's own dtype for its adapted weights
        dtype = next(iter(factors.fingerprints.values()), {}).get("dtype", "float32")
        dtype = dtype if dtype in CHOICES else "float32"
    if dtype not in CHOICES:
        raise UserError(f"--dtype must be auto or one of {', '.join(CHOICES)}, got {dtype!r}")
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
    max_lora_rank = None
    if target == "vllm":
        max_lora_rank = check_vllm(factors, top_rank)
        pairs = {name: _zero_pad(lora_A, lora_B, top_rank) for name, (lora_A, lora_B) in pairs.items()}
    tensors = {}
    for name, (lora_A, lora_B) in pairs.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_B
    for key, tensor in factors.replaced_tensors.items():
        tensors[PEFT_PREFIX + key] = tensor
    out_dtype = BY_NAME[dtype].torch
    save_file({key: value.to(out_dtype).contiguous() for key, value in tensors.items()}, staging / ADAPTER_WEIGHTS)

    pattern = {} if target == "vllm" else {name: r for name, r in ranks.items() if r != top_rank}
    config = {
        "peft_type": "LORA",
        "task_type": factors.adapter.source.get("adapter_config", {}).get("task_type"),
        "base_model_name_or_path": base_name,
        "r": top_rank,
        "lora_alpha": top_rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in factors.modules}),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": factors.adapter.fan_in_fan_out,
        "init_lora_weights": True,
        "modules_to_save": factors.adapter.modules_to_save,
        "inference_mode": True,
    }
    (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    exact = all(error == 0.0 for error in errors.values())
    metadata = {
        "tool": {"name": "psoft-deploy", "version": __version__},
        "source": factors.adapter.source | {"read_as": factors.adapter.format},
        "base": {"name_or_path": base_name},
        "exact": exact,
        "psoft_rank": psoft_rank,
        "dtype": dtype,
        "target": target,
        "vllm_max_lora_rank": max_lora_rank,
        "modules": {
            name: {"rank": ranks[name], "relative_error": errors[name], "fingerprint": factors.fingerprints.get(name)}
            for name in ranks
        },
    }
    (staging / EXPORT_META).write_text(json.dumps(metadata, indent=2) + "\n")
    return LoraExport(ranks=ranks, errors=errors, exact=exact, max_lora_rank=max_lora_rank)


def _zero_pad(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extra zero rows of A and columns of B: the same ΔW at a larger rank."""
    pad = rank - lora_A.shape[0]
    return F.pad(lora_A, (0, 0, 0, pad)), F.pad(lora_B, (0, pad))


def read_export_metadata(candidate: Path) -> dict:
    """The export record next to a LoRA adapter written by export-lora (empty for foreign adapters)."""
    meta = candidate / EXPORT_META
    return json.loads(meta.read_text()) if meta.is_file() else {}

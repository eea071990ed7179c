"""`psoft-deploy merge`: a dense checkpoint with ΔW folded in, streamed shard by shard.

The base's safetensors are read one tensor at a time; each targeted weight gets
``W + ΔW`` accumulated in float32 and cast to the output dtype; every other tensor is
copied unchanged (bit-identical when the dtype is kept). The output follows transformers'
convention (one ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` + index) and
is written one tensor at a time (`psoft_deploy.core.tensorfile`), so peak memory is about one layer,
whatever the shard size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from psoft_deploy.core import __version__
from psoft_deploy.core.base import INDEX_FILE, BaseCheckpoint
from psoft_deploy.core.dtypes import BY_NAME
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import AdapterFactors, base_tensor_key
from psoft_deploy.core.outputs import format_size
from psoft_deploy.core.progress import track
from psoft_deploy.core.tensorfile import open_safetensors, torch_dtype, write_streaming

# Files of the base directory that are not copied: its weights and its model card.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
NOT_COPIED = {INDEX_FILE, "pytorch_model.bin.index.json", "README.md"}


@dataclass
class MergePlan:
    """Which output tensor comes from where, in which dtype, in which shard."""

    sources: dict[str, Path]  # key -> base shard
    stored_as: dict[str, str]  # key -> the base tensor it is read from (itself, or an untied partner)
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]
    shards: dict[str, list[str]]  # output file -> keys
    total_size: int


def output_dtype(name: str) -> torch.dtype | None:
    """``auto`` keeps each tensor's dtype; otherwise floating tensors are cast."""
    return None if name == "auto" else BY_NAME[name].torch


def plan_merge(base: BaseCheckpoint, factors: AdapterFactors, dtype: torch.dtype | None, max_shard_size) -> MergePlan:
    """Lay out the output from the base's headers alone (no tensor data is read)."""
    targets = set(stored_deltas(base, factors))
    untied = untied_partners(base, factors.replaced_tensors)
    replaced = stored_replacements(base, factors)
    missing = sorted(targets - set(base.files)) + sorted(set(replaced) - set(base.files) - set(untied))
    if missing:
        raise UserError(f"base {base.name} has no tensor {missing[0]!r} that the adapter changes")
    sources, dtypes, shapes = {}, {}, {}
    for key, info in base.index.items():
        stored = torch_dtype(info.dtype)
        out = dtype if dtype is not None and stored.is_floating_point else stored
        sources[key], dtypes[key], shapes[key] = info.file, out, info.shape
    stored_as = {key: key for key in sources}
    for key, partner in untied.items():
        sources[key], dtypes[key], shapes[key], stored_as[key] = sources[partner], dtypes[partner], shapes[partner], partner
    meta = {key: torch.empty(shapes[key], dtype=dtypes[key], device="meta") for key in sources}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    return MergePlan(sources, stored_as, dtypes, shapes, split.filename_to_tensors, split.metadata["total_size"])


def stored_deltas(base: BaseCheckpoint, factors: AdapterFactors) -> dict:
    """Each adapted module's factors, keyed by its weight's name in the base checkpoint."""
    return {base.stored_key(base_tensor_key(name)): module for name, module in factors.modules.items()}


def stored_replacements(base: BaseCheckpoint, factors: AdapterFactors) -> dict[str, torch.Tensor]:
    """The ``modules_to_save`` tensors, keyed by their names in the base checkpoint."""
    return {base.stored_key(key): tensor for key, tensor in factors.replaced_tensors.items()}


def untied_partners(base: BaseCheckpoint, replaced: dict) -> dict[str, str]:
    """Tensors the merged model must store although the base does not: the tied partners of
    ``modules_to_save`` tensors (PEFT unties them, see `psoft_deploy.core.layer.untie_replaced`), each
    mapped to the stored base tensor it shares. Empty when nothing tied is replaced."""
    if not replaced or not base.config:
        return {}
    from psoft_deploy.core.model import tied_parameter_groups

    partners = {}
    for names in tied_parameter_groups(base.path):
        stored = [name for name in names if name in base.files]
        if stored and names & replaced.keys() and not names <= replaced.keys():
            partners |= {name: stored[0] for name in names if name not in base.files}
    return partners


def merge_to_directory(
    base: BaseCheckpoint, factors: AdapterFactors, staging: Path, *, dtype: str = "auto", max_shard_size="5GB"
) -> MergePlan:
    """Write the merged weights, index, config and tokenizer files into ``staging``."""
    plan = plan_merge(base, factors, output_dtype(dtype), max_shard_size)
    free = shutil.disk_usage(staging).free
    if free < plan.total_size:
        raise UserError(
            f"not enough disk space in {staging.parent}: the merged model needs {format_size(plan.total_size)}, "
            f"{format_size(free)} are free"
        )
    deltas, replaced = stored_deltas(base, factors), stored_replacements(base, factors)
    progress = track(total=sum(len(keys) for keys in plan.shards.values()), desc="merge", unit="tensor")

    def produce(key: str) -> torch.Tensor:
        progress.update()
        return _merged_tensor(key, plan, deltas, replaced)

    for filename, keys in plan.shards.items():
        entries = [(key, plan.dtypes[key], plan.shapes[key]) for key in keys]
        write_streaming(staging / filename, entries, produce, metadata={"format": "pt"})
    progress.close()
    if len(plan.shards) > 1:
        weight_map = {key: filename for filename, keys in plan.shards.items() for key in keys}
        index = {"metadata": {"total_size": plan.total_size}, "weight_map": weight_map}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _copy_side_files(base.path, staging, dtype, untied=len(plan.sources) > len(base.files))
    return plan


@contextmanager
def merged_checkpoint(base: BaseCheckpoint, factors: AdapterFactors, beside: Path, *,
                      dtype: str = "auto") -> Iterator[Path]:
    """A temporary merged checkpoint in a hidden sibling of ``beside``, removed on exit (for
    exporters that read a transformers model directory)."""
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=Path(beside).parent) as directory:
        merge_to_directory(base, factors, Path(directory), dtype=dtype)
        yield Path(directory)


def _merged_tensor(key, plan: MergePlan, deltas: dict, replaced: dict) -> torch.Tensor:
    if key in replaced:
        return replaced[key].to(plan.dtypes[key]).contiguous()
    with open_safetensors(plan.sources[key]) as handle:
        tensor = handle.get_tensor(plan.stored_as[key])
    if key in deltas:
        merged = tensor.to(torch.float32) + deltas[key].delta_weight().to(torch.float32)
        tensor = merged.to(plan.dtypes[key])
        if not torch.isfinite(tensor).all():
            raise UserError(
                f"merging gives NaN or Inf in {key} (in {str(plan.dtypes[key]).removeprefix('torch.')}); "
                "the adapter is broken or the output dtype overflows: try --dtype float32"
            )
        return tensor
    return tensor.to(plan.dtypes[key])


def _copy_side_files(base_dir: Path, staging: Path, dtype: str, untied: bool) -> None:
    for file in sorted(base_dir.iterdir()):
        if file.is_file() and file.name not in NOT_COPIED and not file.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(file, staging / file.name)
    config_file = staging / "config.json"
    if (dtype != "auto" or untied) and config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config and dtype != "auto":
                config[key] = dtype
        if untied:
            config["tie_word_embeddings"] = False
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(staging: Path, *, base: BaseCheckpoint, adapter: str, factors: AdapterFactors,
                     verification: str, gguf: str | None = None) -> None:
    """A short README.md saying how the merged model was made (``gguf``: written as a GGUF of that
    type) and whether it verified."""
    written = [f"written as one GGUF file ({gguf}) for llama.cpp; Ollama: `ollama create NAME -f Modelfile`"
               ] if gguf else []
    write_card(staging, base, "Merged PSOFT model", ["psoft", "merged", *(["gguf"] if gguf else [])], [
        f"adapter: {describe_adapter(adapter, factors)}",
        f"merged by psoft-deploy {__version__}: `W' = W + s·B(R−I)A` with float32 accumulation",
        *written,
        f"verification: {verification}",
    ])


def describe_adapter(name: str, factors: AdapterFactors) -> str:
    """``name`` with the adapter's format, origin, rank and module count, for model cards."""
    source = factors.adapter.source
    return (f"`{name}` ({factors.adapter.format}"
            + (f", from {source.get('format')}" if source.get("format") != factors.adapter.format else "")
            + (f", PEFT {source['peft_version']}" if source.get("peft_version") else "")
            + f"), rank {factors.adapter.rank}, {len(factors.modules)} modules")


def write_card(staging: Path, base: BaseCheckpoint, title: str, tags: list[str], facts: list[str]) -> None:
    """A model card (README.md): the hub's ``base_model`` field (hub ids only; a local base is
    described in the text), ``tags``, ``title`` and one bullet per fact after the base model."""
    local = Path(base.name).expanduser().is_dir()
    lines = [
        "---",
        *([] if local else [f"base_model: {base.name}"]),
        f"tags: [{', '.join(tags)}]",
        "---",
        "",
        f"# {title}",
        "",
        f"- base model: {f'local directory `{base.path}`' if local else f'`{base.name}`'}",
        *(f"- {fact}" for fact in facts),
        "",
    ]
    (staging / "README.md").write_text("\n".join(lines))

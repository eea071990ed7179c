"""mlx-lm's LoRA adapter directory (``mlx_lm.load(model, adapter_path=DIR)``, ``--adapter-path``):
``adapters.safetensors`` + ``adapter_config.json``, after mlx-lm's ``tuner/utils.py``
(``load_adapters``, ``linear_to_lora_layers``) and ``tuner/lora.py`` (``LoRALinear``).

mlx-lm applies one rank, one scale and one set of ``keys`` (module paths inside a layer, e.g.
``self_attn.q_proj``) to the last ``num_layers`` layers, and computes ``y = W x + scale·(x lora_a)
lora_b`` with ``lora_a`` (in × r) and ``lora_b`` (r × out): PEFT's factors transposed, scale 1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from psoft_deploy.core.errors import UserError
from psoft_deploy.core.tensorfile import read_safetensors, write_safetensors

MLX_WEIGHTS = "adapters.safetensors"
MLX_CONFIG = "adapter_config.json"
# mlx-lm's models keep Llama's module paths (model.layers.N.self_attn.q_proj, ...).
LAYER_MODULE = re.compile(r"model\.layers\.(\d+)\.(.+)")
MERGE_INSTEAD = "merge the adapter instead (psoft-deploy merge) and convert the merged model (mlx_lm.convert)"


def mlx_layout(modules, modules_to_save, num_base_layers: int | None) -> tuple[int, list[str]]:
    """``num_layers`` and ``keys`` for mlx-lm's config, or a one-line `UserError` for what mlx-lm
    cannot express: replaced modules, a module outside ``model.layers.N``, or not the same modules
    in each of the base's last ``num_layers`` layers."""
    if modules_to_save:
        raise UserError(f"mlx-lm adapters hold LoRA layers only, not replaced modules ({', '.join(modules_to_save)}); "
                        + MERGE_INSTEAD)
    by_layer: dict[int, set[str]] = {}
    for module in modules:
        match = LAYER_MODULE.fullmatch(module)
        if match is None:
            raise UserError(f"mlx-lm applies LoRA inside model.layers.N only, not to {module}; " + MERGE_INSTEAD)
        by_layer.setdefault(int(match[1]), set()).add(match[2])
    keys = sorted(set.union(*by_layer.values()))
    total = num_base_layers if num_base_layers is not None else max(by_layer) + 1
    num_layers = total - min(by_layer)
    if set(by_layer) != set(range(min(by_layer), total)) or any(found != set(keys) for found in by_layer.values()):
        raise UserError(f"mlx-lm applies one set of modules to the last num_layers layers; this adapter adapts "
                        f"different modules or layers ({', '.join(keys)} across {len(by_layer)} of {total} layers); "
                        + MERGE_INSTEAD)
    return num_layers, keys


def write_mlx_adapter(directory: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], *, num_layers: int,
                      keys: list[str], base_name: str, dtype: torch.dtype) -> None:
    """Write PEFT-layout ``pairs`` (module → lora_A r×in, lora_B out×r, one rank, scaling folded into
    lora_B) as mlx-lm's ``lora_a``/``lora_b`` (transposed) with scale 1."""
    rank = next(iter(pairs.values()))[0].shape[0]
    tensors = {f"{module}.{name}": factor.T.to(dtype).contiguous()
               for module, pair in pairs.items() for name, factor in zip(("lora_a", "lora_b"), pair)}
    write_safetensors(tensors, directory / MLX_WEIGHTS)
    config = {"fine_tune_type": "lora", "model": base_name, "num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": 1.0, "dropout": 0.0, "keys": keys}}
    (directory / MLX_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_mlx_adapter(directory: Path, num_base_layers: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What mlx-lm would apply, read back: module → (lora_A, lora_B) in PEFT's layout (r×in, out×r,
    the config's scale folded into lora_B), for each key in each of the last ``num_layers`` layers
    (None where the file lacks it)."""
    config = json.loads((directory / MLX_CONFIG).read_text())
    parameters, tensors = config["lora_parameters"], read_safetensors(directory / MLX_WEIGHTS)
    pairs = {}
    for layer in range(num_base_layers - config["num_layers"], num_base_layers):
        for key in parameters["keys"]:
            module = f"model.layers.{layer}.{key}"
            lora_a, lora_b = tensors.get(f"{module}.lora_a"), tensors.get(f"{module}.lora_b")
            pairs[module] = None if lora_a is None or lora_b is None else (
                lora_a.T, lora_b.T.double() * parameters["scale"])
    return pairs

"""The PEFT LoRA format in one place: `LoraAdapter` reads and writes ``adapter_config.json`` and
``adapter_model.safetensors``, checks a read adapter against PEFT's rules and a base, and knows
what vLLM refuses (after vLLM's ``PEFTHelper.from_local_dir`` and ``validate_legal``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from psoft_deploy.core.base import BaseCheckpoint, base_tensor_key
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, lora_scaling, read_json
from psoft_deploy.core.tensorfile import TensorInfo, open_safetensors, read_headers, write_safetensors

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_MODULES_TO_SAVE = ("classifier", "score")
# What psoft-deploy writes beside the fields of `LoraAdapter`: an inference-only adapter.
WRITTEN_CONFIG = {"peft_type": "LORA", "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True}


def lora_keys(module: str) -> tuple[str, str]:
    """The weights' keys (without PEFT's prefix) of ``module``'s lora_A and lora_B."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: the ``adapter_config.json`` fields psoft-deploy reads and writes (PEFT's
    defaults where the config has none) and, once read, its weights' headers (keys without PEFT's
    ``base_model.model.`` prefix)."""

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    path: Path | None = field(default=None, compare=False)
    tensors: dict[str, TensorInfo] = field(default_factory=dict, compare=False)

    @classmethod
    def read(cls, directory: str | Path) -> LoraAdapter:
        """The LoRA adapter in ``directory``: its config and its weights' headers (no tensor data),
        checked against PEFT's rules (`check`)."""
        directory = Path(directory)
        config = read_json(directory / ADAPTER_CONFIG)
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise UserError(f"{directory} is a {config.get('peft_type')} adapter, not a LoRA adapter")
        names = {spec.name for spec in fields(cls)} - {"path", "tensors"}
        tensors = {key.removeprefix(PEFT_PREFIX): info for key, info in read_headers(directory / ADAPTER_WEIGHTS).items()}
        adapter = cls(**{name: config[name] for name in names if config.get(name) is not None},
                      path=directory, tensors=tensors)
        adapter.check()
        return adapter

    def write(self, directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Write the config and ``tensors`` (keys without PEFT's prefix) into ``directory``."""
        write_safetensors({PEFT_PREFIX + key: tensor for key, tensor in tensors.items()}, directory / ADAPTER_WEIGHTS)
        self.write_config(directory)

    def write_config(self, directory: Path, **extra) -> None:
        """Write ``adapter_config.json`` into ``directory``, with psoft-deploy's ``extra`` fields beside PEFT's."""
        config = {spec.name: getattr(self, spec.name) for spec in fields(self) if spec.name not in ("path", "tensors")}
        (directory / ADAPTER_CONFIG).write_text(json.dumps(WRITTEN_CONFIG | config | extra, indent=2) + "\n")

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each module's (lora_A, lora_B) as stored, read through the header index (errors name the file)."""
        with open_safetensors(self.path / ADAPTER_WEIGHTS) as handle:
            return {module: tuple(handle.get_tensor(PEFT_PREFIX + key) for key in lora_keys(module))
                    for module in self.modules}

    @property
    def modules(self) -> list[str]:
        """The modules the adapter holds a lora_A for, in its file's order."""
        return [key.removesuffix(".lora_A.weight") for key in self.tensors if key.endswith(".lora_A.weight")]

    @property
    def max_rank(self) -> int:
        """The largest rank of the config and of the stored lora_A weights."""
        return max([self.r, *self.rank_pattern.values(),
                    *(self.tensors[lora_keys(module)[0]].shape[0] for module in self.modules)])

    def scaling(self, module: str) -> float:
        """PEFT's scaling of ``module``: its alpha over its rank (over √rank with rsLoRA),
        ``rank_pattern`` and ``alpha_pattern`` matched as PEFT matches them."""
        from peft.utils.other import get_pattern_key

        rank = self.rank_pattern.get(get_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return lora_scaling(alpha, rank, self.use_rslora)

    def check(self) -> None:
        """PEFT's rules: positive ranks, and every lora_A (r×in) paired with a lora_B (out×r)."""
        ranks = {"r": self.r} | {f"rank_pattern[{key!r}]": rank for key, rank in self.rank_pattern.items()}
        for name, rank in ranks.items():
            if not isinstance(rank, int) or rank < 1:
                raise UserError(f"LoRA adapter {self.path}: {name} must be a positive integer, got {rank!r}")
        if not self.modules:
            raise UserError(f"LoRA adapter {self.path} holds no lora_A weights")
        for module in self.modules:
            key_A, key_B = lora_keys(module)
            shape_A, shape_B = self.tensors[key_A].shape, self.tensors[key_B].shape if key_B in self.tensors else None
            if shape_B is None or len(shape_A) != 2 or len(shape_B) != 2 or shape_A[0] != shape_B[1]:
                raise UserError(f"LoRA adapter {self.path}: {module} has lora_A {list(shape_A)} and lora_B "
                                f"{list(shape_B) if shape_B else 'missing'}; PEFT needs r×in and out×r")

    def check_fits(self, base: BaseCheckpoint) -> None:
        """Refuse a module whose lora_B·lora_A is not the shape of the base's weight."""
        for module in self.modules:
            shape_A, shape_B = (self.tensors[key].shape for key in lora_keys(module))
            if (shape_B[0], shape_A[1]) != base.shape(base_tensor_key(module)):
                raise UserError(f"LoRA adapter {self.path} does not fit the base at {module}")

    def check_vllm(self, subject: str) -> int:
        """Refuse what vLLM's ``validate_legal`` refuses (``subject`` names the adapter in the
        message); return the ``--max-lora-rank`` to serve it with."""
        unsupported = [name for name in self.modules_to_save or [] if name not in VLLM_MODULES_TO_SAVE]
        if unsupported:
            raise UserError(f"vLLM rejects LoRA adapters with modules_to_save other than classifier/score ({subject} "
                            f"replaces {', '.join(unsupported)}); merge the adapter instead (psoft-deploy merge)")
        if self.use_dora or self.bias != "none":
            raise UserError(f"vLLM rejects LoRA adapters with {'DoRA' if self.use_dora else 'bias'} ({subject}); "
                            "merge the adapter instead (psoft-deploy merge)")
        return vllm_max_lora_rank(self.max_rank, subject)

    def check_sglang(self, subject: str) -> None:
        """Refuse what SGLang's LoRA loader (``python/sglang/srt/lora/lora.py``, ``lora_manager.py``,
        ``lora_config.py``) cannot apply: it applies lora_A/lora_B of ``layers.N`` modules only, with
        one rank and one scaling ``lora_alpha / r`` per adapter."""
        merge = "merge the adapter instead (psoft-deploy merge)"
        if self.modules_to_save or self.use_dora or self.bias != "none":
            what = "modules_to_save" if self.modules_to_save else "DoRA" if self.use_dora else "bias"
            raise UserError(f"SGLang's LoRA loader cannot apply {what} ({subject}); {merge}")
        if self.rank_pattern or self.alpha_pattern:
            raise UserError(f"SGLang applies one rank and one scaling per LoRA adapter ({subject} has rank_pattern/"
                            "alpha_pattern); export it with --target sglang (one rank, zero-padded)")


def vllm_max_lora_rank(rank: int, subject: str = "the adapter") -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that fits ``rank``."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise UserError(f"{subject} has rank {rank}, above vLLM's largest LoRA rank {VLLM_MAX_LORA_RANKS[-1]}; serve a "
                    f"truncated LoRA of it instead (psoft-deploy export-lora --rank {VLLM_MAX_LORA_RANKS[-1]})")

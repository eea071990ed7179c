"""Lazy, read-only access to a base model's safetensors weights, and tensor fingerprints."""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path

import torch

from .architectures import model_class
from .errors import UserError
from .tensorfile import TensorInfo, open_safetensors, read_headers

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What a hub download fetches: weights, configs, tokenizer files, model card.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "README.md"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def base_tensor_key(module_name: str) -> str:
    return f"{module_name}.weight"


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local model directory, or a hub id downloaded (safetensors only) into the HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"base {name_or_path!r} is a file; pass the model directory that holds config.json")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        raise UserError(f"base {name_or_path!r} is neither a local directory nor a valid hub id") from None
    except Exception as error:  # network, auth, missing repo: all user-fixable; --verbose shows the traceback
        raise UserError(
            f"could not fetch base {name_or_path!r} from the hub ({type(error).__name__}); "
            "check the id and your connection, or pass a local directory"
        ) from error


def fingerprint(tensor: torch.Tensor) -> dict:
    """sha256 of the tensor's exact bytes, with its dtype and shape."""
    raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return {
        "sha256": hashlib.sha256(raw.data).hexdigest(),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
    }


class BaseCheckpoint:
    """A base model's tensors, read one at a time from its (possibly sharded) safetensors."""

    def __init__(self, name_or_path: str, revision: str | None = None):
        self.name = name_or_path
        self.path = resolve_model_dir(name_or_path, revision)
        self.files = self._weight_map()
        self._fingerprints: dict[str, dict] = {}

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise UserError(f"{index} is not a valid safetensors index (no 'weight_map')") from None
            return {key: self.path / file for key, file in weight_map.items()}
        single = self.path / SINGLE_FILE
        if single.is_file():
            with open_safetensors(single) as handle:
                return {key: single for key in handle.keys()}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt*")):
            raise UserError(
                f"base {self.path} has only pickled weights; psoft-deploy reads safetensors only. Convert it with "
                "transformers: from_pretrained(...).save_pretrained(dir) writes safetensors"
            )
        raise UserError(f"base {self.path} holds no {SINGLE_FILE} or {INDEX_FILE}")

    @property
    def reference(self) -> str:
        """What names this base on any machine: the hub id it was given as, else its absolute path."""
        local = Path(self.name).expanduser()
        return str(local.absolute()) if local.is_dir() else self.name

    def hub_ids(self) -> set[str]:
        """The hub ids this base is known by (lower case): as given, from a hub-cache snapshot path
        (``models--org--name/snapshots/...``), or from its config's ``_name_or_path``."""
        ids = {self.name} if not Path(self.name).expanduser().is_dir() else set()
        ids |= {part.removeprefix("models--").replace("--", "/") for part in self.path.absolute().parts
                if part.startswith("models--")}
        recorded = self.config.get("_name_or_path")
        if isinstance(recorded, str) and HUB_ID.fullmatch(recorded) and not Path(recorded).exists():
            ids.add(recorded)
        return {name.lower() for name in ids}

    def origins(self) -> set[str]:
        """What this base's own files say it is, in lower case: its `hub_ids` and the path its config's
        ``_name_or_path`` records."""
        recorded = self.config.get("_name_or_path")
        paths = {recorded.rstrip("/").lower()} if isinstance(recorded, str) and recorded else set()
        return self.hub_ids() | paths

    @cached_property
    def config(self) -> dict:
        config_file = self.path / "config.json"
        return json.loads(config_file.read_text()) if config_file.is_file() else {}

    def tensor(self, key: str) -> torch.Tensor:
        key = self.stored_key(key)
        with open_safetensors(self._file(key)) as handle:
            return handle.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor ``key``, from its file's header (no data read)."""
        key = self.stored_key(key)
        self._file(key)  # refuses a tensor the checkpoint lacks
        return self.index[key].shape

    @cached_property
    def index(self) -> dict[str, TensorInfo]:
        """Each stored tensor's file, dtype and shape, read from the safetensors headers once (file
        by file; a key the weight map assigns to another file, or to none, is left out)."""
        return {key: info for file in dict.fromkeys(self.files.values())
                for key, info in read_headers(file).items() if self.files.get(key) == file}

    def stored_key(self, key: str) -> str:
        """The name the model's parameter ``key`` has in the checkpoint: itself, or the name
        transformers renames on load (e.g. ViT's ``encoder.layer.N.attention.attention.query``)."""
        return key if key in self.files else self._renamed.get(key, key)

    @cached_property
    def _renamed(self) -> dict[str, str]:
        """Model key → stored key, for the keys transformers' conversion mapping renames."""
        if not self.config:
            return {}
        from transformers.conversion_mapping import (
            WeightRenaming,
            get_model_conversion_mapping,
        )

        renamings = [rule for rule in get_model_conversion_mapping(meta_model(self.path))
                     if isinstance(rule, WeightRenaming)]
        renamed = {}
        for stored in self.files:
            key = stored
            for rule in renamings:
                key = rule.rename_source_key(key)[0]
            if key != stored:
                renamed[key] = stored
        return renamed

    def _file(self, key: str) -> Path:
        if key not in self.files:
            raise UserError(f"base {self.name} has no tensor {key!r}")
        return self.files[key]

    def fingerprint(self, key: str, tensor: torch.Tensor | None = None) -> dict:
        """`fingerprint` of tensor ``key`` (pass ``tensor`` if already read), hashed once per checkpoint object."""
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(self.tensor(key) if tensor is None else tensor)
        return self._fingerprints[key]


def meta_model(path: Path):
    """The transformers model at ``path``, built from its config on the meta device (no weights)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls = model_class(config)
    with torch.device("meta"):
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)

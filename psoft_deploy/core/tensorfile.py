"""safetensors files, the one place that reads and writes them: headers without data
(`read_headers`), files opened per use with one-line errors (`open_safetensors`), whole files read
(`read_safetensors`) and written (`write_safetensors`), and a writer that holds one tensor at a time
(`write_streaming`). Writes land under a temporary sibling name, renamed when complete.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once (and serializes
them into one more buffer); a merged shard of several GB would cost that much RAM. The format is
simple enough to stream: an 8-byte little-endian header length, a JSON header with each tensor's
dtype, shape and byte range, then the bytes in that order. The header can be written first because
every shape and dtype is known before any data is read.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .dtypes import BY_NAME, from_safetensors
from .errors import UserError

__all__ = ["SafetensorError", "TensorInfo", "open_safetensors", "read_headers", "read_safetensors", "torch_dtype",
           "write_safetensors", "write_streaming"]


@dataclass(frozen=True)
class TensorInfo:
    """Where a stored tensor is and what it holds, from its file's safetensors header."""

    file: Path
    dtype: str  # safetensors' code: "BF16" (`psoft_deploy.core.dtypes.from_safetensors` names it)
    shape: tuple[int, ...]


def open_safetensors(file: Path):
    """safe_open with errors that name the file (open it per use: a closed file holds no memory)."""
    try:
        return safe_open(file, framework="pt")
    except FileNotFoundError:
        raise UserError(f"{file} is missing") from None
    except SafetensorError as error:
        raise UserError(f"{file} is not a readable safetensors file ({error}); re-download or re-save it") from None
    except OSError as error:
        raise UserError(f"cannot read {file}: {error.strerror or error}") from None


def read_headers(file: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, from its header (no data read)."""
    with open_safetensors(file) as handle:
        slices = {key: handle.get_slice(key) for key in handle.keys()}
        return {key: TensorInfo(file, piece.get_dtype(), tuple(piece.get_shape())) for key, piece in slices.items()}


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; errors name the file."""
    with open_safetensors(file) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@contextmanager
def _written_whole(file: Path):
    """A temporary sibling of ``file`` to write, renamed to ``file`` once the write completed (removed
    if it did not): a reader never sees half a file."""
    file = Path(file)
    partial = file.with_name(f".{file.name}.partial")
    try:
        yield partial
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)


def write_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (made contiguous) to ``file`` with ``metadata``, whole or not at all."""
    with _written_whole(file) as partial:
        save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, partial, metadata=metadata)


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``BF16`` → ``torch.bfloat16``)."""
    return from_safetensors(code).torch


def write_streaming(
    file: Path,
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``file`` holding ``entries`` (key, dtype, shape), asking ``produce(key)`` for each
    tensor only when its bytes are due. Tensors are laid out by decreasing element size, as
    safetensors does, so every tensor stays aligned."""
    entries = sorted(entries, key=lambda entry: (-entry[1].itemsize, entry[0]))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        code = BY_NAME[str(dtype).removeprefix("torch.")].safetensors
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with _written_whole(file) as partial, open(partial, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for key, dtype, shape in entries:
            tensor = produce(key)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{key}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
            handle.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())

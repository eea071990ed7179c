"""A safetensors writer that holds one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once (and
serializes them into one more buffer); a merged shard of several GB would cost that much
RAM. The format is simple enough to stream: an 8-byte little-endian header length, a JSON
header with each tensor's dtype, shape and byte range, then the bytes in that order. The
header can be written first because every shape and dtype is known before any data is read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from .dtypes import BY_NAME, from_safetensors


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
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for key, dtype, shape in entries:
            tensor = produce(key)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{key}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
            handle.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())

"""The one dtype table: each dtype's name (torch's and config.json's), safetensors code, bytes per
element, onnxruntime type and GGUF type; and GGUF's file types (llama.cpp's ``llama_ftype``). Torch-free, so `psoft-deploy generate` reads it without torch."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Dtype:
    name: str  # torch's and config.json's: "bfloat16"
    safetensors: str  # "BF16"
    itemsize: int  # bytes per element
    onnx: str | None = None  # onnxruntime's type (numpy holds it): "tensor(float)"
    gguf: str | None = None  # GGUF's (llama.cpp's) type: "BF16"

    @property
    def torch(self):
        """The torch dtype (``torch.bfloat16``)."""
        import torch

        return getattr(torch, self.name)


TABLE = (
    Dtype("float64", "F64", 8, "tensor(double)"), Dtype("float32", "F32", 4, "tensor(float)", "F32"),
    Dtype("float16", "F16", 2, "tensor(float16)", "F16"), Dtype("bfloat16", "BF16", 2, gguf="BF16"),
    Dtype("int64", "I64", 8), Dtype("int32", "I32", 4), Dtype("int16", "I16", 2), Dtype("int8", "I8", 1),
    Dtype("uint8", "U8", 1), Dtype("bool", "BOOL", 1),
    Dtype("float8_e4m3fn", "F8_E4M3", 1), Dtype("float8_e5m2", "F8_E5M2", 1),
)
BY_NAME = {dtype.name: dtype for dtype in TABLE}
BY_SAFETENSORS = {dtype.safetensors: dtype for dtype in TABLE}
BY_ONNX = {dtype.onnx: dtype for dtype in TABLE if dtype.onnx}
# GGUF file types a user can name (`--quant`), by llama.cpp's ``llama_ftype`` number (llama.h); F32, F16,
# BF16 and Q8_0 keep logits close enough to judge them, the others are judged by behaviour.
GGUF_FILE_TYPES = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q5_K_S": 16, "Q5_0": 8,
                   "Q4_K_M": 15, "Q4_K_S": 14, "Q4_0": 2, "Q3_K_M": 12, "Q2_K": 10}
# The floating dtypes a user can name for an output, a rebuilt subspace or a served model.
CHOICES = ("float32", "bfloat16", "float16")


def from_safetensors(code: str) -> Dtype:
    """The dtype of a safetensors dtype code (``BF16``)."""
    if code not in BY_SAFETENSORS:
        raise UserError(f"safetensors dtype {code} is not supported")
    return BY_SAFETENSORS[code]

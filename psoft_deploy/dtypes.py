"""The one dtype table: each dtype's name (torch's and config.json's), safetensors code, bytes per
element and onnxruntime type. Torch-free, so `psoft-deploy generate` reads it without torch."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Dtype:
    name: str  # torch's and config.json's: "bfloat16"
    safetensors: str  # "BF16"
    itemsize: int  # bytes per element
    onnx: str | None = None  # onnxruntime's type (numpy holds it): "tensor(float)"

    @property
    def torch(self):
        """The torch dtype (``torch.bfloat16``)."""
        import torch

        return getattr(torch, self.name)


TABLE = (
    Dtype("float64", "F64", 8, "tensor(double)"), Dtype("float32", "F32", 4, "tensor(float)"),
    Dtype("float16", "F16", 2, "tensor(float16)"), Dtype("bfloat16", "BF16", 2),
    Dtype("int64", "I64", 8), Dtype("int32", "I32", 4), Dtype("int16", "I16", 2), Dtype("int8", "I8", 1),
    Dtype("uint8", "U8", 1), Dtype("bool", "BOOL", 1),
    Dtype("float8_e4m3fn", "F8_E4M3", 1), Dtype("float8_e5m2", "F8_E5M2", 1),
)
BY_NAME = {dtype.name: dtype for dtype in TABLE}
BY_SAFETENSORS = {dtype.safetensors: dtype for dtype in TABLE}
BY_ONNX = {dtype.onnx: dtype for dtype in TABLE if dtype.onnx}
# The floating dtypes a user can name for an output, a rebuilt subspace or a served model.
CHOICES = ("float32", "bfloat16", "float16")


def from_safetensors(code: str) -> Dtype:
    """The dtype of a safetensors dtype code (``BF16``)."""
    if code not in BY_SAFETENSORS:
        raise UserError(f"safetensors dtype {code} is not supported")
    return BY_SAFETENSORS[code]

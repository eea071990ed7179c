"""`psoft-deploy export-onnx`: a merged causal LM as one ONNX graph, verified in onnxruntime.

The adapter is folded in by the streaming merge, and the merged model is exported with
torch's dynamo exporter: inputs ``input_ids`` and ``attention_mask`` (plus ``position_ids`` and
``past.{i}.key/value`` with ``with_past``, one graph for prefill and decode), outputs ``logits``
(and ``present.{i}.key/value``), dynamic batch, sequence and past lengths, weights as external
data next to the graph.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from psoft_deploy.errors import UserError
from psoft_deploy.model import load_base_model

GRAPH = "model.onnx"


class CausalLMForExport(nn.Module):
    """A transformers causal LM with flat tensor inputs and outputs, as the graph exposes them."""

    def __init__(self, model: nn.Module, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids=None, *past):
        if not self.with_past:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def past_shape(config, batch: int, length: int) -> tuple[int, int, int, int]:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return batch, heads, length, head_dim


def io_names(layers: int, with_past: bool) -> tuple[list[str], list[str]]:
    if not with_past:
        return ["input_ids", "attention_mask"], ["logits"]
    past = [f"past.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_graph(model_dir: Path, staging: Path, *, with_past: bool, dtype: torch.dtype, opset: int) -> None:
    """Export ``model_dir`` (a causal LM) to ``staging/model.onnx`` with external weights."""
    model = load_base_model(model_dir, dtype)
    if not model.__class__.__name__.endswith("ForCausalLM"):
        raise UserError(f"export-onnx exports causal language models; {model.__class__.__name__} is not one")
    wrapper = CausalLMForExport(model, with_past).eval()
    batch, seq, past_len = 2, 3, 2
    input_ids = torch.randint(4, model.config.vocab_size, (batch, seq))
    total = seq + (past_len if with_past else 0)
    attention_mask = torch.ones(batch, total, dtype=torch.int64)
    attention_mask[1, -1] = 0  # a padded example keeps the mask an input of the graph
    args: tuple = (input_ids, attention_mask)
    if with_past:
        position_ids = torch.arange(past_len, total).expand(batch, seq).contiguous()
        past = [torch.randn(past_shape(model.config, batch, past_len), dtype=dtype)
                for _ in range(2 * wrapper.layers)]
        args = (input_ids, attention_mask, position_ids, *past)
    auto = torch.export.Dim.AUTO
    dynamic = [{0: auto, 1: auto}, {0: auto, 1: auto}]
    if with_past:  # the past tensors arrive as one *args tuple
        dynamic += [{0: auto, 1: auto}, tuple([{0: auto, 2: auto}] * (2 * wrapper.layers))]
    inputs, outputs = io_names(wrapper.layers, with_past)
    try:
        program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=tuple(dynamic), opset_version=opset,
                                    input_names=inputs, output_names=outputs, external_data=True)
        program.save(str(staging / GRAPH), external_data=True)
    except Exception as error:
        raise UserError(f"torch.onnx could not export {model.__class__.__name__}: {type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}") from None
    for file in model_dir.iterdir():
        if file.is_file() and (file.suffix == ".json" and "safetensors" not in file.name or file.suffix in
                               (".txt", ".model", ".jinja")):
            shutil.copyfile(file, staging / file.name)


def onnx_logits(onnx_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Logits of a full sequence from the exported graph (an empty past for with-past graphs)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_dir / GRAPH), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
    names = {i.name: i for i in session.get_inputs()}
    if "position_ids" in names:
        batch, seq = input_ids.shape
        feeds["position_ids"] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        for name, meta in names.items():
            if name.startswith("past."):
                heads, head_dim = meta.shape[1], meta.shape[3]
                feeds[name] = np.zeros((batch, heads, 0, head_dim), dtype=_numpy_dtype(meta.type))
    return session.run(["logits"], feeds)[0]


def _numpy_dtype(onnx_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}.get(
        onnx_type, np.float32)

"""`psoft-deploy export-onnx`: a merged model as one ONNX graph, verified in onnxruntime.

Causal LMs and, without past or LoRA inputs, encoders, sequence classifiers and image classifiers
(their family's outputs, as verify compares them).

The adapter is folded in by the streaming merge, and the merged model is exported with
torch's dynamo exporter: inputs ``input_ids`` and ``attention_mask`` (plus ``position_ids`` and
``past.{i}.key/value`` with ``with_past``, one graph for prefill and decode), outputs ``logits``
(and ``present.{i}.key/value``), dynamic batch, sequence and past lengths, weights as external
data next to the graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from psoft_deploy.core.architectures import Shape, model_family
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.layer import replace_module
from psoft_deploy.core.model import load_base_model

GRAPH = "model.onnx"


class LoraInputLinear(nn.Module):
    """A linear layer plus a LoRA update whose factors (A: r×in, B: out×r) are graph inputs."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.factors
        return self.base_layer(x) + (x @ lora_A.T) @ lora_B.T


class CausalLMForExport(nn.Module):
    """A transformers causal LM with flat tensor inputs and outputs, as the graph exposes them;
    ``lora_modules`` become `LoraInputLinear` layers fed from the ``lora`` inputs."""

    def __init__(self, model: nn.Module, with_past: bool, lora_modules: list[str] = ()):
        super().__init__()
        self.model, self.with_past = model, with_past
        self.layers = model.config.num_hidden_layers
        self.lora_modules = list(lora_modules)
        for name in self.lora_modules:
            replace_module(model, name, LoraInputLinear(model.get_submodule(name)))

    def forward(self, input_ids, attention_mask, position_ids=None, past=(), lora=()):
        for index, name in enumerate(self.lora_modules):
            self.model.get_submodule(name).factors = (lora[2 * index], lora[2 * index + 1])
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
    shape = Shape.of(config.to_dict())
    return batch, shape.kv_heads, length, shape.head_dim


def lora_input_names(module: str) -> tuple[str, str]:
    """Graph input (and .onnx_adapter parameter) names of one module's LoRA factors."""
    return f"lora.{module}.A", f"lora.{module}.B"


def io_names(layers: int, with_past: bool, lora_modules: list[str]) -> tuple[list[str], list[str]]:
    inputs, outputs = ["input_ids", "attention_mask"], ["logits"]
    if with_past:
        inputs += ["position_ids"] + [f"past.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        outputs += [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return inputs + [name for module in lora_modules for name in lora_input_names(module)], outputs


def export_graph(model_dir: Path, staging: Path, *, with_past: bool, dtype: torch.dtype, opset: int,
                 lora_modules: list[str] = ()) -> None:
    """Export ``model_dir`` to ``staging/model.onnx`` with external weights: a causal LM (each of
    ``lora_modules`` with LoRA inputs of a dynamic rank and rank-0 zero defaults), or an encoder,
    sequence classifier or image classifier with its family's outputs."""
    model = load_base_model(model_dir, dtype)
    family = model_family(json.loads((model_dir / "config.json").read_text()))
    if family.name == "causal-lm":
        wrapper, args, dynamic, inputs, outputs = _causal_lm_export(model, with_past, dtype, lora_modules)
    elif family.name in ("classifier", "encoder", "image-classifier") and not (with_past or lora_modules):
        wrapper, args, dynamic, inputs, outputs = _outputs_export(model, family, dtype)
    else:
        raise UserError(
            f"export-onnx exports causal LMs (with --with-past and --adapters-as-inputs), encoders, sequence "
            f"classifiers and image classifiers; {model.__class__.__name__} ({family.name}"
            f"{', with those options' if family.name != 'seq2seq' else ''}) is not supported")
    try:
        program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                    input_names=inputs, output_names=outputs, external_data=True)
        program.save(str(staging / GRAPH), external_data=True)
    except Exception as error:
        raise UserError(f"torch.onnx could not export {model.__class__.__name__}: {type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''} (--verbose shows the traceback)") from error
    if lora_modules:
        _add_rank_zero_defaults(staging / GRAPH)
    for file in model_dir.iterdir():
        if file.is_file() and (file.suffix == ".json" and "safetensors" not in file.name or file.suffix in
                               (".txt", ".model", ".jinja")):
            shutil.copyfile(file, staging / file.name)


def _causal_lm_export(model, with_past: bool, dtype: torch.dtype, lora_modules: list[str]):
    """Wrapper, example inputs, dynamic shapes and input/output names of a causal LM's graph."""
    for name in lora_modules:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise UserError(f"{name} is not a linear layer of {model.__class__.__name__}")
    wrapper = CausalLMForExport(model, with_past, lora_modules).eval()
    batch, seq, past_len, example_rank = 2, 3, 2, 2  # lengths ≥ 2: 0 and 1 would be specialised
    total = seq + (past_len if with_past else 0)
    attention_mask = torch.ones(batch, total, dtype=torch.int64)
    attention_mask[1, -1] = 0  # a padded example keeps the mask an input of the graph
    position_ids = torch.arange(past_len, total).expand(batch, seq).contiguous() if with_past else None
    past = tuple(torch.randn(past_shape(model.config, batch, past_len), dtype=dtype)
                 for _ in range(2 * wrapper.layers)) if with_past else ()
    lora = []
    for name in lora_modules:
        layer = model.get_submodule(name).base_layer
        lora += [torch.zeros(example_rank, layer.in_features, dtype=dtype),
                 torch.zeros(layer.out_features, example_rank, dtype=dtype)]
    args = (torch.randint(4, model.config.vocab_size, (batch, seq)), attention_mask, position_ids, past, tuple(lora))
    auto = torch.export.Dim.AUTO
    dynamic = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto} if with_past else None,
               tuple({0: auto, 2: auto} for _ in past), tuple({0: auto} if i % 2 == 0 else {1: auto}
                                                             for i in range(len(lora))))
    return (wrapper, args, dynamic, *io_names(wrapper.layers, with_past, list(lora_modules)))


class OutputsForExport(nn.Module):
    """A transformers model with positional tensor inputs and named outputs returned as a tuple."""

    def __init__(self, model: nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model, self.input_names, self.output_names = model, input_names, output_names

    def forward(self, *tensors):
        outputs = self.model(**dict(zip(self.input_names, tensors)))
        return tuple(outputs[name] for name in self.output_names)


def _outputs_export(model, family, dtype: torch.dtype):
    """Wrapper, example inputs, dynamic shapes and names of an encoder's or classifier's graph:
    ``input_ids`` and ``attention_mask`` (dynamic batch and length) or ``pixel_values`` (dynamic
    batch) in, the family's outputs (those the model returns) out."""
    auto = torch.export.Dim.AUTO
    config = model.config
    if family.name == "image-classifier":
        size = config.image_size
        args = (torch.randn(2, config.num_channels, size, size, dtype=dtype),)
        input_names, dynamic = ["pixel_values"], ({0: auto},)
    else:
        attention_mask = torch.ones(2, 3, dtype=torch.int64)
        attention_mask[1, -1] = 0  # a padded example keeps the mask an input of the graph
        args = (torch.randint(4, config.vocab_size, (2, 3)), attention_mask)
        input_names, dynamic = ["input_ids", "attention_mask"], ({0: auto, 1: auto}, {0: auto, 1: auto})
    with torch.no_grad():
        example = model(**dict(zip(input_names, args)))
    output_names = [name for name in family.outputs if example.get(name) is not None]
    # forward(*tensors) takes the inputs as one variadic argument: its dynamic shapes nest once more
    return OutputsForExport(model, input_names, output_names).eval(), args, (dynamic,), input_names, output_names


def _add_rank_zero_defaults(graph_file: Path) -> None:
    """Give every LoRA input an empty (rank-0) initializer: no adapter means the base model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph_file), load_external_data=False)
    for graph_input in model.graph.input:
        if not graph_input.name.startswith("lora."):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in graph_input.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(dims, dtype=dtype), graph_input.name))
    onnx.save(model, str(graph_file))


def write_onnx_adapter(factors, file: Path) -> None:
    """One adapter as an onnxruntime ``.onnx_adapter`` file: exact LoRA factors, scale in B."""
    from psoft_deploy.converters.genai_runtime import write_adapter_file

    arrays = {}
    for name, module in factors.modules.items():
        lora_A, lora_B = module.lora()
        input_A, input_B = lora_input_names(name)
        arrays[input_A] = lora_A.detach().float().numpy()
        arrays[input_B] = lora_B.detach().float().numpy()
    write_adapter_file(arrays, file)


def onnx_outputs(onnx_dir: Path, inputs: dict[str, np.ndarray], names: tuple[str, ...] = ("logits",),
                 adapter_file: Path | None = None) -> dict[str, np.ndarray]:
    """The graph's ``names`` outputs (those it has) for a full run on ``inputs`` (an empty past and
    positions from 0 for with-past graphs), with one ``.onnx_adapter`` active if given."""
    from psoft_deploy.core.generate import FLOAT_TYPES, OnnxModel

    model = OnnxModel(onnx_dir, adapter_file)

    feeds = {name: value.astype(np.int64 if value.dtype.kind in "iu" else FLOAT_TYPES[model.inputs[name].type])
             for name, value in inputs.items() if name in model.inputs}
    if model.past_names:
        batch, seq = inputs["input_ids"].shape
        feeds["position_ids"] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        feeds |= model.empty_past(batch)
    available = [name for name in names if name in {output.name for output in model.session.get_outputs()}]
    return dict(zip(available, model.run(available, feeds)))


def onnx_logits(onnx_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray,
                adapter_file: Path | None = None) -> np.ndarray:
    """Logits of a full sequence from an exported causal LM."""
    return onnx_outputs(onnx_dir, {"input_ids": input_ids, "attention_mask": attention_mask}, ("logits",),
                        adapter_file)["logits"]

"""`psoft-deploy export-onnx` for decoder LLMs, through onnxruntime-genai's model builder.

The builder converts the base as ORT's own LLM runtime wants it (fused attention, a managed KV
cache, int4 weight-only quantization) and takes the PSOFT adapter in its exact LoRA form
(``lora_A = A``, ``lora_B = s·B(R − I)``, scaling 1), kept out of the weights' rounding and
quantization: the graph computes ``W x + lora_B (lora_A x)`` with ``W`` at the export's precision
and the update in the graph's float type. No merged copy of the model is made, so the export
needs what the builder needs for the base.

Every LoRA factor then becomes a graph input with a symbolic rank whose default is the adapter's
factor (or, with adapters as inputs, an empty rank-0 tensor: the base). An ``.onnx_adapter`` file
(`og.Adapters`) replaces them per request, and verification runs the same graph at rank 0 to
measure what the precision alone does to the base. Running an export:
`psoft_deploy.converters.genai_runtime`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from psoft_deploy.core.architectures import Shape, architecture
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.progress import verbose

from .genai_runtime import GRAPH, float_type

FACTORS = ("lora_A", "lora_B")


def builder_refusal(config: dict, replaces_modules: bool = False) -> str | None:
    """Why onnxruntime-genai's model builder would not convert this model, with an adapter that
    ``replaces_modules`` (``modules_to_save``) or not (None: it would)."""
    if replaces_modules:
        return "does not convert adapters with modules_to_save"
    model = architecture(config)
    if not model.genai_builder:
        return f"does not convert {model.name}"
    if any(isinstance(value, dict) for value in (config.get("rope_parameters") or {}).values()):
        return f"does not read {model.name}'s per-layer-type rope_parameters (transformers 5)"
    shape = Shape.of(config)
    vocab_size = shape.vocab
    # the builder's `has_lm_head` takes any Linear as wide as the vocabulary for the head
    clashes = [name for name, width in model.linear_widths(shape).items() if width == vocab_size]
    if clashes:
        return (f"would wire the LM head onto a layer: it takes any Linear with vocab_size ({vocab_size}) outputs "
                f"for the head, and {' and '.join(clashes)} {'is' if len(clashes) == 1 else 'are'} {vocab_size} too")
    return None


def builder_node(module: str, factor: str | None = None) -> str:
    """The builder's name for the MatMul of one LoRA factor of ``module``
    (``model.layers.3.self_attn.q_proj`` → ``/model/layers.3/attn/q_proj/lora_A/MatMul``), or of
    its base weight (``factor`` None: ``/model/layers.3/attn/q_proj/MatMul``)."""
    path = re.sub(r"layers\.(\d+)", r"layers#\1", module.replace(".self_attn.", ".attn."))
    return f"/{path.replace('.', '/').replace('#', '.')}{f'/{factor}' if factor else ''}/MatMul"



def quantization_options(modules, quantize_adapted: bool = False) -> tuple[str, ...]:
    """The builder's int4 options: k-quant, and the adapted ``modules``' base weights left in the
    graph's float type (unless ``quantize_adapted``). Measured on SmolLM2-135M-Instruct with an
    adapter trained to answer ``ANSWER: n`` (docs/int4.md): with every weight in int4 the adapter
    collapses into gibberish (0/20 answers in its format, RTN or k-quant); with its modules
    unquantized it keeps its format (18/20 with k-quant, 11/20 with RTN)."""
    options = ["algo_config=k_quant"]
    if modules and not quantize_adapted:
        options.append("nodes_to_exclude=" + ",".join(builder_node(module) for module in sorted(modules)))
    return tuple(options)



def lora_input(module: str, factor: str) -> str:
    """The graph input (and ``.onnx_adapter`` parameter) holding one LoRA factor of ``module``."""
    return builder_node(module, factor)[1:].replace("/", ".") + ".weight"



def lora_arrays(pairs: dict, dtype) -> dict[str, np.ndarray]:
    """``{input name: array}`` for LoRA pairs ``{module: (lora_A r×in, lora_B out×r)}``, laid out
    as the builder's MatMul weights (transposed) in ``dtype``."""
    arrays = {}
    for module, (lora_A, lora_B) in pairs.items():
        arrays[lora_input(module, "lora_A")] = lora_A.detach().double().T.numpy().astype(dtype)
        arrays[lora_input(module, "lora_B")] = lora_B.detach().double().T.numpy().astype(dtype)
    return arrays



def build(base_dir: Path, staging: Path, pairs: dict, *, precision: str, execution_provider: str,
          as_inputs: bool, builder_options: tuple[str, ...] = ()) -> np.dtype | None:
    """Run the model builder on ``base_dir`` into ``staging`` with the LoRA ``pairs``
    (``{module: (lora_A, lora_B)}`` tensors) and turn every factor into a graph input: defaulting
    to the pair (``as_inputs`` False) or to rank 0. Returns the float type of the LoRA inputs (None
    without pairs: the base alone)."""
    with tempfile.TemporaryDirectory(prefix=".builder-", dir=staging.parent) as work:
        work = Path(work)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base_dir), "-o", str(staging),
                   "-p", precision, "-e", execution_provider, "-c", str(work / "cache")]
        extra = dict(option.split("=", 1) for option in builder_options)
        if pairs:
            lora_dir = work / "lora"
            _write_lora(lora_dir, pairs)
            excluded = [builder_node(module, factor) for module in pairs for factor in FACTORS]
            extra["adapter_path"] = str(lora_dir)
            extra["nodes_to_exclude"] = ",".join(filter(None, [extra.get("nodes_to_exclude"), *excluded]))
        if extra:
            command += ["--extra_options", *(f"{key}={value}" for key, value in extra.items())]
        log = work / "builder.log"
        with open(log, "w") as handle:
            output = None if verbose() else handle
            stderr = None if verbose() else subprocess.STDOUT
            returncode = subprocess.run(command, stdout=output, stderr=stderr, check=False).returncode
        if returncode != 0:
            lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
            raise UserError(f"onnxruntime-genai's model builder failed ({precision}, {execution_provider}): "
                            f"{lines[-1] if lines else f'exit status {returncode}'}; --verbose shows its log, "
                            "--exporter torch exports without it")
    if not pairs:
        return None
    remedy = ("its cuda fp32 graph fuses attention into one Attention node, which takes no LoRA: export for cuda "
              "with --precision fp16 or int4" if (execution_provider, precision) == ("cuda", "fp32")
              else "export with --exporter torch")
    return expose_lora_inputs(staging / GRAPH, pairs, rank_zero=as_inputs, remedy=remedy)



def round_like_builder(model, precision: str):
    """``model`` rounded as the builder's graph computes at ``precision``, near enough to measure
    that precision's noise in torch: for int4, every Linear's weight (the head's, and with it a tied
    embedding, included) in signed 4 bits per block of 32 inputs, scale absmax / 8 (MatMulNBits'
    symmetric default), and its input in signed 8 bits per block of 32 (accuracy level 4, the CPU
    default); other precisions as they are."""
    import torch

    def round_blocks(tensor: torch.Tensor, levels: int) -> torch.Tensor:
        blocks = torch.nn.functional.pad(tensor, (0, -tensor.shape[-1] % 32)).unflatten(-1, (-1, 32))
        scale = (blocks.abs().amax(-1, keepdim=True) / levels).clamp_min(torch.finfo(tensor.dtype).tiny)
        return ((blocks / scale).round().clamp(-levels, levels - 1) * scale).flatten(-2)[..., :tensor.shape[-1]]

    if precision == "int4":
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data.copy_(round_blocks(module.weight.data, 8))  # in place: a tied embedding too
                module.register_forward_pre_hook(lambda _, args: (round_blocks(args[0], 128),))
    return model



def _write_lora(directory: Path, pairs: dict) -> None:
    """``pairs`` as a PEFT LoRA adapter the builder reads: every module by its full name, scaling 1."""
    from psoft_deploy.converters.lora_format import LoraAdapter, lora_keys

    ranks = {module: lora_A.shape[0] for module, (lora_A, _) in pairs.items()}
    directory.mkdir()
    LoraAdapter(r=1, lora_alpha=1, target_modules=sorted(pairs), rank_pattern=ranks, alpha_pattern=ranks).write(
        directory, {key: tensor.float() for module, pair in pairs.items() for key, tensor in zip(lora_keys(module), pair)})


def expose_lora_inputs(graph_file: Path, pairs: dict, *, rank_zero: bool,
                       remedy: str = "export with --exporter torch") -> np.dtype:
    """Make each LoRA factor the builder baked in a graph input with a symbolic rank, keeping the
    initializer as its default (``rank_zero``: an empty rank-0 one instead). Refuses a graph where
    the builder left out a module or quantized a factor."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph_file), load_external_data=False)
    wanted = {lora_input(module, factor): (module, factor) for module in pairs for factor in FACTORS}
    found = {init.name: init for init in model.graph.initializer if init.name in wanted}
    missing = sorted({wanted[name][0] for name in set(wanted) - set(found)})
    if missing:
        raise UserError(f"onnxruntime-genai's model builder did not apply the adapter to {', '.join(missing[:3])}"
                        f"{' …' if len(missing) > 3 else ''}; {remedy}")
    types = {init.data_type for init in found.values()}
    if not all(float_type(elem_type) for elem_type in types) or len(types) != 1:
        raise UserError("onnxruntime-genai's model builder quantized the adapter's LoRA factors; export with "
                        "--precision fp32 or fp16")
    for name, init in found.items():
        module, factor = wanted[name]
        rank = f"rank.{module}"
        shape = [init.dims[0], rank] if factor == "lora_A" else [rank, init.dims[1]]
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, shape))
        if rank_zero:
            empty = [init.dims[0], 0] if factor == "lora_A" else [0, init.dims[1]]
            init.CopyFrom(numpy_helper.from_array(np.zeros(empty, float_type(init.data_type)), name))
    # The builder declared the LoRA intermediates at the template's rank: leave their shapes to the runtime.
    kept = [info for info in model.graph.value_info if "/lora_A/" not in info.name]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    onnx.save(model, str(graph_file))
    return float_type(types.pop())


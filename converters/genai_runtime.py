"""onnxruntime-genai exports at run time: what an export directory holds (its graph, genai config,
export record, ``.onnx_adapter`` files), `GenaiModel` (`og.Model` with named adapters) and
`genai_generate`. It imports neither torch nor transformers, so `generate` stays torch-free; the
export side is `psoft_deploy.converters.genai`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from psoft_deploy.core.errors import UserError
from psoft_deploy.core.progress import verbose

GENAI_CONFIG = "genai_config.json"

GRAPH = "model.onnx"

EXPORT_RECORD = "psoft_onnx_export.json"

FLOAT_TYPES = (np.float32, np.float16)  # what an export's LoRA inputs and logits may be



def float_type(elem_type: int) -> np.dtype | None:
    """The numpy type of an ONNX element type, if it is one of `FLOAT_TYPES` (else None)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    dtype = np.dtype(tensor_dtype_to_np_dtype(elem_type))
    return dtype if dtype in FLOAT_TYPES else None


def is_genai_export(directory: Path) -> bool:
    return (Path(directory) / GENAI_CONFIG).is_file()


def logits_type(export_dir: Path) -> np.dtype:
    """The float type of an export's logits (the graph's float type)."""
    import onnx

    model = onnx.load(str(Path(export_dir) / GRAPH), load_external_data=False)
    output = next(output for output in model.graph.output if output.name == "logits")
    elem_type = output.type.tensor_type.elem_type
    if float_type(elem_type) is None:
        raise UserError(f"{export_dir}: logits of ONNX type {elem_type}; psoft-deploy verifies float32 and float16 "
                        "exports")
    return float_type(elem_type)



def rank_zero(name: str, array: np.ndarray) -> np.ndarray:
    """The rank-0 value of the LoRA input ``name`` (``in×r`` → ``in×0``, ``r×out`` → ``0×out``)."""
    return np.zeros((array.shape[0], 0) if ".lora_A." in name else (0, array.shape[1]), array.dtype)



def provider_available(provider: str) -> bool:
    """Whether onnxruntime-genai can run an export built for ``provider`` on this machine."""
    import onnxruntime_genai as og

    return provider == "cpu" or getattr(og, f"is_{provider}_available", lambda: False)()



def export_record(export_dir: Path) -> dict:
    """What export-onnx recorded about a builder export (precision, provider, adapters)."""
    file = Path(export_dir) / EXPORT_RECORD
    return json.loads(file.read_text()) if file.is_file() else {}



def write_adapter_file(arrays: dict[str, np.ndarray], file: Path) -> None:
    """``arrays`` as an onnxruntime ``.onnx_adapter`` file (what `og.Adapters` loads)."""
    import onnxruntime

    values = {name: onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
              for name, array in arrays.items()}
    adapter = onnxruntime.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(values)  # `values` stays referenced until the export below
    adapter.export_adapter(str(file))



def graph_lora_arrays(export_dir: Path) -> dict[str, np.ndarray]:
    """The LoRA inputs' default values (the merged adapter's factors, or rank-0 arrays)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(Path(export_dir) / GRAPH), load_external_data=False)
    names = {graph_input.name for graph_input in model.graph.input if ".lora_" in graph_input.name}
    arrays = {}
    for init in model.graph.initializer:
        if init.name in names:
            onnx.external_data_helper.load_external_data_for_tensor(init, str(export_dir))
            arrays[init.name] = numpy_helper.to_array(init)
    return arrays



class GenaiModel:
    """An onnxruntime-genai export loaded once (`og.Model`), with named `.onnx_adapter` files."""

    def __init__(self, export_dir: str | Path, adapter_files: dict[str, Path] | None = None):
        import onnxruntime_genai as og

        export_dir = Path(export_dir)
        if not is_genai_export(export_dir):
            raise UserError(f"{export_dir} holds no {GENAI_CONFIG} (an export-onnx output built by onnxruntime-genai)")
        self.og, self.directory = og, export_dir
        if not verbose():
            og.set_log_options(enabled=False)
        try:
            self.model = og.Model(str(export_dir))
        except RuntimeError as error:
            raise UserError(f"onnxruntime-genai cannot load {export_dir} here: {error}") from None
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model) if adapter_files else None
        for name, file in (adapter_files or {}).items():
            if not Path(file).is_file():
                raise UserError(f"adapter file {file} does not exist")
            self.adapters.load(str(file), name)

    def generator(self, tokens: list[int], adapter: str | None = None, **search):
        """A generator with ``tokens`` appended, ``adapter`` active (None: the graph's defaults)."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(tokens) + search.pop("max_new_tokens", 1), **search)
        generator = self.og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        return generator

    def greedy(self, tokens: list[int], adapter: str | None = None, count: int = 16) -> list[int]:
        """Up to ``count`` greedy tokens after ``tokens`` (the EOS that ends them included)."""
        return list(self.tokens(self.generator(tokens, adapter, max_new_tokens=count, do_sample=False,
                                               repetition_penalty=1.0)))

    def tokens(self, generator):
        """The tokens ``generator`` produces until it is done; onnxruntime's failure as one line."""
        while not generator.is_done():
            try:
                generator.generate_next_token()
            except RuntimeError as error:
                raise UserError(f"onnxruntime-genai fails to generate with {self.directory}: "
                                f"{str(error).strip().splitlines()[0]}") from None
            yield int(generator.get_next_tokens()[0])

    def logits(self, tokens: list[int], adapter: str | None = None) -> np.ndarray:
        """Logits at every position of ``tokens`` (one prefill), float64."""
        return np.asarray(self.generator(tokens, adapter).get_output("logits"), dtype=np.float64)[0]



class GraphSession:
    """An export's graph in onnxruntime itself, for the logits of one prefill with chosen LoRA
    inputs: what verification runs. With the weights prepacked (onnxruntime's default) its logits
    are og's, bit for bit. ``mapped_weights`` (float graphs only) turns MLAS's prepacking off, so
    that the external data stays memory-mapped (page cache the kernel may reclaim, not the process's
    own memory: a 1.1B fp32 graph's 4.1 GiB of weights would otherwise be copied in): the same graph
    and kernels, the float32 accumulation order aside. Not for int4: there prepacking chooses
    MatMulNBits' int8-input kernel, another computation."""

    def __init__(self, export_dir: str | Path, mapped_weights: bool = False):
        import onnxruntime

        from psoft_deploy.core.generate import FLOAT_TYPES as BY_ORT_TYPE

        self.directory = Path(export_dir)
        decoder = json.loads((self.directory / GENAI_CONFIG).read_text())["model"]["decoder"]
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # LoRA inputs with defaults are intended; don't warn about each one
        if mapped_weights:
            options.add_session_config_entry("session.disable_prepacking", "1")
        self.session = onnxruntime.InferenceSession(str(self.directory / decoder["filename"]), options,
                                                    providers=["CPUExecutionProvider"])
        inputs = {meta.name: meta for meta in self.session.get_inputs()}
        past_names = [name for name in inputs if name.startswith(("past_key_values.", "past."))]
        self.empty_past = {name: np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]),
                                          BY_ORT_TYPE[inputs[name].type]) for name in past_names}
        self.positions = "position_ids" in inputs
        self.lora_inputs = {meta.name for meta in self.session.get_overridable_initializers()}

    def logits(self, tokens: list[int], lora: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Logits at every position of ``tokens`` (one prefill, an empty past), float64, with the LoRA
        inputs in ``lora`` (None or missing names: the graph's defaults). LoRA parameters the graph has
        no input for (an adapter file of another model) are refused in one line."""
        unknown = sorted(set(lora or {}) - self.lora_inputs)
        if unknown:
            raise UserError(f"the adapter's parameters do not fit {self.directory}'s graph (no input for "
                            f"{', '.join(unknown[:3])}); export the adapter for this model")
        feeds = {"input_ids": np.asarray([tokens], np.int64), "attention_mask": np.ones((1, len(tokens)), np.int64),
                 **self.empty_past, **(lora or {})}
        if self.positions:
            feeds["position_ids"] = np.arange(len(tokens), dtype=np.int64)[None]
        return np.asarray(self.session.run(["logits"], feeds)[0][0], dtype=np.float64)


def eos_token_ids(export_dir: Path) -> set[int]:
    """The token ids that end generation in an export (its ``genai_config.json``)."""
    eos = json.loads((Path(export_dir) / GENAI_CONFIG).read_text())["model"]["eos_token_id"]
    return set(eos) if isinstance(eos, list) else {eos}



def adapter_file(export_dir: Path, name: str) -> Path:
    return Path(export_dir) / "adapters" / f"{name}.onnx_adapter"



def genai_generate(export_dir: str | Path, prompt: str, *, adapter: str | None = None, chat_template: bool = True,
                   max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                   on_text: Callable[[str], None] | None = None) -> tuple[str, list[int]]:
    """Continue ``prompt`` (as a user turn through the tokenizer's chat template if it has one and
    ``chat_template``) with `og.Generator`; returns the text and the new token ids. ``on_text``
    receives the text in whole characters as it grows."""
    from psoft_deploy.core.generate import TextStream, stream_tokens

    export_dir = Path(export_dir)
    files = {adapter: adapter_file(export_dir, adapter)} if adapter else None
    model = GenaiModel(export_dir, files)
    templated = chat_template and has_chat_template(export_dir)
    text = (model.tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                                add_generation_prompt=True) if templated else prompt)
    tokens = [int(token) for token in model.tokenizer.encode(text)]
    if not tokens:
        raise UserError("the prompt encodes to no tokens")
    search = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
    if temperature > 0:
        search |= {"temperature": temperature, "top_k": top_k or 0, "random_seed": seed}
    generator = model.generator(tokens, adapter, **search)
    return stream_tokens(model.tokens(generator), {int(token) for token in model.tokenizer.eos_token_ids},
                         TextStream(_Decoder(export_dir, model.tokenizer), on_text or (lambda text: None)))



class _Decoder:
    """Decodes token ids for `TextStream`: with the export's ``tokenizer.json`` (tokenizers), where
    a token whose bytes are no character becomes U+FFFD in place (og's decode drops everything after
    it); else with og's tokenizer."""

    def __init__(self, export_dir: Path, og_tokenizer):
        file = Path(export_dir) / "tokenizer.json"
        if file.is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(file))
            self.decode_ids = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True)
        else:
            self.decode_ids = lambda tokens: og_tokenizer.decode(np.asarray(tokens, dtype=np.int32))

    def decode(self, tokens: list[int]) -> str:
        return self.decode_ids(tokens) if tokens else ""



def has_chat_template(export_dir: Path) -> bool:
    config = Path(export_dir) / "tokenizer_config.json"
    return (Path(export_dir) / "chat_template.jinja").is_file() or (
        config.is_file() and bool(json.loads(config.read_text()).get("chat_template")))


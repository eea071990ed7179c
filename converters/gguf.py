"""GGUF for llama.cpp and Ollama, written with PyPI's ``gguf`` (llama.cpp's gguf-py): a model file
(``merge --to gguf``, ``export-lora --target gguf --with-base``'s base, and the base a LoRA GGUF
is verified on) and a LoRA adapter file (``export-lora --target gguf``), after llama.cpp's
``convert_hf_to_gguf.py`` (metadata, tensor names, the rotary row permutation of Llama's q/k
projections) and ``convert_lora_to_gguf.py`` (``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, tensors ``blk.N.attn_q.weight.lora_a`` (r×in) and ``.lora_b`` (out×r), the
permutation applied to q/k's lora_b). A model's types other than F32, F16 and BF16 come from
llama.cpp's own quantizer (`quantize`), run on the F32 file written here; a LoRA's Q8_0 from
gguf-py's. An Ollama ``Modelfile`` goes beside each, its paths relative to it.
"""

from __future__ import annotations

import ctypes
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from psoft_deploy.core.architectures import ARCHITECTURES, Gguf, Shape, architecture
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.dtypes import GGUF_FILE_TYPES
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.progress import verbose

MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
BASE_FILE = "base.gguf"  # the base beside a LoRA GGUF (export-lora --target gguf --with-base)
MODELFILE = "Modelfile"
LORA_TYPES = ("F32", "F16", "BF16", "Q8_0")
FLOAT_TYPES = ("F32", "F16", "BF16")  # written here; the others by llama.cpp's quantizer


def llama_cpp(purpose: str = "verifies GGUF files", alternative: str = ", or pass --no-verify"):
    """The ``llama_cpp`` module (llama-cpp-python), its log (the quantizer's included) shown only with
    ``--verbose``; or a one-line `UserError` saying how to get it."""
    try:
        import llama_cpp
        from llama_cpp._logger import set_verbose
    except ImportError:
        raise UserError(f"psoft-deploy {purpose} with llama.cpp through llama-cpp-python, which is not installed: "
                        f"pip install llama-cpp-python==0.3.36 (it builds llama.cpp: minutes){alternative}") from None
    set_verbose(verbose())
    return llama_cpp


def load(model: Path, lora: Path | None = None, **options):
    """``model`` (a GGUF file) in llama.cpp (``llama_cpp.Llama``, quiet), with the LoRA GGUF ``lora``
    applied. Weights stay in ggml's plain CPU layout (``use_extra_bufts`` off): the AMX repacking of
    quantized weights crashed decoding (segmentation fault, any quantized file) on a virtual machine
    that reports AMX, with llama-cpp-python 0.3.36."""
    low = llama_cpp().llama_cpp
    default = low.llama_model_default_params

    def params():
        values = default()
        values.use_extra_bufts = False
        return values

    low.llama_model_default_params = params
    try:
        return llama_cpp().Llama(model_path=str(model), lora_path=str(lora) if lora else None, verbose=False,
                                 **options)
    except ValueError as error:  # llama-cpp-python's "Failed to load model from file": llama.cpp's log says why
        raise UserError(f"llama.cpp could not load {model}{f' with {lora}' if lora else ''} ({error}); "
                        "run with --verbose for llama.cpp's own log") from None
    finally:
        low.llama_model_default_params = default


def gguf_file(candidate: Path) -> Path | None:
    """The GGUF file a candidate is: itself (``*.gguf``), or the adapter or model file in it."""
    if candidate.suffix == ".gguf":
        return candidate
    return next((candidate / name for name in (ADAPTER_FILE, MODEL_FILE) if (candidate / name).is_file()), None)


@dataclass(frozen=True)
class Layout:
    """How a transformers decoder's tensors become llama.cpp's: architecture, names, q/k rows (the
    registry's `Gguf` entry of the base's architecture, and its config)."""

    spec: Gguf
    config: dict

    @classmethod
    def of(cls, config: dict) -> Layout:
        """The layout of a base's ``config``, or a one-line refusal naming what is supported."""
        model = architecture(config)
        if model.gguf is None:
            supported = [name for name, known in ARCHITECTURES.items() if known.gguf]
            raise UserError(f"GGUF export supports {', '.join(supported)}, not {model.name}; merge the adapter and "
                            "convert it with llama.cpp's convert_hf_to_gguf.py")
        layout = cls(model.gguf, config)
        if layout.rope_type not in model.gguf.rope_types:
            raise UserError(f"GGUF export writes {model.name}'s rotary embeddings {', '.join(model.gguf.rope_types)}, "
                            f"not {layout.rope_type!r}; merge the adapter and convert it with llama.cpp's "
                            "convert_hf_to_gguf.py")
        return layout

    @property
    def arch(self) -> str:
        return self.spec.arch

    @property
    def shape(self) -> Shape:
        return Shape.of(self.config)

    @property
    def rope(self) -> dict:
        """The rotary embedding's parameters (transformers 5's ``rope_parameters``, or the older
        ``rope_theta`` and ``rope_scaling``)."""
        config = self.config
        return {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {}),
                **(config.get("rope_parameters") or {})}

    @property
    def rope_type(self) -> str:
        return self.rope.get("rope_type", self.rope.get("type", "default"))

    def name(self, key: str) -> str:
        """llama.cpp's name of the transformers tensor ``key`` (e.g. ``blk.0.attn_q.weight``)."""
        import gguf

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[self.arch.upper()], self.shape.layers)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"llama.cpp's {self.arch} has no tensor for {key}; merge the adapter and convert it with "
                            "llama.cpp's convert_hf_to_gguf.py")
        return name

    def rows(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a weight, bias or lora_B of ``key``'s module) with its rows in llama.cpp's order:
        Llama's q/k rows go from transformers' half-split rotary pairs to interleaved ones."""
        module = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
        if not self.spec.permute_qk or not module.endswith(("q_proj", "k_proj")):
            return tensor
        heads = self.shape.heads if module.endswith("q_proj") else self.shape.kv_heads
        shape = tensor.shape
        return tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _writer(file: Path, layout: Layout, name: str):
    import gguf

    writer = gguf.GGUFWriter(file, layout.arch, use_temp_file=True)
    writer.add_name(name)
    return writer


def _packed(tensor: torch.Tensor, quant: str):
    """``tensor`` packed as ``quant`` and the type it got: 1-d tensors stay float32, as llama.cpp keeps
    them; a Q8_0 tensor whose rows are not whole blocks becomes F16, as convert_hf_to_gguf does it."""
    import gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    qtype = gguf.GGMLQuantizationType[quant if tensor.dim() > 1 else "F32"]
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def _add_tensor(writer, name: str, tensor: torch.Tensor, quant: str) -> None:
    """``tensor`` under ``name`` as ``quant`` (`_packed`)."""
    import gguf

    packed, qtype = _packed(tensor, quant)
    plain = qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    writer.add_tensor(name, packed, raw_shape=tensor.shape if plain else None, raw_dtype=qtype)


def rounded(tensor: torch.Tensor, quant: str) -> torch.Tensor:
    """``tensor`` as this writer stores it in ``quant``, read back (float32)."""
    import gguf

    packed, qtype = _packed(tensor, quant)
    return torch.from_numpy(gguf.quants.dequantize(packed, qtype).reshape(tensor.shape).copy())


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model(model_dir: Path, file: Path, quant: str = "F32") -> None:
    """The transformers decoder in ``model_dir`` as one GGUF model file of type ``quant`` (F32, F16
    and BF16 written here, tensor by tensor; the others by llama.cpp's quantizer from an F32 file)."""
    if quant not in FLOAT_TYPES:
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=file.parent) as scratch:
            source = Path(scratch) / "f32.gguf"
            write_model(model_dir, source, "F32")
            quantize(source, file, quant)
        return
    import gguf

    checkpoint = BaseCheckpoint(str(model_dir))
    config = checkpoint.config
    layout = Layout.of(config)
    writer = _writer(file, layout, model_dir.name)
    shape = layout.shape
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(shape.positions)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.rotary_dims)
    writer.add_rope_freq_base(float(layout.rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(GGUF_FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, model_dir, config)
    for key in checkpoint.files:
        if key == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd where output is absent
        _add_tensor(writer, layout.name(key), layout.rows(key, checkpoint.tensor(key)), quant)
    if layout.rope_type == "llama3":
        _add_tensor(writer, "rope_freqs.weight", llama3_rope_factors(layout.rope, shape.head_dim), "F32")
    _finish(writer)


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """What llama.cpp divides each rotary frequency by for Llama 3's rope scaling (its ``rope_freqs``
    tensor; transformers' ``_compute_llama3_parameters`` scales the frequencies the same way)."""
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    frequencies = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelengths = 2 * torch.pi / frequencies
    smooth = ((context / wavelengths - low) / (high - low)).clamp(0, 1)
    return 1 / ((1 - smooth) / factor + smooth)


def add_vocab(writer, model_dir: Path, config: dict) -> None:
    """The tokenizer (``tokenizer.json``, byte-level BPE) as llama.cpp's ``gpt2`` vocabulary: every
    token by id (special added tokens as control tokens), merges, special token ids, chat template;
    padded or cut to the model's vocabulary size."""
    import gguf

    file = model_dir / "tokenizer.json"
    tokenizer = json.loads(file.read_text()) if file.is_file() else {}
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer.get("decoder") or {}).get(
            "type") != "ByteLevel":
        raise UserError(f"GGUF export writes byte-level BPE tokenizers (tokenizer.json) only; {model_dir} has "
                        f"{'a ' + str(model.get('type')) + ' tokenizer' if model else 'no tokenizer.json'}")
    ids = dict(model["vocab"]) | {token["content"]: token["id"] for token in tokenizer.get("added_tokens", [])}
    special = {token["id"] for token in tokenizer.get("added_tokens", []) if token.get("special")}
    added = {token["id"] for token in tokenizer.get("added_tokens", [])}
    by_id = {index: text for text, index in ids.items()}
    size = config["vocab_size"]
    tokens, types = [], []
    for index in range(size):
        tokens.append(by_id.get(index, f"[PAD{index}]"))
        types.append(gguf.TokenType.UNUSED if index not in by_id else gguf.TokenType.CONTROL if index in special
                     else gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model.get("merges", [])]
    if not merges:  # a byte-level vocabulary: llama.cpp needs the merges key and GGUF stores no empty array, so
        # one merge of two multi-character special tokens, which no merge builds from characters: it never applies
        inert = [text for index, text in sorted(by_id.items()) if index in special and len(text) > 1 and " " not in text]
        if len(inert) < 2:
            raise UserError(f"the tokenizer in {model_dir} has no BPE merges; llama.cpp's byte-level BPE needs them")
        merges = [" ".join(inert[:2])]
    writer.add_token_merges(merges)
    vocab = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=size)
    vocab.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(pre: dict) -> str:
    """llama.cpp's name of a byte-level pre-tokenizer: GPT-2's regex alone, or with digits split one
    by one first (SmolLM's); a split regex whose numbers go in runs of up to three (Llama 3's) or one
    by one (Qwen2's); llama.cpp's default otherwise. Verification compares the tokenizations."""
    parts = pre.get("pretokenizers", [pre])
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    pattern = (parts[0].get("pattern") or {}).get("Regex", "") if kinds[:1] == ["Split"] else ""
    return "llama-bpe" if r"\p{N}{1,3}" in pattern else "qwen2" if r"\p{L}+|\p{N}|" in pattern else "default"


def write_adapter(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], file: Path, config: dict, quant: str,
                  name: str) -> None:
    """PEFT-layout LoRA ``pairs`` (module → lora_A r×in, lora_B out×r, one rank, the scaling folded
    into lora_B) as llama.cpp's LoRA GGUF, alpha = rank (scale 1), in ``quant`` (`LORA_TYPES`)."""
    import gguf

    layout = Layout.of(config)
    writer = _writer(file, layout, name)
    rank = next(iter(pairs.values()))[0].shape[0]
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    writer.add_file_type(GGUF_FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for module, (lora_A, lora_B) in pairs.items():
        target = layout.name(f"{module}.weight")
        _add_tensor(writer, f"{target}.lora_a", lora_A, quant)
        _add_tensor(writer, f"{target}.lora_b", layout.rows(module, lora_B), quant)
    _finish(writer)


def check_adapter(quant: str, config: dict, modules_to_save) -> str:
    """``quant`` if llama.cpp's LoRA GGUF can hold this adapter on a base of this ``config``, else a
    one-line `UserError`: it holds lora_a/lora_b pairs only, in `LORA_TYPES`."""
    Layout.of(config)
    if modules_to_save:
        raise UserError(f"llama.cpp's LoRA GGUF holds LoRA pairs only, not replaced modules "
                        f"({', '.join(modules_to_save)}); merge the adapter instead (psoft-deploy merge --to gguf)")
    if quant not in LORA_TYPES:
        raise UserError(f"a LoRA GGUF is written as {', '.join(LORA_TYPES)}, not {quant}; quantize the base "
                        "instead, or merge with --to gguf --quant " + quant)
    return quant


def quantize(source: Path, destination: Path, quant: str) -> None:
    """``source`` (an F32 or F16 GGUF model) as ``quant`` by llama.cpp's own quantizer."""
    llama = llama_cpp(f"quantizes to {quant}", "; or write F32, F16 or BF16")
    params = llama.llama_model_quantize_default_params()
    params.ftype = GGUF_FILE_TYPES[quant]
    from llama_cpp._utils import suppress_stdout_stderr  # the quantizer writes to stderr past llama.cpp's log

    with suppress_stdout_stderr(disable=verbose()):
        failed = llama.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params))
    if failed:
        raise UserError(f"llama.cpp's quantizer could not write {quant} from {source}")


def file_quant(file: Path) -> str:
    """The type a GGUF file says it holds (``general.file_type``: F32, Q8_0, Q4_K_M, ...)."""
    import gguf

    field = gguf.GGUFReader(file).get_field(gguf.Keys.General.FILE_TYPE)
    number = int(field.contents()) if field is not None else 0
    try:
        return gguf.LlamaFileType(number).name.removeprefix("ALL_").removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {number}"


def is_adapter(file: Path) -> bool:
    """Whether a GGUF file is an adapter (``general.type = adapter``)."""
    import gguf

    field = gguf.GGUFReader(file).get_field(gguf.Keys.General.TYPE)
    return field is not None and field.contents() == gguf.GGUFType.ADAPTER


def write_modelfile(directory: Path, source: str, adapter: str | None = None) -> None:
    """Ollama's ``Modelfile``: ``FROM source`` and, for a LoRA, ``ADAPTER adapter``, each a path
    relative to the Modelfile (``ollama create NAME -f Modelfile``), so the directory works where
    it is copied; a note where ``source`` is not (yet) beside it."""
    lines = [f"# ollama create NAME -f {MODELFILE}"]
    if not (directory / source).is_file():
        lines.append(f"# FROM needs the base as a GGUF at {source}: write it with psoft-deploy export-lora --target "
                     "gguf --with-base, or copy one there")
    lines.append(f"FROM {source}")
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    (directory / MODELFILE).write_text("\n".join(lines) + "\n")

"""`psoft-deploy generate`: text from an exported ONNX graph with onnxruntime, numpy and tokenizers
alone (torch is not imported on this path)."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .dtypes import BY_ONNX
from .errors import UserError
from .progress import verbose

INCOMPLETE = "\ufffd"  # what a byte-level decoder gives for a character whose bytes have not all arrived

FLOAT_TYPES = {onnx: np.dtype(dtype.name) for onnx, dtype in BY_ONNX.items()}  # onnxruntime's type -> numpy's


def eos_token_ids(onnx_dir: Path) -> set[int]:
    for name in ("generation_config.json", "config.json"):
        file = onnx_dir / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            if value is not None:
                return set(value) if isinstance(value, list) else {value}
    return set()


def read_adapter_file(file: Path) -> dict[str, np.ndarray]:
    """The parameters of an onnxruntime ``.onnx_adapter`` file (LoRA input name → array)."""
    import onnxruntime

    if not Path(file).is_file():
        raise UserError(f"adapter file {file} does not exist")
    try:
        adapter = onnxruntime.AdapterFormat.read_adapter(str(file))
    except Exception as error:  # onnxruntime's own error types are not exported
        raise UserError(f"{file} is not a readable .onnx_adapter file ({error})") from error
    # each value's numpy() views memory the adapter object owns: copy before it is collected
    return {name: value.numpy().copy() for name, value in adapter.get_parameters().items()}


class OnnxModel:
    """An exported graph in onnxruntime with at most one ``.onnx_adapter`` active. It keeps the
    ``LoraAdapter`` referenced for its own lifetime (onnxruntime silently runs the base model once
    the adapter object is collected) and refuses an adapter whose parameters the graph lacks."""

    def __init__(self, onnx_dir: str | Path, adapter_file: str | Path | None = None):
        import onnxruntime

        if not verbose():
            onnxruntime.set_default_logger_severity(3)
        onnx_dir = Path(onnx_dir)
        if not (onnx_dir / "model.onnx").is_file():
            raise UserError(f"{onnx_dir} holds no model.onnx (an export-onnx output directory)")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # LoRA inputs with defaults are intended; don't warn about each one
        self.session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
        self.inputs = {meta.name: meta for meta in self.session.get_inputs()}
        self.lora_inputs = {meta.name for meta in self.session.get_overridable_initializers()}
        self.past_names = [name for name in self.inputs if name.startswith("past.")]
        self.present_names = [name.replace("past.", "present.", 1) for name in self.past_names]
        self.adapter, self.run_options = None, None
        if adapter_file is not None:
            adapter_file = Path(adapter_file)
            parameters = read_adapter_file(adapter_file)
            unknown = sorted(set(parameters) - self.lora_inputs)
            if not parameters or unknown:
                raise UserError(f"{adapter_file} does not fit this graph (parameters it lacks inputs for: "
                                f"{', '.join(unknown[:3]) or 'none given'}); export the adapter for this model")
            self.adapter = onnxruntime.LoraAdapter()
            self.adapter.Load(str(adapter_file))
            self.run_options = onnxruntime.RunOptions()
            self.run_options.add_active_adapter(self.adapter)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, self.inputs[name].shape[1], 0, self.inputs[name].shape[3]),
                               dtype=FLOAT_TYPES.get(self.inputs[name].type, np.float32)) for name in self.past_names}

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(output_names, feeds, self.run_options)


def generate(onnx_dir: str | Path, prompt: str, *, adapter_file: str | Path | None = None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             on_text: Callable[[str], None] | None = None) -> tuple[str, list[int]]:
    """Greedy (``temperature=0``) or sampled continuation of ``prompt``; returns text and new token ids.
    ``on_text`` receives the text as it grows, whole characters only (see `TextStream`)."""
    from tokenizers import Tokenizer

    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / "tokenizer.json").is_file():
        raise UserError(f"{onnx_dir} holds no tokenizer.json (an export-onnx output directory)")
    tokenizer = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    model = OnnxModel(onnx_dir, adapter_file)
    rng = np.random.default_rng(seed)

    sequence = tokenizer.encode(prompt).ids
    if not sequence:
        raise UserError("the prompt encodes to no tokens")

    def tokens():
        """Each next token of the continuation, the past carried over where the graph takes one."""
        past, step_ids, generated = model.empty_past(1), sequence, []
        while True:
            total = len(sequence) + len(generated)
            feeds = {"input_ids": np.array([step_ids], dtype=np.int64),
                     "attention_mask": np.ones((1, total if model.past_names else len(step_ids)), dtype=np.int64)}
            if model.past_names:
                feeds["position_ids"] = np.arange(total - len(step_ids), total, dtype=np.int64)[None, :]
                feeds |= past
            outputs = model.run(["logits", *model.present_names], feeds)
            generated.append(pick(outputs[0][0, -1].astype(np.float64), temperature, top_k, rng))
            yield generated[-1]
            if model.past_names:
                past, step_ids = dict(zip(model.past_names, outputs[1:])), generated[-1:]
            else:
                step_ids = sequence + generated

    return stream_tokens(islice(tokens(), max_new_tokens), eos_token_ids(onnx_dir),
                         TextStream(tokenizer, on_text or (lambda text: None)))


def stream_tokens(tokens: Iterable[int], stop: set[int], stream: TextStream) -> tuple[str, list[int]]:
    """The generation loop every runtime shares: ``tokens`` taken until one in ``stop`` (kept in the ids,
    not in the text), the text passed to ``stream`` as it grows; returns the text and the new token ids."""
    new_tokens: list[int] = []
    for token in tokens:
        new_tokens.append(token)
        if token in stop:
            break
        stream.update(new_tokens)
    return stream.finish([token for token in new_tokens if token not in stop]), new_tokens


class TextStream:
    """Generated text passed on as it grows without broken characters: a byte-level BPE token can
    hold part of a character's bytes, so the whole sequence is decoded each time and only complete
    text is passed on (a trailing U+FFFD is held back until the rest of its bytes arrive)."""

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer, self.emit, self.sent = tokenizer, emit, ""

    def update(self, tokens: list[int]) -> None:
        self._send(self.tokenizer.decode(tokens).rstrip(INCOMPLETE))

    def finish(self, tokens: list[int]) -> str:
        """The whole text, less a character left incomplete when generation stopped."""
        text = self.tokenizer.decode(tokens).rstrip(INCOMPLETE)
        self._send(text)
        return text

    def _send(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.emit(text[len(self.sent):])
            self.sent = text


def pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """argmax, or a sample from softmax(logits / temperature) over the top_k tokens (all if 0)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits / temperature
    if 0 < top_k < scaled.size:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probabilities = np.exp(scaled - scaled.max())
    probabilities /= probabilities.sum()
    return int(rng.choice(scaled.size, p=probabilities))

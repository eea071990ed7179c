"""`psoft-deploy generate`: text from an exported ONNX graph with onnxruntime, numpy and tokenizers
alone (torch is not imported on this path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError

FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def eos_token_ids(onnx_dir: Path) -> set[int]:
    for name in ("generation_config.json", "config.json"):
        file = onnx_dir / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            if value is not None:
                return set(value) if isinstance(value, list) else {value}
    return set()


def generate(onnx_dir: str | Path, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0) -> tuple[str, list[int]]:
    """Greedy (``temperature=0``) or sampled continuation of ``prompt``; returns text and new token ids."""
    import onnxruntime
    from tokenizers import Tokenizer

    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / "model.onnx").is_file() or not (onnx_dir / "tokenizer.json").is_file():
        raise UserError(f"{onnx_dir} needs model.onnx and tokenizer.json (an export-onnx output directory)")
    tokenizer = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {meta.name: meta for meta in session.get_inputs()}
    past_names = [name for name in inputs if name.startswith("past.")]
    present_names = [name.replace("past.", "present.", 1) for name in past_names]
    rng = np.random.default_rng(seed)
    stop = eos_token_ids(onnx_dir)

    sequence = tokenizer.encode(prompt).ids
    if not sequence:
        raise UserError("the prompt encodes to no tokens")
    new_tokens: list[int] = []
    past = {name: np.zeros((1, inputs[name].shape[1], 0, inputs[name].shape[3]),
                           dtype=FLOAT_TYPES.get(inputs[name].type, np.float32)) for name in past_names}
    step_ids = sequence
    for _ in range(max_new_tokens):
        total = len(sequence) + len(new_tokens)
        feeds = {"input_ids": np.array([step_ids], dtype=np.int64),
                 "attention_mask": np.ones((1, total if past_names else len(step_ids)), dtype=np.int64)}
        if past_names:
            feeds["position_ids"] = np.arange(total - len(step_ids), total, dtype=np.int64)[None, :]
            feeds |= past
        outputs = session.run(["logits", *present_names], feeds)
        token = pick(outputs[0][0, -1].astype(np.float64), temperature, top_k, rng)
        new_tokens.append(token)
        if token in stop:
            break
        if past_names:
            past = dict(zip(past_names, outputs[1:]))
            step_ids = [token]
        else:
            step_ids = sequence + new_tokens
    return tokenizer.decode(new_tokens), new_tokens


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

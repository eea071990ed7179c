"""What verification runs the models on: prompts (given, or the defaults: chat conversations
where the tokenizer has a template, else plain text), their tokens, fixed images for image
classifiers, and the outputs each family compares."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jinja2.exceptions import TemplateError

from psoft_deploy.core.architectures import Family, model_family
from psoft_deploy.core.errors import UserError

# Plain-text verification prompts, for tokenizers without a chat template.
DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning the river carried water from the hills",
    "def fibonacci(n):\n    return n if n < 2 else",
    "Question: what is the capital of France? Answer:",
]

# Conversations rendered with the tokenizer's chat template where it has one: the template's
# own tokens (turn markers, role names) are decisions a chat model makes with confidence.
DEFAULT_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And the capital of Italy?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "user", "content": "Complete the code: def fibonacci(n):\n    return n if n < 2 else"}],
    [{"role": "user", "content": "Name three colours."},
     {"role": "assistant", "content": "Red, green and blue."},
     {"role": "user", "content": "Which one is the colour of the sky?"}],
]


def read_prompts(file: Path) -> list[str | list[dict]]:
    """Verification prompts from ``file``: JSON lines (``{"text": ...}`` or ``{"messages": [...]}``,
    a chat rendered with the tokenizer's template) or one plain prompt per line."""
    lines = [line for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"--prompts {file} holds no prompt")
    if not all(line.lstrip().startswith("{") for line in lines):
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"--prompts {file}: line {number} is not valid JSON") from None
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            prompts.append(record["messages"])
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            prompts.append(record["text"])
        else:
            raise UserError(f'--prompts {file}: line {number} has neither a "text" string nor a "messages" list')
    return prompts


def verification_inputs(model_dirs: list[Path], prompts, config: dict) -> tuple[dict, str]:
    """The model inputs verification runs on (``config``: the base's) and what they are:
    deterministic images for image classifiers; else tokenized prompts (tokenizer of the first
    directory that has one): the given ones, else chat conversations where the tokenizer has a
    chat template, else plain text; without a tokenizer, fixed token ids. Seq2seq models get the
    prompts shifted right as decoder inputs."""
    family = model_family(config)
    generator = torch.Generator().manual_seed(0)
    if family.name == "image-classifier":
        if prompts:
            raise UserError("--prompts does not apply to an image classifier (it is verified on fixed images)")
        size = config.get("image_size", 224)
        images = torch.randn(4, config.get("num_channels", 3), size, size, generator=generator)
        return {"pixel_values": images}, "4 fixed random images"
    inputs, source = _text_inputs(model_dirs, prompts, config.get("vocab_size", 2), generator)
    if family.name == "seq2seq":
        start = torch.full_like(inputs["input_ids"][:, :1], config.get("decoder_start_token_id") or 0)
        inputs["decoder_input_ids"] = torch.cat([start, inputs["input_ids"][:, :-1]], dim=1)
        inputs["decoder_attention_mask"] = torch.cat([torch.ones_like(start), inputs["attention_mask"][:, :-1]], 1)
    return inputs, source


def _text_inputs(model_dirs: list[Path], prompts, vocab_size: int, generator) -> tuple[dict, str]:
    directory = next((d for d in model_dirs if (d / "tokenizer.json").is_file()
                      or (d / "tokenizer_config.json").is_file()), None)
    if directory is None:
        if prompts:
            raise UserError("--prompts needs a tokenizer in the base or candidate directory")
        ids = torch.randint(0, vocab_size, (4, 16), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "fixed token ids (no tokenizer)"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if prompts:
        encoded, source = [_encode(tokenizer, prompt) for prompt in prompts], f"{len(prompts)} given prompts"
    else:
        encoded, refused = [], 0
        if tokenizer.chat_template:
            for conversation in DEFAULT_CONVERSATIONS:
                try:
                    encoded.append(_encode(tokenizer, conversation))
                except TemplateError:  # a template that refuses a role or a turn order: use the others
                    refused += 1
        source = f"{len(encoded)} chat conversations (the tokenizer's template" + (
            f"; it refused {refused})" if refused else ")")
        if not encoded:
            encoded = [_encode(tokenizer, text) for text in DEFAULT_PROMPTS]
            source = "plain-text prompts" + (" (the chat template refused every default conversation)" if refused
                                             else "")
    batch = tokenizer.pad([{"input_ids": ids} for ids in encoded], padding=True, return_tensors="pt")
    return dict(batch), source


def _encode(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a plain prompt, or of a chat rendered with the tokenizer's template (a
    generation prompt added when the last turn is not the assistant's)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if not tokenizer.chat_template:
        raise UserError("a prompt is given as chat messages, but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(prompt, tokenize=False,
                                         add_generation_prompt=prompt[-1].get("role") != "assistant")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def real_positions(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Outputs as (positions, classes or features) in float64, padding dropped."""
    if logits.dim() == 3 and mask is not None:
        logits = logits[mask.bool()]
    return logits.double().reshape(-1, logits.shape[-1])


def family_outputs(outputs, family: Family, inputs: dict) -> torch.Tensor:
    """The outputs ``family`` compares, as one (positions, classes or features) float64 tensor."""
    mask = inputs.get(family.mask) if family.mask else None
    parts = [real_positions(outputs[name], mask) for name in family.outputs if outputs.get(name) is not None]
    return torch.cat(parts)


def right_padded(sequences: list[list[int]]) -> dict:
    length = max(len(tokens) for tokens in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(sequences):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def prompt_sequences(inputs: dict) -> list[list[int]]:
    """Each prompt's token ids, padding dropped."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]

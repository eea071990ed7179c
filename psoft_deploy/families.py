"""What kind of model a base is, decided in one place from its ``config.json``: the family
verification compares it by (causal LM, seq2seq, classifier, image classifier, encoder), the
transformers class that loads it, whether vLLM can generate with it, and whether
onnxruntime-genai's model builder converts it."""

from __future__ import annotations

from dataclasses import dataclass

# Architectures whose models generate text (what `serve` can serve).
GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Text decoders onnxruntime-genai's builder converts (onnxruntime_genai/models/builder.py, create_model).
GENAI_BUILDER_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
    "OlmoForCausalLM", "NemotronForCausalLM", "SmolLM3ForCausalLM",
})


@dataclass(frozen=True)
class Family:
    """How a kind of model is run and compared: the outputs compared (``logits`` are
    distributions: KL and top-1 apply; hidden states are compared by |Δ| alone) and which mask
    marks their real positions."""

    name: str
    outputs: tuple[str, ...] = ("logits",)
    mask: str | None = "attention_mask"

    @property
    def distribution(self) -> bool:
        return self.outputs == ("logits",)


FAMILIES = {
    "causal-lm": Family("causal-lm"),
    "seq2seq": Family("seq2seq", mask="decoder_attention_mask"),
    "classifier": Family("classifier"),
    "image-classifier": Family("image-classifier", mask=None),
    "encoder": Family("encoder", outputs=("last_hidden_state", "pooler_output")),
}


def architectures(config: dict) -> list[str]:
    """The architectures ``config.json`` names (none: an empty list)."""
    return config.get("architectures") or []


def model_family(config: dict) -> Family:
    """The family of a transformers model: causal LM, seq2seq (T5, BART), sequence/token
    classifier, image classifier (ViT) or encoder (feature extraction)."""
    architecture = (architectures(config) or [""])[0]
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return FAMILIES["causal-lm"]
    if config.get("is_encoder_decoder"):
        return FAMILIES["seq2seq"]
    if architecture.endswith("ForImageClassification"):
        return FAMILIES["image-classifier"]
    if architecture.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return FAMILIES["classifier"]
    return FAMILIES["encoder"]


def generates_text(config: dict) -> bool:
    """Whether the model generates text (vLLM can serve it)."""
    return any(architecture.endswith(GENERATIVE_SUFFIXES) for architecture in architectures(config))


def genai_builder_converts(config: dict) -> bool:
    """Whether onnxruntime-genai's model builder has a converter for the architecture."""
    return bool(set(architectures(config)) & GENAI_BUILDER_ARCHITECTURES)


def model_class(config):
    """The transformers class a (transformers) config's ``architectures`` names (a causal LM if it names none)."""
    import transformers

    named = getattr(config, "architectures", None) or []
    return (getattr(transformers, named[0], None) if named else None) or transformers.AutoModelForCausalLM

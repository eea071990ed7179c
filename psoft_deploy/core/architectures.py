"""The one registry of model architectures, read from a base's ``config.json``: what a model is
(the `Family` verification compares it by: causal LM, seq2seq, classifier, image classifier,
encoder), the transformers class that loads it, its config's `Shape`, and what each runtime takes
of it: vLLM's packed LoRA layers, llama.cpp's GGUF layout, onnxruntime-genai's model builder.

Every command asks `architecture(config)`. A family is added here, in one `ARCHITECTURES` entry (as
PEFT's per-architecture mappings and mergekit's architecture definitions do it); an architecture
not listed is known by its class name's suffix alone and no runtime-specific path applies to it."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


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

    @property
    def generates_text(self) -> bool:
        return self.name in ("causal-lm", "seq2seq")


FAMILIES = {
    "causal-lm": Family("causal-lm"),
    "seq2seq": Family("seq2seq", mask="decoder_attention_mask"),
    "classifier": Family("classifier"),
    "image-classifier": Family("image-classifier", mask=None),
    "encoder": Family("encoder", outputs=("last_hidden_state", "pooler_output")),
}


@dataclass(frozen=True)
class Shape:
    """A config's sizes, under any of the names transformers models give them (``None`` where it
    states none); a multimodal model's are its ``text_config``'s."""

    layers: int | None
    hidden: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    intermediate: int | None
    vocab: int | None
    positions: int | None
    rotary_dims: int | None  # the head's dimensions the rotary embedding turns (``partial_rotary_factor``)

    @classmethod
    def of(cls, config: dict) -> Shape:
        config = config.get("text_config") or config

        def first(*keys):
            return next((config[key] for key in keys if isinstance(config.get(key), int)), None)

        heads, hidden = first("num_attention_heads", "n_head"), first("hidden_size", "n_embd", "d_model")
        head_dim = first("head_dim") or (hidden // heads if hidden and heads else None)
        return cls(layers=first("num_hidden_layers", "n_layer", "num_layers"), hidden=hidden, heads=heads,
                   kv_heads=first("num_key_value_heads") or heads, head_dim=head_dim,
                   intermediate=first("intermediate_size", "n_inner", "ffn_dim"), vocab=first("vocab_size"),
                   positions=first("max_position_embeddings", "n_positions", "max_seq_len"),
                   rotary_dims=int(head_dim * (config.get("partial_rotary_factor") or 1.0)) if head_dim else None)


@dataclass(frozen=True)
class Gguf:
    """How llama.cpp runs an architecture: its architecture name, whether its graph wants q/k rows in
    its interleaved rotary order (Llama's; transformers keeps half-split pairs), and the rotary
    embeddings the writer reproduces."""

    arch: str
    permute_qk: bool = False
    rope_types: tuple[str, ...] = ("default",)


# Llama's linear layers as vLLM builds them: q/k/v and gate/up fused.
LLAMA_LAYERS = MappingProxyType({"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "o_proj": "o_proj",
                                 "down_proj": "down_proj"})
# Phi-3 fuses q/k/v and gate/up in the checkpoint itself: vLLM's layers are the checkpoint's.
FUSED_LAYERS = MappingProxyType({name: name for name in ("qkv_proj", "gate_up_proj", "o_proj", "down_proj")})


@dataclass(frozen=True)
class Architecture:
    """One transformers architecture (``LlamaForCausalLM``): its family, vLLM's layer for each
    adaptable module (None: vLLM's names for it are not known here, so serve names none), llama.cpp's
    layout (None: no GGUF), whether onnxruntime-genai's builder converts it, and whether q/k/v and
    gate/up are fused in its checkpoint."""

    name: str
    family: Family
    vllm_layers: MappingProxyType | None = None
    gguf: Gguf | None = None
    genai_builder: bool = False
    fused: bool = False

    def vllm_target_modules(self, module_names) -> list[str] | None:
        """vLLM's layers these modules live in (``--lora-target-modules``), or None where one is not
        known: vLLM then runs its LoRA kernels on every linear layer (right, and slower on CPU)."""
        leaves = {name.rsplit(".", 1)[-1] for name in module_names}
        if not leaves or self.vllm_layers is None or not leaves <= self.vllm_layers.keys():
            return None
        return sorted({self.vllm_layers[leaf] for leaf in leaves})

    def linear_widths(self, shape: Shape) -> dict[str, int]:
        """The output widths of the decoder's linear layers other than the head, by what sets them."""
        head_dim, heads, kv_heads = shape.head_dim or 0, shape.heads or 1, shape.kv_heads or 1
        widths = {"hidden_size": shape.hidden or 0, "intermediate_size": shape.intermediate or 0,
                  "num_attention_heads × head_dim": heads * head_dim,
                  "num_key_value_heads × head_dim": kv_heads * head_dim}
        if self.fused:
            widths |= {"(num_attention_heads + 2 × num_key_value_heads) × head_dim": (heads + 2 * kv_heads) * head_dim,
                       "2 × intermediate_size": 2 * (shape.intermediate or 0)}
        return widths


def _decoder(name: str, gguf: Gguf | None = None, layers=LLAMA_LAYERS, **kind) -> Architecture:
    return Architecture(name, FAMILIES["causal-lm"], layers, gguf, genai_builder=True, **kind)


ARCHITECTURES = {architecture.name: architecture for architecture in (
    _decoder("LlamaForCausalLM", Gguf("llama", permute_qk=True, rope_types=("default", "llama3"))),
    _decoder("MistralForCausalLM", Gguf("llama", permute_qk=True)),  # Mistral is Llama to llama.cpp
    _decoder("Qwen2ForCausalLM", Gguf("qwen2")),
    _decoder("Phi3ForCausalLM", Gguf("phi3"), FUSED_LAYERS, fused=True),
    *(_decoder(name) for name in ("Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                                  "GraniteForCausalLM", "OlmoForCausalLM", "SmolLM3ForCausalLM")),
    *(_decoder(name, layers=None) for name in ("PhiForCausalLM", "NemotronForCausalLM")),
)}


def architecture(config: dict) -> Architecture:
    """The registry's entry for the first architecture ``config.json`` names (the one transformers
    loads), else one known by its name alone: ``...ForCausalLM`` and ``...LMHeadModel`` are causal LMs,
    then a model with ``is_encoder_decoder`` is seq2seq, another ``...ForConditionalGeneration`` a
    (multimodal) causal LM, then image and sequence/token classifiers; anything else is an encoder."""
    name = (config.get("architectures") or [""])[0]
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if name.endswith(("ForCausalLM", "LMHeadModel")):  # a decoder alone, whatever its config's is_encoder_decoder
        family = "causal-lm"
    elif config.get("is_encoder_decoder"):
        family = "seq2seq"
    elif name.endswith("ForConditionalGeneration"):  # multimodal: a causal LM over its text_config
        family = "causal-lm"
    elif name.endswith("ForImageClassification"):
        family = "image-classifier"
    elif name.endswith(("ForSequenceClassification", "ForTokenClassification")):
        family = "classifier"
    else:
        family = "encoder"
    return Architecture(name or "a model without architectures in config.json", FAMILIES[family])


def model_family(config: dict) -> Family:
    """The family of a model's ``config.json`` (`architecture`)."""
    return architecture(config).family


def model_class(config):
    """The transformers class a (transformers) config's ``architectures`` names (a causal LM if it names none)."""
    import transformers

    named = getattr(config, "architectures", None) or []
    return (getattr(transformers, named[0], None) if named else None) or transformers.AutoModelForCausalLM

"""The architecture registry (`psoft_deploy.core.architectures`): one entry says what a model is and what
each runtime takes of it."""

from pathlib import Path

import pytest

from psoft_deploy.core.architectures import ARCHITECTURES, Shape, architecture, model_family


def test_the_family_is_read_from_the_config():
    assert model_family({"architectures": ["ViTForImageClassification"]}).name == "image-classifier"
    assert model_family({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}).name == "seq2seq"
    assert model_family({"architectures": ["DebertaV2Model"]}).name == "encoder"
    assert model_family({"architectures": ["GPTJForCausalLM"]}).name == "causal-lm"
    # BART's decoder alone keeps BART's is_encoder_decoder in its config
    assert model_family({"architectures": ["BartForCausalLM"], "is_encoder_decoder": True}).name == "causal-lm"
    assert model_family({"architectures": ["RobertaForSequenceClassification"]}).name == "classifier"
    # a multimodal model generates text as a causal LM, and serve and verify agree on it
    multimodal = architecture({"architectures": ["Gemma3ForConditionalGeneration"]})
    assert multimodal.family.name == "causal-lm" and multimodal.family.generates_text
    assert not model_family({"architectures": ["BertModel"]}).generates_text


def test_every_entry_names_what_the_other_libraries_know():
    """Each claim of an entry, checked against the library it is about."""
    import importlib.util

    import gguf
    import transformers

    builder = Path(importlib.util.find_spec("onnxruntime_genai.models.builder").origin).read_text()
    for name, entry in ARCHITECTURES.items():
        assert hasattr(transformers, name), f"transformers has no {name}"
        assert not entry.genai_builder or f'"{name}"' in builder, f"onnxruntime-genai's builder does not convert {name}"
        assert entry.gguf is None or entry.gguf.arch in gguf.MODEL_ARCH_NAMES.values(), f"llama.cpp has no {name}"
        assert entry.gguf is None or entry.vllm_layers is not None  # a GGUF export is also served


@pytest.mark.parametrize("name, modules, expected", [
    ("LlamaForCausalLM", ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"],
     ["gate_up_proj", "qkv_proj"]),
    ("Phi3ForCausalLM", ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.down_proj"],
     ["down_proj", "qkv_proj"]),
    ("Phi3ForCausalLM", ["model.layers.0.self_attn.q_proj"], None),  # not a layer of Phi-3's
    ("PhiForCausalLM", ["model.layers.0.self_attn.q_proj"], None),  # vLLM's names for it not known here
    ("GPTJForCausalLM", ["transformer.h.0.attn.q_proj"], None),
])
def test_vllms_layers_come_from_the_entry(name, modules, expected):
    assert architecture({"architectures": [name]}).vllm_target_modules(modules) == expected


def test_the_shape_is_read_under_any_name():
    gpt2 = Shape.of({"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 99, "n_positions": 128})
    assert (gpt2.layers, gpt2.heads, gpt2.kv_heads, gpt2.head_dim, gpt2.vocab, gpt2.positions) == (2, 4, 4, 16, 99, 128)
    multimodal = Shape.of({"text_config": {"num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
                                           "hidden_size": 256, "head_dim": 64, "partial_rotary_factor": 0.5}})
    assert (multimodal.layers, multimodal.kv_heads, multimodal.head_dim, multimodal.rotary_dims) == (3, 2, 64, 32)
    assert Shape.of({}).head_dim is None


def test_phi3s_fused_layers_are_widths_the_genai_builder_could_mistake_for_the_head():
    from psoft_deploy.converters.genai import builder_refusal

    config = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 192}
    assert "2 × intermediate_size" in builder_refusal(config)
    assert builder_refusal({**config, "architectures": ["LlamaForCausalLM"]}) is None

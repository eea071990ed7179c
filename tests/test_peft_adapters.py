"""Reading PEFT PSOFT adapters: factors and forward pinned to PEFT's own, for every config variant."""

import json

import pytest
import torch
from helpers import VARIANTS, assert_close_relative, input_ids, load_peft, make_peft_adapter, peft_deltas

from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import load_base_model, reference_model
from psoft_deploy.core.options import ReadOptions


def check_against_peft(base_dir, adapter_dir, peft_model, ids, **load_options):
    """Our factors equal PEFT's get_delta_weight; our forward equals PEFT's, live and after reloading."""
    factors = load_factors(str(adapter_dir), str(base_dir), **load_options)
    expected = peft_deltas(peft_model)
    assert set(factors.modules) == set(expected)
    for name, delta in expected.items():
        assert_close_relative(factors.modules[name].delta_weight(), delta.detach())
    with torch.no_grad():
        ours = reference_model(base_dir, factors)(ids).logits
        live = peft_model(ids).logits
        reloaded = load_peft(base_dir, adapter_dir)(ids).logits
        base = load_base_model(base_dir)(ids).logits
    assert (live - base).abs().max() > 1e-3, "the adapter must change the output for this test to mean anything"
    assert_close_relative(ours, live)
    assert_close_relative(ours, reloaded)
    return factors


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_config_variant_matches_peft(variant, tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    peft_model = make_peft_adapter(base_dir, tmp_path / "adapter", **VARIANTS[variant])
    check_against_peft(base_dir, tmp_path / "adapter", peft_model, input_ids())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "opt"])
def test_architectures_match_peft(kind, tiny_base, tmp_path):
    base_dir = tiny_base(kind)
    peft_model = make_peft_adapter(base_dir, tmp_path / "adapter", kind=kind, r=8, psoft_alpha=16)
    check_against_peft(base_dir, tmp_path / "adapter", peft_model, input_ids())


def test_bert_classifier_with_modules_to_save(tiny_base, tmp_path):
    base_dir = tiny_base("bert")
    peft_model = make_peft_adapter(base_dir, tmp_path / "adapter", kind="bert", modules_to_save=["classifier"])
    with torch.no_grad():
        classifier = peft_model.base_model.model.classifier.modules_to_save["default"]
        classifier.weight.add_(torch.randn(classifier.weight.shape, generator=torch.Generator().manual_seed(0)))
    peft_model.save_pretrained(tmp_path / "adapter")
    factors = check_against_peft(base_dir, tmp_path / "adapter", peft_model, input_ids())
    assert set(factors.replaced_tensors) == {"classifier.weight", "classifier.bias"}


def test_svd_dtype_reproduces_an_adapter_trained_on_a_bf16_loaded_base(tiny_base, tmp_path):
    """PEFT takes the SVD of the base as loaded: bf16-loaded training needs --svd-dtype bfloat16."""
    from peft import PeftModel

    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", r=8)
    bf16_model = PeftModel.from_pretrained(load_base_model(base_dir, torch.bfloat16), tmp_path / "adapter")
    as_stored = load_factors(str(tmp_path / "adapter"), str(base_dir))
    as_trained = load_factors(str(tmp_path / "adapter"), str(base_dir), ReadOptions(svd_dtype="bfloat16"))
    assert as_trained.svd["dtype"] == "bfloat16"
    for name, module in bf16_model.named_modules():
        if not hasattr(module, "_psoft_A_cache") or "default" not in module._psoft_A_cache:
            continue
        name = name.removeprefix("base_model.model.")
        peft_A, peft_B = module._psoft_A_cache["default"], module._psoft_B_cache["default"]  # fp32 in PEFT
        assert_close_relative(as_trained.modules[name].A, peft_A)
        assert_close_relative(as_trained.modules[name].B, peft_B)
        assert not torch.allclose(as_stored.modules[name].B @ as_stored.modules[name].A, peft_B @ peft_A, atol=1e-4)


def test_peft_019_lowrank_adapter_is_refused_unless_forced(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", psoft_svd="lowrank")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.pop("random_seed")
    config["peft_version"] = "0.19.0"
    config_file.write_text(json.dumps(config))
    with pytest.raises(UserError, match="unseeded"):
        load_factors(str(tmp_path / "adapter"), str(base_dir))
    forced = load_factors(str(tmp_path / "adapter"), str(base_dir), ReadOptions(force_unseeded=True))
    assert forced.adapter.subspace_spec.seed is None
    assert forced.adapter.source["peft_version"] == "0.19.0"

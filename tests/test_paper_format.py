"""The paper repository's checkpoints: fixtures built from the spec, checked against an independent forward.

The paper trains a LoRA with a ``pissa_orth`` init on a *residual* base ``W − s·B A`` and inserts
``lora_orth`` (R) between A and B: ``y = W_res x + s · B R A x``. psoft-deploy applies the same
adapter to the *original* base as ``ΔW = s · B (R − I) A``; both must give the same model.
"""

import pytest
import torch
from helpers import assert_close_relative, input_ids, make_paper_checkpoint, paper_rotation_from_spec, write_adapter

from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import load_base_model, reference_model
from psoft_deploy.core.options import ReadOptions


def paper_forward(residual_dir, parts, scale, r, terms, ids):
    """``y = W_res x + s · B R A x`` on the residual base, R built from the spec (float64)."""
    model = load_base_model(residual_dir).double()
    for module_name, p in parts.items():
        if p["a_params"].dim() == 1:
            R = paper_rotation_from_spec(p["a_params"].double(), r, terms)
        else:
            R = p["a_params"].double()
        if "mag_vector_b" in p:
            R = torch.diag(p["mag_vector_b"].double()) @ R @ torch.diag(p["mag_vector_a"].double())
        A, B = p["lora_A"].double(), p["lora_B"].double()

        def hook(module, inputs, output, A=A, B=B, R=R):
            return output + scale * (inputs[0] @ A.T @ R.T @ B.T)

        model.get_submodule(module_name).register_forward_hook(hook)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "terms,orth,magnitudes",
    [(5, True, True), (None, True, True), (0, True, True), (2, True, False), (5, False, True)],
)
def test_paper_checkpoint_equals_its_reference_forward(terms, orth, magnitudes, tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    r = 4
    scale, parts = make_paper_checkpoint(
        base_dir, tmp_path / "paper", tmp_path / "residual", r=r, alpha=8, orth=orth, magnitudes=magnitudes
    )
    factors = load_factors(str(tmp_path / "paper"), str(base_dir), ReadOptions(paper_neumann_terms=terms))
    assert factors.adapter.format == "paper" and factors.svd is None
    ids = input_ids()
    expected = paper_forward(tmp_path / "residual", parts, scale, r, terms, ids)
    with torch.no_grad():
        ours = reference_model(base_dir, factors)(ids).logits
        base = load_base_model(base_dir)(ids).logits
    assert (expected.float() - base).abs().max() > 1e-3
    assert_close_relative(ours.double(), expected)


def test_paper_checkpoint_needs_no_base_and_detects_other_bases(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_paper_checkpoint(base_dir, tmp_path / "paper", tmp_path / "residual")
    without_base = load_factors(str(tmp_path / "paper"), None)
    assert set(without_base.modules) and not without_base.fingerprints
    with pytest.raises(UserError, match="another base"):
        load_factors(str(tmp_path / "paper"), str(tiny_base("llama", hidden=32)))


def test_stock_lora_adapter_is_not_taken_for_psoft(tiny_base, tmp_path):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    write_adapter(tmp_path / "lora", config, {f"{prefix}.lora_A.weight": torch.zeros(2, 64),
                                              f"{prefix}.lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(UserError, match="plain LoRA"):
        load_factors(str(tmp_path / "lora"), str(tiny_base("llama")))

"""The one PSOFT math module, pinned to PEFT's own `OrthLayer` and PSOFT layer, and to the paper's spec."""

import pytest
import torch
from helpers import paper_rotation_from_spec
from peft.tuners.psoft.layer import OrthLayer

from psoft_deploy.core.psoft import (
    ModuleFactors,
    RotationSpec,
    SubspaceSpec,
    principal_subspace,
    rotation,
    rotation_part,
)


def peft_orth_layer(r, seed=0, **options):
    layer = OrthLayer(r, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.orth:
            layer.weight.copy_(0.2 * torch.randn(layer.weight.shape, generator=generator))
        else:
            layer.weight.copy_(torch.eye(r) + 0.1 * torch.randn(r, r, generator=generator))
        for vector in (layer.vector_a, layer.vector_b):
            if vector is not None:
                vector.copy_(1 + 0.05 * torch.randn(r, generator=generator))
    return layer


def ours(layer):
    spec = RotationSpec(
        convention="peft",
        orth=layer.orth,
        cayley_neumann=layer.use_cayley_neumann,
        neumann_terms=layer.num_cayley_neumann_terms,
        neumann_eps=layer.cayley_neumann_eps,
    )
    return rotation(layer.weight.detach(), layer.size, spec, layer.vector_a, layer.vector_b).detach()


@pytest.mark.parametrize("r", [1, 2, 5, 16])
@pytest.mark.parametrize("mag_a,mag_b", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("orth", [True, False])
def test_exact_cayley_and_free_r_match_peft(r, mag_a, mag_b, orth):
    layer = peft_orth_layer(r, orth=orth, mag_a=mag_a, mag_b=mag_b)
    torch.testing.assert_close(ours(layer), layer.get_matrix().detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("eps", [None, 0.5])
def test_cayley_neumann_schedule_matches_peft(terms, eps):
    layer = peft_orth_layer(8, use_cayley_neumann=True, num_cayley_neumann_terms=terms, cayley_neumann_eps=eps)
    torch.testing.assert_close(ours(layer), layer.get_matrix().detach(), rtol=1e-5, atol=1e-6)


def test_neumann_three_terms_equal_four_terms_as_in_peft():
    params = 0.2 * torch.randn(28, generator=torch.Generator().manual_seed(3))
    three, four, five = (
        rotation_part(params, 8, RotationSpec(cayley_neumann=True, neumann_terms=t)) for t in (3, 4, 5)
    )
    torch.testing.assert_close(three, four, rtol=0, atol=0)
    assert not torch.allclose(four, five)


def test_eps_rescales_only_large_generators():
    params = torch.randn(28, generator=torch.Generator().manual_seed(4))  # ‖Q‖_F ≫ 0.5
    capped = rotation_part(params, 8, RotationSpec(cayley_neumann=True, neumann_terms=6, neumann_eps=0.5))
    small = rotation_part(params * 0.5 / (torch.linalg.norm(params) * 2**0.5), 8,
                          RotationSpec(cayley_neumann=True, neumann_terms=6))
    torch.testing.assert_close(capped, small, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("terms", [None, 0, 1, 3, 5])
def test_paper_rotation_matches_its_spec(terms):
    r = 6
    a_params = 0.2 * torch.randn(r * (r - 1) // 2, generator=torch.Generator().manual_seed(5))
    spec = RotationSpec(convention="paper", cayley_neumann=terms is not None, neumann_terms=terms or 0)
    torch.testing.assert_close(
        rotation_part(a_params, r, spec).double(), paper_rotation_from_spec(a_params.double(), r, terms),
        rtol=1e-5, atol=1e-6,
    )


def test_paper_and_peft_exact_rotations_agree_after_reordering():
    """PEFT's upper entry (i, j) is the paper's lower entry (j, i): same exact R, no sign change."""
    r = 7
    peft_params = 0.3 * torch.randn(r * (r - 1) // 2, generator=torch.Generator().manual_seed(6))
    upper = torch.zeros(r, r)
    rows, cols = torch.triu_indices(r, r, 1)
    upper[rows, cols] = peft_params
    lower_rows, lower_cols = torch.tril_indices(r, r, -1)
    paper_params = upper.T[lower_rows, lower_cols]
    torch.testing.assert_close(
        rotation_part(peft_params, r, RotationSpec(convention="peft")),
        rotation_part(paper_params, r, RotationSpec(convention="paper")),
        rtol=1e-5, atol=1e-6,
    )


@pytest.mark.parametrize("init", ["psoft_init", "pissa_init"])
@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_lora_form_is_exactly_the_delta(init, svd):
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(7))
    A, B = principal_subspace(weight, 4, 2.0, SubspaceSpec(svd=svd, niter=4, seed=3, init=init))
    R = rotation(0.2 * torch.randn(6, generator=torch.Generator().manual_seed(8)), 4, RotationSpec())
    factors = ModuleFactors(A=A, B=B, R=R, scale=2.0)
    lora_A, lora_B = factors.lora()
    expected = 2.0 * B @ (R - torch.eye(4)) @ A
    torch.testing.assert_close(lora_B @ lora_A, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(factors.delta_weight(), expected)
    fan_in_fan_out = ModuleFactors(A=A, B=B, R=R, scale=2.0, fan_in_fan_out=True)
    torch.testing.assert_close(fan_in_fan_out.delta_weight(), expected.T)


def test_seeded_lowrank_subspace_is_reproducible_and_leaves_global_rng_alone():
    weight = torch.randn(32, 20, generator=torch.Generator().manual_seed(9))
    spec = SubspaceSpec(svd="lowrank", niter=2, seed=11)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = principal_subspace(weight, 5, 1.0, spec)
    assert torch.equal(torch.get_rng_state(), state)
    second = principal_subspace(weight, 5, 1.0, spec)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fan_in_fan_out_uses_the_transposed_weight():
    weight = torch.randn(12, 20, generator=torch.Generator().manual_seed(10))
    A, B = principal_subspace(weight.T, 3, 1.0, SubspaceSpec(), fan_in_fan_out=True)
    A_ref, B_ref = principal_subspace(weight, 3, 1.0, SubspaceSpec())
    torch.testing.assert_close(B @ A, B_ref @ A_ref)


@pytest.mark.parametrize("spec", [RotationSpec(), RotationSpec(orth=False), RotationSpec(cayley_neumann=True),
                                  RotationSpec(cayley_neumann=True, neumann_terms=1),
                                  RotationSpec(cayley_neumann=True, neumann_eps=0.3),
                                  RotationSpec(convention="paper"), RotationSpec(convention="paper", cayley_neumann=True)])
def test_a_stack_of_parameters_gives_each_modules_r(spec):
    """Serve computes every module's R of an adapter at once: each must be the R computed alone."""
    r, generator = 6, torch.Generator().manual_seed(0)
    scales = torch.tensor([0.01, 0.3, 2.0])[:, None]  # one generator below the Neumann eps, two above
    params = (torch.randn(3, r, r, generator=generator) if not spec.orth
              else scales * torch.randn(3, r * (r - 1) // 2, generator=generator))
    vector_a, vector_b = 1 + 0.1 * torch.randn(2, 3, r, generator=generator)
    stacked = rotation(params, r, spec, vector_a, vector_b)
    exact = rotation(params.double(), r, spec, vector_a.double(), vector_b.double())
    for index in range(3):
        alone = rotation(params[index], r, spec, vector_a[index], vector_b[index])
        # float32 rounding of this module's R, measured against float64 and scaled by its magnitude
        # (the Cayley–Neumann series at generator scale 2 reaches 1e5): a batched product rounds otherwise
        noise = (alone.double() - exact[index]).abs().max().item()
        bound = 4 * noise + 8 * r * torch.finfo(torch.float32).eps * exact[index].abs().max().item()
        assert (stacked[index] - alone).abs().max().item() <= bound
        other = stacked[(index + 1) % 3]  # another module's R: the check can fail
        assert (other - alone).abs().max().item() > bound

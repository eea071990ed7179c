"""The PSOFT math, in one place and without I/O.

A trained PSOFT update is ``ΔW = s · B (R − I) A`` with ``A: (r, in)``, ``B: (out, r)`` and
``R: (r, r)`` built from a few trained parameters. This module builds R (PEFT's and the
paper's conventions), the principal subspace A, B (as PEFT rebuilds it from the base
weight), and the factors every converter consumes. Training, merge, LoRA/ONNX export,
verify and serve all call these functions; nothing else re-implements them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class RotationSpec:
    """How R is built from its trained parameters.

    ``convention="peft"``: Q is filled from the strict upper triangle
    (``torch.triu_indices`` order), exact Cayley ``R = (I + Q)(I − Q)⁻¹``, PEFT's
    Cayley–Neumann schedule. ``convention="paper"``: the paper repository's lower-triangle
    generator K, ``R = (I − K)(I + K)⁻¹`` and its own Neumann schedule.
    """

    convention: Literal["peft", "paper"] = "peft"
    orth: bool = True
    cayley_neumann: bool = False
    neumann_terms: int = 5
    neumann_eps: float | None = None


@dataclass(frozen=True)
class SubspaceSpec:
    """How A and B are rebuilt from the base weight (PEFT's ``_build_psoft_ab_cache_buffers``).

    ``seed=None`` means the low-rank SVD runs unseeded (PEFT 0.19), i.e. not reproducibly.
    """

    svd: Literal["full", "lowrank"] = "full"
    niter: int = 10
    seed: int | None = 0
    init: Literal["psoft_init", "pissa_init"] = "psoft_init"


@functools.lru_cache(maxsize=64)
def _triangle(r: int, convention: str, device: torch.device) -> torch.Tensor:
    # PEFT packs the strict upper triangle, the paper the strict lower one (row-major both).
    make = torch.triu_indices if convention == "peft" else torch.tril_indices
    return make(r, r, 1 if convention == "peft" else -1, device=device)


def skew_generator(params: torch.Tensor, r: int, convention: str) -> torch.Tensor:
    """The skew-symmetric generator (Q for PEFT, K for the paper) from its packed triangle; a stack
    of them from ``(..., r(r−1)/2)``."""
    rows, cols = _triangle(r, convention, params.device)
    T = torch.zeros((*params.shape[:-1], r, r), dtype=params.dtype, device=params.device)
    T[..., rows, cols] = params
    return T - T.transpose(-2, -1)


def _peft_cayley_neumann(Q: torch.Tensor, terms: int) -> torch.Tensor:
    # PEFT's exact schedule: I, +2Q, +2Q², +2Q³ … +2Q^(t−2), +Q^(t−1); t = 3 adds Q³ like t = 4.
    R = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    if terms > 1:
        R = R + 2.0 * Q
        if terms > 2:
            power = Q @ Q
            R = R + 2.0 * power
            for _ in range(3, terms - 1):
                power = power @ Q
                R = R + 2.0 * power
            R = R + power @ Q
    return R


def _paper_cayley_neumann(K: torch.Tensor, terms: int) -> torch.Tensor:
    # The paper's schedule: I + 2 Σ_{k=1..t} (−K)^k + (−K)^(t+1); t <= 0 gives I − K.
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    if terms <= 0:
        return eye - K
    R, power = eye, -K
    for _ in range(terms):
        R = R + 2.0 * power
        power = power @ -K
    return R + power


def _project_frobenius(Q: torch.Tensor, eps: float) -> torch.Tensor:
    # PEFT's: Q · eps / (‖Q‖ + 1e-12) where ‖Q‖ is finite and above eps, each matrix of a stack alone.
    norm = torch.linalg.matrix_norm(Q, ord="fro", keepdim=True)
    return Q * torch.where(torch.isfinite(norm) & (norm > eps), eps / (norm + 1e-12), torch.ones_like(norm))


def rotation_part(params: torch.Tensor, r: int, spec: RotationSpec) -> torch.Tensor:
    """R before the magnitude vectors: orthogonal (or Neumann-approximate), or the free matrix; a
    stack of them from stacked parameters."""
    if not spec.orth:
        return params if params.shape[-2:] == (r, r) else params.reshape(r, r)
    compute_dtype = torch.float32 if params.dtype in (torch.float16, torch.bfloat16) else params.dtype
    G = skew_generator(params.to(compute_dtype), r, spec.convention)
    eye = torch.eye(r, dtype=compute_dtype, device=G.device)
    if spec.convention == "peft":
        if spec.cayley_neumann:
            if spec.neumann_eps is not None:
                G = _project_frobenius(G, spec.neumann_eps)
            return _peft_cayley_neumann(G, int(spec.neumann_terms))
        return torch.linalg.solve(eye - G, eye + G, left=False)
    if spec.cayley_neumann:
        return _paper_cayley_neumann(G, int(spec.neumann_terms))
    return torch.linalg.solve(eye + G, eye - G, left=False)


def rotation(
    params: torch.Tensor,
    r: int,
    spec: RotationSpec,
    vector_a: torch.Tensor | None = None,
    vector_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """R = diag(vector_b) · rotation_part · diag(vector_a), each vector only if given (stacks of
    parameters and vectors give a stack of R)."""
    R = rotation_part(params, r, spec)
    if vector_b is not None:
        R = vector_b.to(R.dtype)[..., :, None] * R
    if vector_a is not None:
        R = R * vector_a.to(R.dtype)[..., None, :]
    return R


def singular_triplets(weight: torch.Tensor, r: int, spec: SubspaceSpec) -> tuple[torch.Tensor, ...]:
    """Top-r (U, S, Vh) of an fp32 ``(out, in)`` weight, exactly as PEFT computes them."""
    if spec.svd == "full":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r, :]
    if spec.svd != "lowrank":
        raise ValueError(f"unknown SVD backend {spec.svd!r}")
    if spec.seed is None:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=spec.niter)
    else:
        if weight.device.type == "cpu":
            fork = {"devices": []}
        else:
            fork = {"devices": [weight.device], "device_type": weight.device.type}
        with torch.random.fork_rng(**fork):
            torch.manual_seed(spec.seed)
            U, S, V = torch.svd_lowrank(weight, q=r, niter=spec.niter)
    return U[:, :r], S[:r], V[:, :r].T


def principal_subspace(
    weight: torch.Tensor, r: int, scale: float, spec: SubspaceSpec, fan_in_fan_out: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(r, in)`` and B ``(out, r)`` from the base weight, as PEFT's PSOFT layer builds them."""
    W = weight.to(torch.float32)
    if fan_in_fan_out:
        W = W.T
    return subspace_of(*singular_triplets(W, r, spec), scale, spec.init)


def subspace_of(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scale: float,
                init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B from the singular triplets (`singular_triplets`), as PEFT builds them for ``scale`` and ``init``.
    ``s·B(R − I)A`` does not depend on the scale (``U diag(S)(R − I) Vh``, or with √S on both sides for pissa);
    with PEFT's full SVD the triplets of rank r are the leading ones of any larger rank's (nested)."""
    left, right = _init_split(S / scale, init)
    A = Vh if right is None else torch.diag(right) @ Vh
    return A.contiguous(), (U @ torch.diag(left)).contiguous()


def _init_split(S: torch.Tensor, init: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """How ``init`` splits diag(S) between B (left) and A (right): all on B for psoft_init, √S on each
    side for pissa_init."""
    if init == "psoft_init":
        return S, None
    if init == "pissa_init":
        root = torch.sqrt(S)
        return root, root
    raise ValueError(f"unknown ab_svd_init {init!r}")


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k singular values hold at least ``energy`` of ‖ΔW‖²."""
    squares = singular_values.double().square()
    total = squares.sum()
    if total == 0:
        return 1
    cumulative = torch.cumsum(squares, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12)) + 1


@dataclass
class ModuleFactors:
    """One adapted linear layer: ``ΔW = scale · B (R − I) A`` in ``(out, in)`` layout."""

    A: torch.Tensor
    B: torch.Tensor
    R: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact LoRA factors with scaling 1: ``lora_B @ lora_A == ΔW``."""
        eye = torch.eye(self.rank, dtype=self.R.dtype, device=self.R.device)
        return self.A, self.scale * (self.B @ (self.R - eye))

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ΔW = U diag(S) Vh`` (U: out×r, Vh: r×in, S descending) by `lora_spectrum`: the dense
        ΔW is never formed."""
        return tuple(part.float() for part in lora_spectrum(*self.lora()))

    def truncated_lora(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The best rank-``rank`` approximation of ΔW as LoRA factors (scaling 1), and its
        relative Frobenius error ‖ΔW − ΔW_k‖ / ‖ΔW‖."""
        U, S, Vh = self.spectrum()
        return Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous(), truncation_error(S, rank)

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW in the layout the base stores (transposed when ``fan_in_fan_out``)."""
        lora_A, lora_B = self.lora()
        delta = lora_B @ lora_A
        return delta.T if self.fan_in_fan_out else delta


def lora_spectrum(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lora_B @ lora_A = U diag(S) Vh`` (U: out×r, Vh: r×in, S descending) from two thin QRs of
    the factors and the SVD of their r×r core, in float64."""
    Q_b, R_b = torch.linalg.qr(lora_B.double())
    Q_a, R_a = torch.linalg.qr(lora_A.double().T)
    U_core, S, Vh_core = torch.linalg.svd(R_b @ R_a.T)
    return Q_b @ U_core, S, Vh_core @ Q_a.T


def truncation_error(singular_values: torch.Tensor, rank: int) -> float:
    """The relative Frobenius error ‖ΔW − ΔW_k‖ / ‖ΔW‖ of the optimal rank-``rank`` truncation of a
    ΔW with these singular values (Eckart–Young: the norm of the ones left out)."""
    squares = singular_values.double().square()
    total = float(squares.sum())
    return (max(total - float(squares[:rank].sum()), 0.0) / total) ** 0.5 if total > 0 else 0.0


def shared_basis(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U ``(out, r)``, V ``(in, r)`` and the top ``r + 1`` singular values of an ``(out, in)``
    weight, by PEFT's full SVD: every full-SVD PSOFT adapter of rank ≤ r on this weight is
    ``ΔW = U[:, :k] · C · V[:, :k]ᵀ`` with an r×r (k×k) core C (the singular vectors are nested)."""
    U, S, Vh = singular_triplets(weight.to(torch.float32), r + 1, SubspaceSpec())
    return U[:, :r].contiguous(), Vh[:r].T.contiguous(), S


def core_in_basis(lora_A: torch.Tensor, lora_B: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The core ``C = Uᵀ ΔW V`` of ``ΔW = lora_B @ lora_A`` in an orthonormal basis (U, V), and
    the relative residual ‖ΔW − U C Vᵀ‖_F / ‖ΔW‖_F (0: ΔW lies in the basis), from r×r products
    only. Sign and rotation conventions of the SVD that built the factors do not matter."""
    A, B, U, V = (t.detach().double() for t in (lora_A, lora_B, U, V))
    B_in, A_in = U @ (U.T @ B), (A @ V) @ V.T
    # ΔW − U C Vᵀ = (B − B_in) A + B_in (A − A_in): one product of (out, 2r) and (2r, in) factors.
    left, right = torch.cat([B - B_in, B_in], dim=1), torch.cat([A, A - A_in], dim=0)
    squared = float(((left.T @ left) * (right @ right.T)).sum())  # ‖X Y‖²_F = trace(XᵀX · Y Yᵀ)
    total = float(((B.T @ B) * (A @ A.T)).sum())
    residual = (max(squared, 0.0) / total) ** 0.5 if total > 0 else 0.0
    return ((U.T @ B) @ (A @ V)).float(), residual


def lora_of_core(core: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact LoRA ``(lora_A, lora_B) = (V_kᵀ, U_k C)`` (scaling 1) of the k×k core ``C`` over the
    basis (U, V): ``lora_B @ lora_A = U_k C V_kᵀ``."""
    k = core.shape[0]
    return V[:, :k].T.contiguous(), U[:, :k] @ core


def core_of_rotation(R: torch.Tensor, singular_values: torch.Tensor, init: str = "psoft_init") -> torch.Tensor:
    """The k×k core C of ``ΔW = s · B (R − I) A`` over the weight's own top-k singular vectors
    (``ΔW = U_k C V_kᵀ``), where A and B come from PEFT's full SVD of that weight
    (`principal_subspace`): ``diag(S_k) (R − I)`` for psoft_init, ``diag(√S_k) (R − I) diag(√S_k)``
    for pissa_init; the scale cancels. No SVD: the singular values are the basis's. In R's dtype
    (float64 at least for float64 inputs); stacks of R and singular values give a stack of cores."""
    k = R.shape[-1]
    dtype = torch.promote_types(R.dtype, singular_values.dtype)
    left, right = _init_split(singular_values[..., :k].to(dtype), init)
    core = left[..., :, None] * (R.to(dtype) - torch.eye(k, dtype=dtype, device=R.device))
    return core if right is None else core * right[..., None, :]

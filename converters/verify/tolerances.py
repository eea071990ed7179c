"""Every tolerance a candidate is held to, named for what it bounds. Each is a multiple of noise
measured in the same run, or of what rounding to a float type costs (float32's ε where an SVD is
involved): none is a constant tuned on a model. The rules that use them: `rule` (logits and
behaviour), `candidates` and `genai_exports` (layers and LoRA factors), and serve's shared basis
(`basis_bound`, `lora_in_basis_bound`, `core_from_rotation_bound`)."""

from __future__ import annotations

import torch

# A candidate's logits against the float64 truth, over the noise measured in the same run (its
# precision's own effect plus the rounding of the converted weights): its largest |Δlogit| by
# MAX_LOGIT_NOISE (a single extreme value fluctuates), its mean |Δlogit| by MEAN_LOGIT_NOISE and its
# mean KL by the square of that (averages over every position and class are stable; a correct
# candidate measures at 0.6–1.1× the noise). Averages over fewer than STABLE_AVERAGE_VALUES values
# (a classifier's few logits) are held to MAX_LOGIT_NOISE like the max.
MAX_LOGIT_NOISE = 4.0
MEAN_LOGIT_NOISE = 2.0
STABLE_AVERAGE_VALUES = 1000
# Top-1 agreement is judged where the truth's top-1 margin exceeds DECISIVE_MARGIN × the noise at that
# position: more than a correct candidate's deviation (≤ MAX_LOGIT_NOISE × it) can close.
DECISIVE_MARGIN = 2 * MAX_LOGIT_NOISE
# A lossy candidate's behaviour (top-1 decisions, greedy continuations) against the precision's own:
# it may lose at most BEHAVIOUR_LOSS × as much, plus BEHAVIOUR_SLACK (a few decisions, one prompt's
# continuation of GENERATED_TOKENS), and must keep at least 1/BEHAVIOUR_LOSS as much.
BEHAVIOUR_LOSS = 2.0
GENERATED_TOKENS = 16
BEHAVIOUR_SLACK = {"top-1 decisions": 2, "continuation tokens": GENERATED_TOKENS}
# A layer's weight or an export's LoRA factors against the exact ones: ROUNDING_NOISE × what rounding
# the exact ones to the candidate's type costs, measured per layer.
ROUNDING_NOISE = 4.0
# A float32 SVD's results (serve's shared basis, the cores over it): SVD_NOISE × float32's backward
# error for the sizes involved.
SVD_NOISE = 4.0
FLOAT32_EPS = torch.finfo(torch.float32).eps


def basis_bound(dim: int) -> float:
    """How far a computed basis may miss ``W V = U diag(S)`` (relative to σ₁) and orthonormality: a
    float32 SVD's backward error, ε·√dim."""
    return SVD_NOISE * FLOAT32_EPS * dim ** 0.5


def lora_in_basis_bound(singular_values: torch.Tensor, k: int, dim: int) -> float:
    """How far from the basis an adapter built by another float32 SVD of the same weight may lie:
    the SVD's backward error (ε·√dim) and the perturbation of the top-k subspace it causes
    (Davis–Kahan, ε·σ₁ / (σ_k − σ_k+1)). A gap within that backward error (a rank-deficient weight,
    tied singular values) leaves the top-k subspace to chance: then only the backward error is allowed."""
    S = singular_values.double()
    backward = basis_bound(dim)
    gap = float(S[k - 1] - S[k]) if k < len(S) else float(S[k - 1])
    subspace = SVD_NOISE * FLOAT32_EPS * float(S[0]) / gap if gap > backward * float(S[0]) else 0.0
    return backward + subspace


def core_from_rotation_bound(k: int) -> float:
    """How far a k×k core computed from R in float32 may lie from its float64 closed form, relative
    to σ₁‖R‖: R's float32 rounding, ε·k."""
    return SVD_NOISE * FLOAT32_EPS * k

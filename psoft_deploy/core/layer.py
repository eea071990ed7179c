"""`PsoftLinear`: a linear layer with a PSOFT update, and its injection into a model."""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .psoft import ModuleFactors, RotationSpec, rotation, subspace_of


class PsoftRotation(nn.Module):
    """R's trainable parameters, named and initialised as PEFT's PSOFT layer names them
    (``psoft_R.weight``: the packed generator, or the free R; ``vector_a``, ``vector_b``)."""

    def __init__(self, r: int, spec: RotationSpec, mag_a: bool = True, mag_b: bool = True):
        super().__init__()
        self.r, self.spec = r, spec
        self.weight = nn.Parameter(torch.zeros(r * (r - 1) // 2) if spec.orth else torch.eye(r))
        self.vector_a = nn.Parameter(torch.ones(r)) if mag_a else None
        self.vector_b = nn.Parameter(torch.ones(r)) if mag_b else None

    def forward(self) -> torch.Tensor:
        return rotation(self.weight, self.r, self.spec, self.vector_a, self.vector_b)


class PsoftLinear(nn.Module):
    """``y = W x + s · B (R (A x) − A x)``, the forward PEFT's PSOFT layer computes.

    R is fixed (from ``factors``) or, for training, computed from a `PsoftRotation` kept as
    ``psoft_R`` so that its state-dict keys are PEFT's. The adapter path runs in float32 and
    is cast back to the base output dtype; ``dropout`` applies to its input, as in PEFT.
    """

    def __init__(
        self, base_layer: nn.Linear, factors: ModuleFactors, rotation: PsoftRotation | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if factors.fan_in_fan_out:
            raise UserError("fan_in_fan_out factors cannot wrap an nn.Linear (its weight is stored (out, in))")
        self.base_layer = base_layer
        self.scale = factors.scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.register_buffer("A", factors.A.to(device=device, dtype=torch.float32))
        self.register_buffer("B", factors.B.to(device=device, dtype=torch.float32))
        if rotation is None:
            self.register_buffer("R", factors.R.to(device=device, dtype=torch.float32))
        else:
            self.psoft_R = rotation.to(device)

    def rotation(self) -> torch.Tensor:
        return self.psoft_R() if hasattr(self, "psoft_R") else self.R

    def _projected(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` (dropout first), in float32 (float64 for float64 inputs)."""
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        return self.dropout(x).to(compute_dtype) @ self.A.to(compute_dtype).T

    def _rotated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``R (A x) − A x`` and B, in the compute dtype of `_projected`."""
        xa = self._projected(x)
        return xa @ self.rotation().to(xa.dtype).T - xa, self.B.to(xa.dtype)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution alone, ``s · B (R (A x) − A x)``."""
        rotated, B = self._rotated(x)
        return self.scale * (rotated @ B.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        rotated, B = self._rotated(x)
        if result.dtype != B.dtype:
            return result + (self.scale * (rotated @ B.T)).to(result.dtype)
        # One GEMM scales the update and adds it to the base output: no extra passes over n×out,
        # and autograd keeps only B itself (no scaled copy) for the backward.
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), rotated.reshape(-1, rotated.shape[-1]), B.T,
                           alpha=self.scale)
        return flat.view_as(result)


class PsoftJobsLinear(PsoftLinear):
    """Several PSOFT adapters (jobs) trained at once on one base layer over one shared basis.

    ``basis``: the base weight's top singular triplets ``(U, S, Vh)`` at the jobs' largest rank, by PEFT's
    full SVD; job j of rank r_j uses the leading r_j of them (nested). Every job's update
    ``s_j·B_j(R_j − I)A_j`` equals ``B[:, :r_j](R_j − I)A[:r_j]`` with A, B built at scale 1 (`subspace_of`),
    so ``x·A`` and ``·Bᵀ`` run once for all rows and only the r_j×r_j step is per job. ``rows``, a list shared
    by every layer of the model, holds how many leading batch rows are each job's, in job order.
    """

    def __init__(self, base_layer: nn.Linear, basis: tuple[torch.Tensor, ...], init: str,
                 rotations: list[PsoftRotation], rows: list[int], dropout: float = 0.0):
        A, B = subspace_of(*basis, 1.0, init)
        super().__init__(base_layer, ModuleFactors(A=A, B=B, R=torch.eye(A.shape[0]), scale=1.0), dropout=dropout)
        self.basis, self.init, self.rows = basis, init, rows
        self.jobs = nn.ModuleList(rotations)

    def _rotated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa = self._projected(x)
        parts = []
        for rotation, part in zip(self.jobs, xa.split(self.rows)):
            if len(part):
                part = part[..., :rotation.r]
                rotated = part @ rotation().to(xa.dtype).T - part
                parts.append(nn.functional.pad(rotated, (0, xa.shape[-1] - rotation.r)))
        return torch.cat(parts), self.B.to(xa.dtype)

    def job(self, index: int, scale: float) -> PsoftLinear:
        """Job ``index``'s layer as its run alone builds it (A, B of its rank and scale) around its trained R."""
        rotation, (U, S, Vh) = self.jobs[index], self.basis
        r = rotation.r
        A, B = subspace_of(U[:, :r], S[:r], Vh[:r], scale, self.init)
        return PsoftLinear(self.base_layer, ModuleFactors(A=A, B=B, R=torch.eye(r), scale=scale), rotation=rotation)


def apply_factors(
    model: nn.Module, factors: dict[str, ModuleFactors], replaced_tensors: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """Wrap each targeted ``nn.Linear`` of ``model`` in a `PsoftLinear` (in place) and load
    ``replaced_tensors`` (``modules_to_save``) into the model's state."""
    if replaced_tensors:
        known = model.state_dict()
        missing = [key for key in replaced_tensors if key not in known]
        if missing:
            raise UserError(f"the model has no tensor {missing[0]!r} that the adapter replaces (modules_to_save)")
        untie_replaced(model, replaced_tensors)
        model.load_state_dict(replaced_tensors, strict=False)
    for name, module_factors in factors.items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"the model has no module {name!r} that the adapter targets") from None
        if not isinstance(target, nn.Linear):
            raise UserError(f"module {name!r} is a {type(target).__name__}, PSOFT adapts nn.Linear only")
        expected = (target.out_features, target.in_features)
        got = (module_factors.B.shape[0], module_factors.A.shape[1])
        if got != expected:
            raise UserError(f"adapter for {name!r} has shape {got}, the model's layer is {expected}")
        replace_module(model, name, PsoftLinear(target, module_factors))
    return model


def tied_groups(model: nn.Module) -> list[set[str]]:
    """Names of the parameters that share one tensor (e.g. a tied input embedding and LM head)."""
    groups: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), set()).add(name)
    return [names for names in groups.values() if len(names) > 1]


def untie_replaced(model: nn.Module, replaced_tensors: dict[str, torch.Tensor]) -> list[set[str]]:
    """PEFT's ``modules_to_save`` replaces one module by a trained copy; a module tied to it keeps
    the original weight (PEFT's forward, and its ``merge_and_unload``, untie the pair). Give each
    tied partner of a replaced tensor its own copy of the original, mark the model untied, and
    return the groups untied."""
    untied = []
    for names in tied_groups(model):
        if not names & replaced_tensors.keys() or names <= replaced_tensors.keys():
            continue
        for name in names - replaced_tensors.keys():
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, attribute, nn.Parameter(getattr(module, attribute).detach().clone()))
        model.config.tie_word_embeddings = False
        untied.append(names)
    return untied


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)

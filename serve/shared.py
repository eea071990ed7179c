"""PSOFT adapters served as what they are: an r×r core per module over a basis the base already has.

With PEFT's full SVD (its default) every PSOFT adapter of a base lives in the base weights' own top
singular vectors: ``ΔW = U_k · C · V_kᵀ`` with a k×k core C, whatever its init, magnitudes or
alpha. `SharedBasis` holds ``U``, ``V`` (rank ``r_max``, nested for every k ≤ r_max) of each
adapted base module, built once per (base, modules, r_max) and kept in serve's cache;
`SharedBasis.shared_form` recovers an adapter's cores from its exact LoRA form by projection and
keeps them only if the residual is within float32 noise. vLLM then holds the cores (k² numbers per
module instead of k·(in+out)) and runs ``x·V`` once for all tokens, each token's core, then ``·Uᵀ``
(`psoft_deploy.serve.vllm_shared`, installed by the plugin).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from psoft_deploy.converters.lora_format import LoraAdapter
from psoft_deploy.converters.verify.tolerances import basis_bound, core_from_rotation_bound, lora_in_basis_bound
from psoft_deploy.core.base import BaseCheckpoint, base_tensor_key
from psoft_deploy.core.dtypes import BY_NAME
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PsoftAdapter, read_json
from psoft_deploy.core.options import DEFAULTS, ReadOptions
from psoft_deploy.core.outputs import atomic_output_dir
from psoft_deploy.core.progress import track
from psoft_deploy.core.psoft import core_in_basis, core_of_rotation, rotation, shared_basis
from psoft_deploy.core.tensorfile import open_safetensors, read_headers, read_safetensors, write_safetensors
from psoft_deploy.serve.cache import read_back

BASIS_VERSION = b"psoft-deploy/shared-basis/v1"


@dataclass(frozen=True)
class CoresEntry:
    """A directory of cores over a basis, the one owner of its files: ``psoft_cores.safetensors`` (module →
    k×k core, the basis's digest in its metadata) beside an ``adapter_config.json`` that names the target
    modules and the residual summary. vLLM alone cannot load it (no adapter_model.*): psoft-deploy's plugin
    does."""

    path: Path
    FILE = "psoft_cores.safetensors"

    @classmethod
    def write(cls, path: Path, cores: dict[str, torch.Tensor], *, basis: str, summary: str) -> CoresEntry:
        """Write ``cores`` over the basis of digest ``basis`` into ``path``, whole or not at all."""
        rank = max(core.shape[0] for core in cores.values())
        with atomic_output_dir(path, overwrite=True) as staging:
            write_safetensors(cores, staging / cls.FILE, metadata={"basis": basis})
            LoraAdapter(r=rank, lora_alpha=rank, target_modules=sorted({module.rsplit(".", 1)[-1] for module in cores})
                        ).write_config(staging, psoft_shared=summary, psoft_basis=basis)
        return cls(Path(path))

    def holds_cores(self) -> bool:
        """Whether the directory is a cores entry (a LoRA adapter's directory is not)."""
        return (self.path / self.FILE).is_file()

    def cores(self, basis: str) -> dict[str, torch.Tensor]:
        """The cores, refused (`ValueError`) where they lie over another basis than ``basis``."""
        with open_safetensors(self.path / self.FILE) as handle:
            if handle.metadata().get("basis") != basis:
                raise ValueError(f"{self.path} holds cores over another basis than the one this server holds")
        return read_safetensors(self.path / self.FILE)

    def summary(self, modules: list[str]) -> str:
        """The residual summary, once the entry reads back with a core for each of ``modules`` (else `KeyError`)."""
        missing = set(modules) - set(read_headers(self.path / self.FILE))
        if missing:
            raise KeyError(f"no core for {', '.join(sorted(missing))}")
        return read_json(self.path / ADAPTER_CONFIG)["psoft_shared"]


@dataclass(frozen=True)
class SharedBasis:
    """U ``(out, r_max)``, V ``(in, r_max)`` and the top r_max + 1 singular values of each module, in
    one safetensors file named by its content key (``NAME.U``, ``NAME.V``, ``NAME.S``)."""

    path: Path

    @classmethod
    def build(cls, cache_root: Path, base: BaseCheckpoint, modules: list[str], rank: int,
              options: ReadOptions = DEFAULTS) -> SharedBasis:
        """The basis of ``modules`` at ``rank``, from the cache (read back whole) or computed once, by
        PEFT's full SVD of each weight as PEFT adapters' A and B are rebuilt (``options.svd_dtype``,
        ``options.svd_device``) and checked against the weight (`check_basis`)."""
        svd = {"svd_dtype": options.svd_dtype or "as stored", "svd_device": str(torch.device(options.svd_device))}
        digest = hashlib.sha256(BASIS_VERSION + str(rank).encode() + json.dumps(svd, sort_keys=True).encode())
        for module in sorted(modules):
            digest.update(module.encode() + base.fingerprint(base_tensor_key(module))["sha256"].encode())
        path = Path(cache_root) / f"basis-{digest.hexdigest()[:32]}" / "basis.safetensors"
        if read_back(path.parent, functools.partial(_basis_modules, modules=modules)) is None:
            tensors = {}
            for module in track(sorted(modules), desc="basis SVDs (once per base)"):
                weight = base.tensor(base_tensor_key(module))
                weight = (weight.to(BY_NAME[options.svd_dtype].torch) if options.svd_dtype else weight).float()
                U, V, S = shared_basis(weight.to(options.svd_device), min(rank, *weight.shape))
                U, V, S = U.cpu(), V.cpu(), S.cpu()
                check_basis(module, weight, U, V, S)
                tensors |= {f"{module}.U": U, f"{module}.V": V, f"{module}.S": S}
            with atomic_output_dir(path.parent, overwrite=True) as staging:
                write_safetensors(tensors, staging / path.name, metadata={"rank": str(rank), **svd})
        return cls(path)

    @property
    def digest(self) -> str:
        return self.path.parent.name.removeprefix("basis-")

    @functools.cached_property
    def widths(self) -> dict[str, int]:
        """Each module's basis width (its rank, at most the weight's smaller side), from the header."""
        return {key.removesuffix(".U"): info.shape[1] for key, info in read_headers(self.path).items()
                if key.endswith(".U")}

    @property
    def modules(self) -> set[str]:
        return set(self.widths)

    @property
    def rank(self) -> int:
        with open_safetensors(self.path) as handle:
            return int(handle.metadata()["rank"])

    @functools.cached_property
    def singular_values(self) -> dict[str, torch.Tensor]:
        """The top r_max + 1 singular values of each module (the only part of the basis kept here)."""
        with open_safetensors(self.path) as handle:
            return {module: handle.get_tensor(f"{module}.S") for module in self.widths}

    def vectors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``module``'s U and V, read from the file at each use: a process keeps the basis once, where it
        serves it (a vLLM layer's copy in its serving dtype and device), not also here."""
        with open_safetensors(self.path) as handle:
            return handle.get_tensor(f"{module}.U"), handle.get_tensor(f"{module}.V")

    def cores_from_rotations(self, adapter: PsoftAdapter) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The k×k core per module of a PEFT PSOFT adapter straight from its R and the basis's singular
        values (`core_of_rotation`, no SVD), each held to the same core computed in float64; or None
        and why the adapter is not one these cores are exact for. Its fit to the base (shapes, recorded
        base, targets) is the caller's to check first (`check_fits_base`)."""
        if adapter.format != "peft" or adapter.subspace_spec is None or adapter.subspace_spec.svd != "full":
            return None, "its A and B do not come from PEFT's full SVD of the base"
        if adapter.fan_in_fan_out or adapter.replaced_tensors:
            return None, "a feature cores do not hold (fan_in_fan_out or modules_to_save)"
        modules, k = list(adapter.modules), adapter.rank
        for module in modules:
            if k > self.widths.get(module, 0):
                return None, f"{module} is outside the basis (rank {k}, basis rank {self.rank})"
        # Every module at once: a stack of generators, magnitudes (ones where a module has none) and S.
        params = [adapter.modules[module] for module in modules]
        generators = torch.stack([param.generator for param in params])
        vectors = [torch.stack([vector if vector is not None else torch.ones(k) for vector in each])
                   if any(vector is not None for vector in each) else None
                   for each in ([param.vector_a for param in params], [param.vector_b for param in params])]
        S = torch.stack([self.singular_values[module][:k] for module in modules]).double()
        init = adapter.subspace_spec.init
        cores = core_of_rotation(rotation(generators, k, adapter.rotation_spec, *vectors), S, init).float()
        R = rotation(generators.double(), k, adapter.rotation_spec, *(v.double() if v is not None else None
                                                                        for v in vectors))
        exact = core_of_rotation(R, S, init)
        scale = (S[:, 0] * torch.linalg.matrix_norm(R)).clamp_min(1e-300)
        errors = torch.linalg.matrix_norm(cores.double() - exact) / scale
        tolerance = core_from_rotation_bound(k)
        worst = int(torch.nan_to_num(errors, nan=torch.inf).argmax())
        error = float(errors[worst])
        if not error <= tolerance:  # NaN included
            return None, f"its core on {modules[worst]} is {error:.1e} off the float64 closed form (> {tolerance:.1e})"
        return dict(zip(modules, cores)), f"cores from R, ≤ {error / tolerance:.2f}× float32 noise off float64"

    def psoft_form(self, adapter: PsoftAdapter, cache_root: Path, options: ReadOptions) -> tuple[Path | None, str]:
        """`cores_from_rotations` of ``adapter``, written once into the cache as a directory vLLM (with
        psoft-deploy's plugin) loads: its path and how the cores were checked, or None and why not."""
        digest = hashlib.sha256(self.digest.encode() + json.dumps(asdict(options), sort_keys=True).encode())
        for file in sorted(adapter.files):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        return self._cached(cache_root, digest, list(adapter.modules), lambda: self.cores_from_rotations(adapter))

    def cores_of(self, lora_dir: Path) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The k×k core per module of the exact LoRA adapter in ``lora_dir`` over this basis and the
        worst residual over its tolerance; or None and why the adapter does not lie in the basis."""
        lora = LoraAdapter.read(lora_dir)
        if lora.use_dora or lora.modules_to_save or lora.bias != "none" or lora.fan_in_fan_out:
            return None, "a LoRA feature cores do not hold (DoRA, bias, modules_to_save or fan_in_fan_out)"
        cores, worst = {}, 0.0
        for module, (A, B) in lora.pairs().items():
            A, B = A.float(), B.float() * lora.scaling(module)
            k = A.shape[0]
            if k > self.widths.get(module, 0):
                return None, f"{module} is outside the basis (rank {k}, basis rank {self.rank})"
            (U, V), S = self.vectors(module), self.singular_values[module]
            cores[module], residual = core_in_basis(A, B, U[:, :k], V[:, :k])
            tolerance = lora_in_basis_bound(S, k, max(U.shape[0], V.shape[0]))
            if residual > tolerance:
                return None, f"residual {residual:.1e} > float32 noise {tolerance:.1e} on {module}"
            worst = max(worst, residual / tolerance)
        return cores, f"residual ≤ {worst:.2f}× float32 noise"

    def shared_form(self, lora_dir: Path, cache_root: Path) -> tuple[Path | None, str]:
        """`cores_of` the exact LoRA adapter in ``lora_dir``, written once into the cache as a
        directory vLLM (with psoft-deploy's plugin) loads: its path and the residual, or None and why."""
        digest = hashlib.sha256(self.digest.encode())
        for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            digest.update((Path(lora_dir) / file).read_bytes())
        return self._cached(cache_root, digest, LoraAdapter.read(lora_dir).modules, lambda: self.cores_of(lora_dir))

    def _cached(self, cache_root: Path, digest, modules: list[str], compute) -> tuple[Path | None, str]:
        """The cache entry ``cores-DIGEST`` once it reads back with a core for each of ``modules``, else
        ``compute()``'s cores written there: its path and summary, or None and why there are none."""
        entry = CoresEntry(Path(cache_root) / f"cores-{digest.hexdigest()[:32]}")
        summary = read_back(entry.path, lambda _: entry.summary(modules))
        if summary is not None:
            return entry.path, summary
        cores, summary = compute()
        if cores is None:
            return None, summary
        CoresEntry.write(entry.path, cores, basis=self.digest, summary=summary)
        return entry.path, summary

    def zero_adapter(self, module: str, cache_root: Path) -> Path:
        """An all-zero 1×1 core on ``module``: the bare base, served as an adapter on CPU (see serve)."""
        entry = CoresEntry(Path(cache_root) / f"cores-zero-{self.digest}")
        if read_back(entry.path, lambda _: entry.summary([module])) is None:
            CoresEntry.write(entry.path, {module: torch.zeros(1, 1)}, basis=self.digest, summary="zero")
        return entry.path


def check_basis(module: str, weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor) -> None:
    """Hold a computed basis to the weight it came from: ``W V = U diag(S)`` and ``UᵀU = VᵀV = I``
    within float32's backward error (`basis_bound`); `UserError` otherwise."""
    W, U, V, S = (t.double() for t in (weight, U, V, S))
    r = U.shape[1]
    tolerance = basis_bound(max(W.shape))
    eye = torch.eye(r, dtype=W.dtype)
    residual = float(torch.linalg.norm(W @ V - U * S[:r])) / max(float(S[0]) * r ** 0.5, 1e-300)
    orthonormal = max(float(torch.linalg.norm(U.T @ U - eye)), float(torch.linalg.norm(V.T @ V - eye))) / r ** 0.5
    if not max(residual, orthonormal) <= tolerance:
        raise UserError(f"the shared basis of {module} is not the weight's singular vectors (residual {residual:.1e}, "
                        f"orthonormality {orthonormal:.1e} > {tolerance:.1e}); serve with --adapter-form lora")


def _basis_modules(entry: Path, modules: list[str]) -> set[str]:
    """The modules of the basis in ``entry``, once it reads back with U, V and S for each of ``modules``."""
    keys = set(read_headers(entry / "basis.safetensors"))
    missing = {f"{module}.{part}" for module in modules for part in "UVS"} - keys
    if missing:
        raise KeyError(f"no {', '.join(sorted(missing)[:3])}")
    return {key.removesuffix(".U") for key in keys if key.endswith(".U")}

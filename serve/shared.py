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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from psoft_deploy.base import BaseCheckpoint, base_tensor_key
from psoft_deploy.converters.lora_format import LoraAdapter, lora_keys
from psoft_deploy.converters.verify.rule import NOISE_FACTOR
from psoft_deploy.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from psoft_deploy.outputs import atomic_output_dir
from psoft_deploy.psoft import core_in_basis, shared_basis
from psoft_deploy.serve.cache import read_back

BASIS_VERSION = b"psoft-deploy/shared-basis/v1"
CORES_FILE = "psoft_cores.safetensors"  # module name -> k×k core; vLLM alone cannot load it (no adapter_model.*)
FLOAT32_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class SharedBasis:
    """U ``(out, r_max)``, V ``(in, r_max)`` and the top r_max + 1 singular values of each module, in
    one safetensors file named by its content key (``NAME.U``, ``NAME.V``, ``NAME.S``)."""

    path: Path

    @classmethod
    def build(cls, cache_root: Path, base: BaseCheckpoint, modules: list[str], rank: int) -> SharedBasis:
        """The basis of ``modules`` at ``rank``, from the cache or computed once (PEFT's full SVD)."""
        digest = hashlib.sha256(BASIS_VERSION + str(rank).encode())
        for module in sorted(modules):
            digest.update(module.encode() + base.fingerprint(base_tensor_key(module))["sha256"].encode())
        path = Path(cache_root) / f"basis-{digest.hexdigest()[:32]}" / "basis.safetensors"
        if not path.is_file():
            tensors = {}
            for module in sorted(modules):
                U, V, S = shared_basis(base.tensor(base_tensor_key(module)), min(rank, *base.shape(base_tensor_key(module))))
                tensors |= {f"{module}.U": U, f"{module}.V": V, f"{module}.S": S}
            with atomic_output_dir(path.parent, overwrite=True) as staging:
                save_file(tensors, staging / path.name, metadata={"rank": str(rank)})
        return cls(path)

    @property
    def digest(self) -> str:
        return self.path.parent.name.removeprefix("basis-")

    @property
    def modules(self) -> set[str]:
        with safe_open(self.path, framework="pt") as handle:
            return {key.removesuffix(".U") for key in handle.keys() if key.endswith(".U")}

    @property
    def rank(self) -> int:
        with safe_open(self.path, framework="pt") as handle:
            return int(handle.metadata()["rank"])

    @functools.cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(self.path)

    def cores_of(self, lora_dir: Path) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The k×k core per module of the exact LoRA adapter in ``lora_dir`` over this basis and the
        worst residual over its tolerance; or None and why the adapter does not lie in the basis."""
        lora = LoraAdapter.read(lora_dir)
        if lora.use_dora or lora.modules_to_save or lora.bias != "none" or lora.fan_in_fan_out:
            return None, "a LoRA feature cores do not hold (DoRA, bias, modules_to_save or fan_in_fan_out)"
        weights = load_file(Path(lora_dir) / ADAPTER_WEIGHTS)
        cores, worst = {}, 0.0
        for module in lora.modules:
            key_a, key_b = (PEFT_PREFIX + key for key in lora_keys(module))
            A, B = weights[key_a].float(), weights[key_b].float() * lora.scaling(module)
            k = A.shape[0]
            if f"{module}.U" not in self.tensors or k > self.tensors[f"{module}.U"].shape[1]:
                return None, f"{module} is outside the basis (rank {k}, basis rank {self.rank})"
            U, V, S = (self.tensors[f"{module}.{part}"] for part in "UVS")
            cores[module], residual = core_in_basis(A, B, U[:, :k], V[:, :k])
            tolerance = self.tolerance(S, k, max(U.shape[0], V.shape[0]))
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
        entry = Path(cache_root) / f"cores-{digest.hexdigest()[:32]}"
        summary = read_back(entry, functools.partial(_cores_summary, modules=LoraAdapter.read(lora_dir).modules))
        if summary is not None:
            return entry, summary
        cores, summary = self.cores_of(lora_dir)
        if cores is None:
            return None, summary
        self._write(entry, cores, summary)
        return entry, summary

    def _write(self, entry: Path, cores: dict[str, torch.Tensor], summary: str) -> None:
        rank = max(core.shape[0] for core in cores.values())
        with atomic_output_dir(entry, overwrite=True) as staging:
            save_file(cores, staging / CORES_FILE, metadata={"basis": self.digest})
            config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(
                {module.rsplit(".", 1)[-1] for module in cores}), "psoft_shared": summary, "psoft_basis": self.digest}
            (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @staticmethod
    def tolerance(singular_values: torch.Tensor, k: int, dim: int) -> float:
        """How far from the basis an adapter built by another float32 SVD of the same weight may
        lie: the SVD's backward error (ε·√dim) and the perturbation of the top-k subspace it
        causes (Davis–Kahan, ε·σ₁ / (σ_k − σ_k+1)), times NOISE_FACTOR. A gap within that backward
        error (a rank-deficient weight, tied singular values) leaves the top-k subspace to chance:
        then only the backward error is allowed."""
        S = singular_values.double()
        backward = NOISE_FACTOR * FLOAT32_EPS * dim ** 0.5
        gap = float(S[k - 1] - S[k]) if k < len(S) else float(S[k - 1])
        subspace = NOISE_FACTOR * FLOAT32_EPS * float(S[0]) / gap if gap > backward * float(S[0]) else 0.0
        return backward + subspace

    def zero_adapter(self, module: str, cache_root: Path) -> Path:
        """An all-zero 1×1 core on ``module``: the bare base, served as an adapter on CPU (see serve)."""
        entry = Path(cache_root) / f"cores-zero-{self.digest}"
        if not (entry / CORES_FILE).is_file():
            self._write(entry, {module: torch.zeros(1, 1)}, "zero")
        return entry


def _cores_summary(entry: Path, modules: list[str]) -> str:
    """The residual summary of the cores in ``entry``, once they read back with a core for each of ``modules``."""
    with safe_open(entry / CORES_FILE, framework="pt") as handle:
        missing = set(modules) - set(handle.keys())
    if missing:
        raise KeyError(f"no core for {', '.join(sorted(missing))}")
    return json.loads((entry / ADAPTER_CONFIG).read_text())["psoft_shared"]

"""Shared fixtures: tiny local models (built once per session) and PEFT PSOFT adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PsoftConfig, get_peft_model
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from psoft_deploy.converters.verify import DEFAULT_PROMPTS
from psoft_deploy.model import load_base_model
from psoft_deploy.testing import build_tiny_model

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "o_proj"],
    "mistral": ["q_proj", "v_proj", "up_proj"],
    "opt": ["q_proj", "v_proj", "fc1"],
    "bert": ["query", "value"],
}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """``tiny_base(kind, trained=False, **sizes) -> Path``: a tiny model directory, built once per
    session; ``trained`` ones have memorized verify's prompts, so their top-1 choices there are
    decisive (as a real model's are) instead of random weights' near-ties."""
    built: dict[tuple, Path] = {}

    def build(kind: str = "llama", trained: bool = False, **sizes) -> Path:
        key = (kind, trained, tuple(sorted(sizes.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"base-{kind}")
            build_tiny_model(path, kind, memorize=DEFAULT_PROMPTS if trained else None, **sizes)
            built[key] = path
        return built[key]

    return build


def perturb(peft_model, seed: int = 1, strength: float = 1.0) -> None:
    """Give every PSOFT parameter a trained-like value (R's generator ~ N(0, (0.1·strength)²),
    magnitudes 1 ± 0.05·strength)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".psoft_R." not in name:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("vector_a", "vector_b")):
                param.copy_(1 + 0.05 * strength * noise)
            elif param.dim() == 2:  # free R
                param.copy_(torch.eye(param.shape[0]) + 0.1 * strength * noise)
            else:
                param.copy_(0.1 * strength * noise)


def make_peft_adapter(
    base_dir: Path, out_dir: Path, kind: str = "llama", seed: int = 1, strength: float = 1.0, **config
):
    """A perturbed PEFT PSOFT adapter saved to ``out_dir``; returns the live PEFT model (eval mode)."""
    config.setdefault("target_modules", TARGETS.get(kind))  # None: PEFT's default targets for the architecture
    config.setdefault("r", 4)
    config.setdefault("psoft_alpha", 8)
    peft_model = get_peft_model(load_base_model(base_dir), PsoftConfig(**config))
    perturb(peft_model, seed, strength)
    peft_model.eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


def load_peft(base_dir: Path, adapter_dir: Path):
    return PeftModel.from_pretrained(load_base_model(base_dir), adapter_dir).eval()


def peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's own ``get_delta_weight`` per adapted module, keyed by the base model's module name."""
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "psoft_R") and "default" in module.psoft_R:
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default")
    return deltas


def input_ids(vocab_size: int = 256, batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """‖actual − expected‖ ≤ rtol · ‖expected‖ (Frobenius), the per-tensor tolerance the tests state."""
    error = torch.linalg.norm((actual - expected).double()) / torch.linalg.norm(expected.double())
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.0e}"


def verification_report(directory: Path, label: str | None = None) -> dict:
    """The one check (or the check named ``label``) of a published artifact's verification record."""
    from psoft_deploy.converters.pipeline import read_report

    record = read_report(directory)
    checks = {check["label"]: check for check in record["checks"]}
    assert record["passed"] == all(check["passed"] for check in checks.values())
    return checks[label] if label else record["checks"][0]


def write_adapter(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter directory by hand (adapter_config.json + adapter_model.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({key: value.contiguous() for key, value in tensors.items()}, directory / "adapter_model.safetensors")
    return directory


def paper_rotation_from_spec(a_params, r, terms):
    """The paper's R written independently from its description: K from the lower triangle."""
    K = torch.zeros(r, r, dtype=torch.float64)
    position = 0
    for i in range(r):
        for j in range(i):  # torch.tril_indices(r, r, -1) order: row by row
            K[i, j] = a_params[position]
            position += 1
    K = K - K.T
    eye = torch.eye(r, dtype=torch.float64)
    if terms is None:
        return (eye - K) @ torch.linalg.inv(eye + K)
    if terms <= 0:
        return eye - K
    series = eye + sum(2 * torch.linalg.matrix_power(-K, k) for k in range(1, terms + 1))
    return series + torch.linalg.matrix_power(-K, terms + 1)

"""Adapters written by real PEFT 0.19, 0.20, 0.21 and 0.22 (tests/data/peft_versions, see make_fixtures.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_close_relative, assert_one_line_error, run
from safetensors.torch import load_file

from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import reference_model
from psoft_deploy.core.options import ReadOptions

DATA = Path(__file__).parent / "data" / "peft_versions"
BASE = DATA / "base"
CASES = [
    (version, variant)
    for version in ("0.19.0", "0.20.0", "0.21.2", "0.22.0")
    for variant in ("full_psoft", "full_pissa_neumann", "lowrank_psoft")
    if (version, variant) != ("0.19.0", "lowrank_psoft")
]


@pytest.fixture(autouse=True)
def in_fixture_directory(monkeypatch):
    """The fixtures record their base as ``base``, relative to the directory they were made in."""
    monkeypatch.chdir(DATA)


def svd_tolerance(weight: torch.Tensor, rank: int) -> float:
    """How far float32 rounding (another machine's LAPACK) may move ΔW rebuilt from ``weight``'s top
    singular vectors: 4 × eps · σ₁ / the smallest gap among the top rank + 1 singular values (the
    singular vectors' sensitivity, Davis–Kahan), from the base's own spectrum."""
    values = torch.linalg.svdvals(weight.double())
    gap = (values[:rank] - values[1:rank + 1]).min().item()
    return 4 * torch.finfo(torch.float32).eps * values[0].item() / gap


@pytest.mark.parametrize("version,variant", CASES)
def test_adapter_from_each_peft_version_reproduces_that_version(version, variant):
    adapter = DATA / version / variant
    expected = load_file(adapter / "expected.safetensors")
    factors = load_factors(str(adapter), str(BASE))
    assert factors.adapter.source["peft_version"] == version
    base = BaseCheckpoint(str(BASE))
    tolerances = {name: svd_tolerance(base.tensor(f"{name}.weight"), factors.adapter.rank) for name in factors.modules}
    for name, module in factors.modules.items():
        assert_close_relative(module.delta_weight(), expected[f"delta.{name}"], rtol=tolerances[name])
    with torch.no_grad():
        logits = reference_model(BASE, factors)(expected["input_ids"]).logits
    assert_close_relative(logits, expected["logits"], rtol=max(tolerances.values()))


def test_peft_019_lowrank_adapter_is_refused_and_forcing_it_gives_another_model():
    adapter = DATA / "0.19.0" / "lowrank_psoft"
    with pytest.raises(UserError, match=r"PEFT 0\.19\.0 with psoft_svd='lowrank'.*--force-unseeded"):
        load_factors(str(adapter), str(BASE))
    forced = load_factors(str(adapter), str(BASE), ReadOptions(force_unseeded=True))
    expected = load_file(adapter / "expected.safetensors")
    name = next(iter(forced.modules))
    error = torch.linalg.norm(forced.modules[name].delta_weight() - expected[f"delta.{name}"])
    assert error / torch.linalg.norm(expected[f"delta.{name}"]) > 1e-3


def test_a_regex_target_with_layers_to_transform_is_refused_as_peft_refuses_it(tmp_path):
    """PEFT refuses a str target_modules with layers_to_transform when it reads the config (0.22 moved the
    check from PsoftConfig to PeftConfig, so no release writes one): psoft-deploy refuses it in one line."""
    from peft import PeftConfig

    adapter = tmp_path / "adapter"
    shutil.copytree(DATA / "0.22.0" / "full_psoft", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config |= {"target_modules": r".*\.(q_proj|v_proj|down_proj)", "layers_to_transform": [0]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layers_to_transform"):
        PeftConfig.from_pretrained(adapter)
    result = run("merge", "--base", BASE, "--adapter", adapter, "--output", tmp_path / "merged")
    assert_one_line_error(result, "has a regex target_modules with layers_to_transform, which PEFT refuses to load")
    assert not (tmp_path / "merged").exists()

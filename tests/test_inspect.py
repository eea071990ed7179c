"""`psoft-deploy inspect`: the report's numbers are the adapter's."""

import json

import peft
import pytest
import torch
from helpers import make_peft_adapter, peft_deltas, run
from safetensors.torch import load_file


def inspect_json(*args):
    result = run("inspect", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_report_of_a_peft_adapter_with_its_base(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    peft_model = make_peft_adapter(base_dir, tmp_path / "adapter", r=8, psoft_alpha=16)
    report = inspect_json(tmp_path / "adapter", "--base", base_dir)

    assert report["format"] == "peft" and report["peft_version"] == peft.__version__  # the PEFT that wrote it
    assert report["rank"] == 8 and report["scale"] == 2.0
    assert report["targets"] == ["down_proj", "q_proj", "v_proj"] and report["num_modules"] == 6
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert report["trainable_parameters"] == trainable
    files = [tmp_path / "adapter" / "adapter_config.json", tmp_path / "adapter" / "adapter_model.safetensors"]
    assert report["file_size_bytes"] == sum(f.stat().st_size for f in files)

    state = load_file(base_dir / "model.safetensors")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name, delta in peft_deltas(peft_model).items():
        layer = report["layers"][name]
        assert layer["orthogonality_error"] < 1e-5  # exact Cayley: orthogonal up to rounding
        vector_a = saved[f"base_model.model.{name}.psoft_R.vector_a"]
        assert layer["vector_a_range"] == pytest.approx([vector_a.min().item(), vector_a.max().item()])
        W = state[f"{name}.weight"]
        assert layer["delta_relative_norm"] == pytest.approx((delta.norm() / W.norm()).item(), rel=1e-4)
        S = torch.linalg.svdvals(W)[:9]
        assert layer["min_relative_singular_gap"] == pytest.approx(((S[:-1] - S[1:]) / S[:-1]).min().item(), rel=1e-4)
    assert report["summary"]["orthogonality_error"] == max(l["orthogonality_error"] for l in report["layers"].values())


def test_report_shows_neumann_approximation_error_and_missing_magnitudes(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", use_cayley_neumann=True, num_cayley_neumann_terms=2,
                      psoft_mag_a=False)
    report = inspect_json(tmp_path / "adapter")
    assert report["rotation"]["cayley_neumann"] and report["rotation"]["neumann_terms"] == 2
    assert report["summary"]["orthogonality_error"] > 1e-3  # I + 2Q is far from orthogonal
    assert all(layer["vector_a_range"] is None for layer in report["layers"].values())
    assert "delta_relative_norm" not in next(iter(report["layers"].values()))  # no base: no ‖ΔW‖/‖W‖


def test_human_report_of_a_materialized_adapter(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter")
    run("materialize", "--base", base_dir, "--adapter", tmp_path / "adapter", "--output", tmp_path / "m")
    result = run("inspect", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert f"materialized (from peft), PEFT {peft.__version__}" in result.output
    assert "model.layers.1.mlp.down_proj" in result.output
    assert "max ‖ΔW‖/‖W‖" not in result.output  # needs --base

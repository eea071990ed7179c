"""`psoft-deploy materialize`: self-contained factors that need no SVD and know their base."""

import json
import shutil

import helpers
import pytest
import torch
from safetensors.torch import load_file, save_file

from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import reference_model
from psoft_deploy.core.options import ReadOptions


def materialize(base_dir, adapter_dir, output, *extra):
    return helpers.run("materialize", "--base", base_dir, "--adapter", adapter_dir, "--output", output, *extra)


@pytest.fixture
def no_svd(monkeypatch):
    """Make every SVD entry point fail, to prove a code path runs none."""

    def forbidden(*args, **kwargs):
        raise AssertionError("an SVD ran")

    for name in ("svd", "svdvals"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    monkeypatch.setattr(torch, "svd_lowrank", forbidden)
    monkeypatch.setattr(torch, "svd", forbidden)


@pytest.mark.parametrize("variant", [{}, {"psoft_svd": "lowrank", "random_seed": 5}, {"ab_svd_init": "pissa_init"}])
def test_materialized_adapter_reproduces_peft_without_any_svd(variant, tiny_base, tmp_path, request):
    base_dir = tiny_base("llama")
    peft_model = helpers.make_peft_adapter(base_dir, tmp_path / "adapter", **variant)
    result = materialize(base_dir, tmp_path / "adapter", tmp_path / "materialized")
    assert result.exit_code == 0, result.output
    request.getfixturevalue("no_svd")
    factors = load_factors(str(tmp_path / "materialized"), str(base_dir))
    assert factors.adapter.format == "materialized"
    ids = helpers.input_ids()
    with torch.no_grad():
        helpers.assert_close_relative(reference_model(base_dir, factors)(ids).logits, peft_model(ids).logits)


def test_materialized_metadata_records_provenance(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    helpers.make_peft_adapter(base_dir, tmp_path / "adapter")
    result = materialize(base_dir, tmp_path / "adapter", tmp_path / "m", "--svd-dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "m" / "psoft_deploy.json").read_text())
    assert meta["source"]["format"] == "peft" and meta["source"]["peft_version"]
    assert meta["svd"]["backend"] == "full" and meta["svd"]["device"] == "cpu"
    assert meta["svd"]["dtype"] == "bfloat16"
    module = "model.layers.0.self_attn.q_proj"
    base = load_file(base_dir / "model.safetensors")
    fingerprint = meta["modules"][module]["fingerprint"]
    assert fingerprint["dtype"] == "float32" and fingerprint["shape"] == list(base[f"{module}.weight"].shape)
    tensors = load_file(tmp_path / "m" / "psoft_factors.safetensors")
    assert {f"{module}.{kind}" for kind in ("A", "B", "R", "generator")} <= set(tensors)
    # no temporary siblings left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "m"]


def test_materialized_adapter_refuses_another_base_unless_allowed(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    helpers.make_peft_adapter(base_dir, tmp_path / "adapter")
    assert materialize(base_dir, tmp_path / "adapter", tmp_path / "m").exit_code == 0
    changed = tmp_path / "changed-base"
    shutil.copytree(base_dir, changed)
    state = load_file(changed / "model.safetensors")
    state["model.layers.1.self_attn.v_proj.weight"][0, 0] += 1e-3
    save_file(state, changed / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(UserError, match="model.layers.1.self_attn.v_proj.weight differs"):
        load_factors(str(tmp_path / "m"), str(changed))
    with pytest.warns(UserWarning, match="allow-base-mismatch"):
        load_factors(str(tmp_path / "m"), str(changed), ReadOptions(allow_base_mismatch=True))

    helpers.assert_one_line_error(helpers.run("inspect", tmp_path / "m", "--base", changed), "Error: base tensor")


def test_existing_output_is_kept_unless_overwrite(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    helpers.make_peft_adapter(base_dir, tmp_path / "adapter")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    result = materialize(base_dir, tmp_path / "adapter", tmp_path / "m")
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (tmp_path / "m" / "keep.txt").exists()
    assert materialize(base_dir, tmp_path / "adapter", tmp_path / "m", "--overwrite").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["psoft_deploy.json", "psoft_factors.safetensors",
                                                              "psoft_verification.json"]


def test_materializing_a_paper_checkpoint_keeps_its_factors(tiny_base, tmp_path):

    base_dir = tiny_base("llama")
    helpers.make_paper_checkpoint(base_dir, tmp_path / "paper", tmp_path / "residual")
    assert materialize(base_dir, tmp_path / "paper", tmp_path / "m").exit_code == 0
    original = load_factors(str(tmp_path / "paper"), str(base_dir))
    materialized = load_factors(str(tmp_path / "m"), str(base_dir))
    assert materialized.adapter.source["format"] == "paper"
    for name, module in original.modules.items():
        assert torch.equal(materialized.modules[name].delta_weight(), module.delta_weight())

"""mlx-lm adapters (`export-lora --target mlx`) run by mlx-lm itself (`pip install -e '.[mlx]'`): mlx-lm's own
greedy decoding of the export equals transformers + PEFT's, the bare base's does not; verify runs the adapter in
mlx-lm against the float64 truth, and an adapter holding half the update fails there, not only in its files.
Without mlx, the files alone are judged (test_export_lora.py)."""

import json
import shutil

import pytest
import torch
from helpers import load_peft, make_peft_adapter, mlx_lm_greedy, run, verification_report
from safetensors.torch import load_file, save_file

from psoft_deploy.converters.verify.inputs import prompt_sequences, verification_inputs
from psoft_deploy.converters.verify.reference import greedy

pytestmark = pytest.mark.slow
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def exported(tiny_base, tmp_path_factory):
    """A tiny trained Llama, an adapter, and its mlx-lm export (verified by mlx-lm on the way)."""
    base = tiny_base("llama", trained=True)
    work = tmp_path_factory.mktemp("mlx")
    make_peft_adapter(base, work / "adapter", r=8)
    result = run("export-lora", "--base", base, "--adapter", work / "adapter", "--output", work / "mlx",
                 "--target", "mlx")
    assert result.exit_code == 0 and result.stdout.startswith("verification: PASS (full, float32)"), result.output
    return base, work


def test_mlx_lm_runs_the_export_as_peft_does(exported):
    base, work = exported
    report = verification_report(work / "mlx")
    assert report["runtime"].startswith("mlx-lm ") and report["files"]["passed"] and report["base_in_mlx"]["passed"]
    assert not report["bare_base"]["passes_bounds"] and report["decisive_top1_agreement"] == 1.0, report
    inputs, _ = verification_inputs([base], None, json.loads((base / "config.json").read_text()))
    sequences = [tokens[:len(tokens) // 2] for tokens in prompt_sequences(inputs)]
    actual, stop = mlx_lm_greedy(base, work / "mlx", sequences, NEW_TOKENS)
    peft = load_peft(base, work / "adapter")
    expected = [greedy(peft, tokens, NEW_TOKENS, stop) for tokens in sequences]
    assert actual == expected
    assert mlx_lm_greedy(base, None, sequences, NEW_TOKENS)[0] != expected


def test_an_mlx_adapter_holding_half_the_update_fails_in_mlx_lm(exported, tmp_path):
    """v_proj's lora_b zeroed (q_proj's and down_proj's kept): mlx-lm runs it, and its logits fail the
    bounds, besides its files."""
    base, work = exported
    shutil.copytree(work / "mlx", tmp_path / "half")
    weights = tmp_path / "half" / "adapters.safetensors"
    tensors = load_file(weights)
    save_file({key: torch.zeros_like(value) if key.endswith("v_proj.lora_b") else value
               for key, value in tensors.items()}, weights)
    result = run("verify", "--base", base, "--adapter", work / "adapter", "--candidate", tmp_path / "half", "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    print({key: report[key] for key in ("failed_checks", "mean_abs_logits", "max_abs_logits", "bounds")})
    assert report["mode"] == "full" and report["runtime"].startswith("mlx-lm ") and not report["files"]["passed"]
    assert any(check.startswith("mean_abs_logits") for check in report["failed_checks"]), report["failed_checks"]


def test_a_base_mlx_lm_computes_otherwise_fails(exported, tmp_path):
    """mlx-lm 0.32 reads ``rope_theta``, not transformers 5's ``rope_parameters``: a base whose RoPE base is
    only there runs in mlx-lm as another model (SmolLM2 as transformers 5 writes it). Its run is the
    candidate's noise, so it is checked against transformers' base, and fails."""
    base, work = exported
    shutil.copytree(base, tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 1000.0
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    result = run("verify", "--base", tmp_path / "base", "--adapter", work / "adapter", "--candidate", work / "mlx",
                 "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert not report["base_in_mlx"]["passed"] and report["files"]["passed"], report
    assert any(check.startswith("the base in mlx-lm vs transformers") for check in report["failed_checks"])

"""`psoft-deploy demo` runs the whole flow offline and checks itself."""

import json

import pytest
from helpers import run


@pytest.mark.slow
def test_demo_trains_inspects_merges_and_exports(tmp_path):
    result = run("demo", "--output", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "max |Δlogits| PEFT (float32) vs psoft-deploy" in line)
    measured, bound = (float(part.split()[0].rstrip(":")) for part in (line.split("= ")[1], line.split("(bound ")[1]))
    assert 0 <= measured <= bound, line  # PEFT within float32's own noise, measured in the run
    assert result.output.count("verification: PASS") == 2
    summary = json.loads((tmp_path / "demo" / "psoft-adapter" / "training_summary.json").read_text())
    assert summary["steps"] == 30 and summary["final_loss"] < summary["first_loss"]
    for artifact in ("merged/model.safetensors", "lora/adapter_model.safetensors", "psoft-adapter/psoft_deploy.json"):
        assert (tmp_path / "demo" / artifact).is_file()


def test_demo_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run("demo", "--output", tmp_path)
    assert result.exit_code == 1 and "not empty" in result.output

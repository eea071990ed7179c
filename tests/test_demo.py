"""`psoft-deploy demo` runs the whole flow offline and checks itself."""

import json

from click.testing import CliRunner

from psoft_deploy.cli import cli


def test_demo_trains_materializes_and_verifies(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--output", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "(fp32 tolerance 1e-4): PASS" in result.output
    first, last = (float(x) for x in result.output.split("loss ")[1].split("\n")[0].split(" -> "))
    assert last < first, "training must lower the loss"
    meta = json.loads((tmp_path / "demo" / "materialized" / "psoft_deploy.json").read_text())
    assert meta["source"]["format"] == "peft" and len(meta["modules"]) == 6


def test_demo_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(cli, ["demo", "--output", str(tmp_path)])
    assert result.exit_code == 1 and "not empty" in result.output

"""Bad input: one clear error line, exit status 1, no traceback, no partial output."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import assert_one_line_error, make_peft_adapter, run
from safetensors.torch import load_file, save_file


def break_adapter(llama_adapter, tmp_path, how):
    base_dir, adapter_dir = llama_adapter
    broken = tmp_path / "adapter"
    shutil.copytree(adapter_dir, broken)
    weights, config_file = broken / "adapter_model.safetensors", broken / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if how == "missing weights":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif how == "not json":
        config_file.write_text("{not json")
    elif how == "unknown peft_type":
        config_file.write_text(json.dumps(config | {"peft_type": "BOFT"}))
    elif how == "nan":
        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("psoft_R.weight"))
        tensors[key][0] = float("nan")
        save_file(tensors, weights)
    elif how == "pickle only":
        weights.rename(broken / "adapter_model.bin")
    elif how == "bad rank":
        config_file.write_text(json.dumps(config | {"r": 0}))
    elif how == "wrong generator size":
        config_file.write_text(json.dumps(config | {"r": 4}))
    return base_dir, broken


@pytest.mark.parametrize(
    "how,fragment",
    [
        ("missing weights", "is missing"),
        ("truncated", "not a readable safetensors file"),
        ("not json", "not readable JSON"),
        ("unknown peft_type", "peft_type 'BOFT'"),
        ("nan", "NaN or Inf"),
        ("pickle only", "safetensors only"),
        ("bad rank", "positive integer"),
        ("wrong generator size", "expected (6,) for r=4"),
    ],
)
def test_broken_adapter(how, fragment, llama_adapter, tmp_path):
    base_dir, broken = break_adapter(llama_adapter, tmp_path, how)
    result = run("materialize", "--base", base_dir, "--adapter", broken, "--output", tmp_path / "out")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "no partial output may be left behind"


def test_missing_adapter_and_non_adapter_directory(llama_adapter, tmp_path):
    base_dir, _ = llama_adapter
    assert_one_line_error(run("inspect", tmp_path / "nowhere"), "does not exist")
    assert_one_line_error(run("inspect", base_dir), "no adapter_config.json")


def test_adapter_for_another_base(llama_adapter, tiny_base, tmp_path):
    base_dir, adapter_dir = llama_adapter
    fewer_layers = tiny_base("llama", layers=1)
    result = run("materialize", "--base", fewer_layers, "--adapter", adapter_dir, "--output", tmp_path / "out")
    assert_one_line_error(result, "has no tensor 'model.layers.1.")
    narrow = tiny_base("llama", hidden=32)
    assert run("materialize", "--base", base_dir, "--adapter", adapter_dir, "--output", tmp_path / "m").exit_code == 0
    result = run("inspect", tmp_path / "m", "--base", narrow)
    assert_one_line_error(result, "another base")


def test_rank_larger_than_the_layer(tiny_base, tmp_path):
    wide, narrow = tiny_base("llama"), tiny_base("llama", hidden=16)
    make_peft_adapter(wide, tmp_path / "adapter", r=32, psoft_alpha=32, target_modules=["q_proj"])
    result = run("materialize", "--base", narrow, "--adapter", tmp_path / "adapter", "--output", tmp_path / "out")
    assert_one_line_error(result, "rank r=32 exceeds the size")


def test_base_errors(llama_adapter, tmp_path):
    base_dir, adapter_dir = llama_adapter
    pickled = tmp_path / "pickled-base"
    pickled.mkdir()
    shutil.copy(base_dir / "config.json", pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    result = run("materialize", "--base", pickled, "--adapter", adapter_dir, "--output", tmp_path / "out")
    assert_one_line_error(result, "pickled weights")
    result = run("materialize", "--base", "not a/valid//hub id", "--adapter", adapter_dir, "--output", tmp_path / "o")
    assert_one_line_error(result, "neither a local directory nor a valid hub id")
    result = run("inspect", adapter_dir)  # a PEFT adapter without --base still inspects
    assert result.exit_code == 0 and "peft" in result.output


def test_console_script_prints_no_traceback(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "psoft_deploy", "inspect", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 1
    assert process.stderr.strip() == f"Error: adapter {tmp_path / 'missing'} does not exist"
    assert process.stdout == ""


def test_usage_errors_exit_2_and_errors_in_the_input_1(tmp_path):
    """As README says: click's usage errors exit 2 (with usage), errors in the input 1 (one line)."""
    for usage in (["merge", "--bogus"], ["merge", "--base", tmp_path],
                  ["verify", "--base", tmp_path, "--adapter", tmp_path, "--candidate", tmp_path / "missing"]):
        result = run(*usage)
        assert result.exit_code == 2 and "Usage:" in result.output, result.output
    assert_one_line_error(run("inspect", tmp_path / "missing"), "does not exist")


def test_unusable_svd_device(llama_adapter, tmp_path):
    base_dir, adapter_dir = llama_adapter
    result = run("materialize", "--base", base_dir, "--adapter", adapter_dir, "--output", tmp_path / "out",
                 "--svd-device", "quantum")
    assert_one_line_error(result, "--svd-device 'quantum' is not usable here")
    assert not (tmp_path / "out").exists()


def test_verbose_shows_what_led_to_a_one_line_error(tmp_path, monkeypatch):
    """An error reported in one line keeps the traceback of what raised it for --verbose (here the hub
    download of a base; an exception inside our own export code is reported the same way)."""
    def broken(*args, **kwargs):
        raise OSError("the hub cache is unreadable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", broken)
    merge = ("merge", "--base", "someorg/llama", "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert_one_line_error(run(*merge), "could not fetch base 'someorg/llama' from the hub (OSError)")
    verbose = run(*merge, "--verbose")
    assert verbose.exit_code == 1 and "Traceback" in verbose.output, verbose.output
    assert "OSError: the hub cache is unreadable" in verbose.output
    assert verbose.output.strip().splitlines()[-1].startswith("Error: could not fetch base")

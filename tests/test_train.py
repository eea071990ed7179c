"""`psoft-deploy train`: trains on PsoftLinear, saves a PEFT adapter PEFT reproduces, and factors
every converter takes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_close_relative, input_ids, load_peft
from safetensors.torch import load_file

from psoft_deploy.cli import cli
from psoft_deploy.factors import load_factors
from psoft_deploy.model import reference_model

DATA = Path(__file__).parent / "data" / "tiny_text.txt"


def run(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def train_args(base, output, *extra):
    return ["train", "--base_model_name_or_path", base, "--output_dir", output, "--data_path", DATA,
            "--max_length", 32, "--per_device_train_batch_size", 8, "--learning_rate", 2e-2, "--r", 8,
            "--psoft_alpha", 8, "--target_modules", "q_proj", "v_proj", "down_proj", "--logging_steps", 2, *extra]


def test_training_lowers_the_loss_and_peft_reproduces_the_adapter(tiny_base, tmp_path):
    base = tiny_base("llama")
    result = run(*train_args(base, tmp_path / "out", "--max_steps", 16, "--save_steps", 1000))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    history = summary["loss_history"]
    assert summary["steps"] == 16 and len(history) == 8
    assert sum(history[-2:]) < sum(history[:2]), history

    factors = load_factors(str(tmp_path / "out"), str(base))  # materialized: no SVD
    assert factors.adapter.format == "materialized" and factors.adapter.source["format"] == "peft"
    ids = input_ids()
    with torch.no_grad():
        ours = reference_model(base, factors)(ids).logits
        peft = load_peft(base, tmp_path / "out")(ids).logits
        from psoft_deploy.model import load_base_model

        untrained = load_base_model(base)(ids).logits
    assert (ours - untrained).abs().max() > 1e-3
    assert_close_relative(peft, ours, 1e-5)

    for command in ("merge", "export-lora"):
        converted = run(command, "--base", base, "--adapter", tmp_path / "out", "--output", tmp_path / command)
        assert converted.exit_code == 0 and "verification: PASS" in converted.output, converted.output


def test_checkpoints_are_adapters_and_resuming_continues_the_same_run(tiny_base, tmp_path):
    base = tiny_base("llama")
    straight = run(*train_args(base, tmp_path / "straight", "--max_steps", 6, "--save_steps", 2))
    assert straight.exit_code == 0, straight.output
    checkpoint = tmp_path / "straight" / "checkpoints" / "checkpoint-4"
    assert [f.name for f in checkpoint.glob("*.safetensors")] == ["adapter_model.safetensors"], "no copy of the base"
    assert all(".psoft_R." in key for key in load_file(checkpoint / "adapter_model.safetensors"))
    with torch.no_grad():  # a checkpoint is a PEFT adapter as it stands
        mid_run = load_peft(base, checkpoint)(input_ids()).logits
        reference = reference_model(base, load_factors(str(checkpoint), str(base)))(input_ids()).logits
    assert_close_relative(mid_run, reference, 1e-5)

    for other_run in (["--target_modules", "q_proj", "v_proj"], ["--r", 4]):  # last option wins in argparse
        refused = run(*train_args(base, tmp_path / "other", "--max_steps", 6, "--resume_from_checkpoint", checkpoint,
                                  *other_run))
        assert refused.exit_code == 1 and "holds another adapter than this run's" in refused.output, refused.output
        assert "Traceback" not in refused.output and not (tmp_path / "other" / "adapter_model.safetensors").exists()

    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / "checkpoint-4")
    resumed = run(*train_args(base, tmp_path / "resumed", "--max_steps", 6, "--save_steps", 2,
                              "--resume_from_checkpoint", "latest"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "resumed" / "training_summary.json").read_text())["steps"] == 6
    expected, actual = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("straight", "resumed"))
    assert expected.keys() == actual.keys()
    for key in expected:  # steps 5 and 6 redone from the checkpoint: the same adapter as the run that went on
        assert torch.allclose(actual[key], expected[key], rtol=0, atol=1e-6), key


def test_quick_start_command_line(tmp_path):
    """The method's published quick start, with local paths for the hub names."""
    from psoft_deploy.tiny import build_tiny_model

    build_tiny_model(tmp_path / "llama", "llama", hidden=128, heads=2)  # r=128 fits its 128×128 layers
    lines = DATA.read_text().splitlines()
    (tmp_path / "imdb.txt").write_text("\n".join(lines * 10) + "\n")  # 400 lines: 1% is 4 examples
    command = (f"psoft-deploy train --base_model_name_or_path {tmp_path / 'llama'} --output_dir "
               f"{tmp_path / 'outputs/psoft-llama3.2-3b-imdb'} --data_path {tmp_path / 'imdb.txt'} "
               '--dataset_split "train[:1%]" --max_length 128 --num_train_epochs 1 '
               "--per_device_train_batch_size 1 --gradient_accumulation_steps 8 --learning_rate 5e-4 "
               "--bits bf16 --r 128 --psoft_alpha 128 --target_modules q_proj v_proj")
    process = subprocess.run(["bash", "-c", command.replace("psoft-deploy", f"{sys.executable} -m psoft_deploy", 1)],
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    output = tmp_path / "outputs/psoft-llama3.2-3b-imdb"
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["examples"] == 4 and summary["arguments"]["target_modules"] == ["q_proj", "v_proj"]
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 128 and config["psoft_alpha"] == 128 and config["peft_type"] == "PSOFT"
    meta = json.loads((output / "psoft_deploy.json").read_text())
    assert meta["svd"]["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "extra,data,fragment",
    [
        (["--target_modules", "q_proj", "nonexistent"], None, "nonexistent match no linear layer"),
        (["--r", "80"], None, "--r 80 exceeds the size of"),
        ([], "empty.txt", "holds no non-empty 'text' examples"),
        (["--dataset_text_field", "body"], None, "has no column 'body'"),
        (["--resume_from_checkpoint", "latest"], None, "no checkpoint in"),
        (["--resume_from_checkpoint", "no/such/checkpoint-9"], None, "holds no adapter_model.safetensors"),
        ([], "broken.parquet", "cannot read data"),
        ([], "missing.txt", "cannot read data"),
        ([], "notes.docx", "must be a .txt"),
    ],
)
def test_bad_input_fails_before_training(extra, data, fragment, tiny_base, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "notes.docx").write_text("x")
    args = train_args(tiny_base("llama"), tmp_path / "out", *extra)
    if data:
        args[args.index("--data_path") + 1] = tmp_path / data
    if data == "missing.txt":
        args[args.index("--data_path") + 1] = "no/such/dataset-name"
    result = run(*args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and fragment in lines[-1] and "Traceback" not in result.output, lines
    assert not (tmp_path / "out").exists(), "nothing may be written when the input is bad"

"""One pipeline for every artifact, one options value for reading adapters, consistent CLI."""

import asyncio
import json
import shutil

import click
import pytest
import torch
from helpers import make_peft_adapter, run
from safetensors.torch import load_file, save_file

from psoft_deploy.cli import cli
from psoft_deploy.converters.pipeline import REPORT_FILE, read_report
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.options import ReadOptions

REPORT_KEYS = {"tool", "artifact", "passed", "checks", "base_identity"}
CHECK_KEYS = {"label", "mode", "dtype", "tolerance", "passed", "failed_checks"}


@pytest.mark.slow
def test_every_artifact_carries_one_report_schema(tiny_base, tmp_path):
    """materialize, merge, export-lora, export-onnx (merged and adapters as inputs) and a serve-cache
    conversion all publish through the pipeline, each with the same verification record."""
    from psoft_deploy.serve.cache import LoraCache

    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter", r=4)
    commands = {
        "materialized": ("materialize", "--output", tmp_path / "materialized"),
        "merged": ("merge", "--output", tmp_path / "merged"),
        "lora": ("export-lora", "--output", tmp_path / "lora"),
        "onnx": ("export-onnx", "--output", tmp_path / "onnx"),
    }
    for name, (command, *rest) in commands.items():
        result = run(command, "--base", base, "--adapter", tmp_path / "adapter", *rest)
        assert result.exit_code == 0, result.output
    result = run("export-onnx", "--base", base, "--adapters-as-inputs", "--adapter", f"a={tmp_path / 'adapter'}",
                 "--output", tmp_path / "inputs")
    assert result.exit_code == 0, result.output
    cached, _ = LoraCache(tmp_path / "cache", BaseCheckpoint(str(base))).prepare(tmp_path / "adapter")
    expected_labels = {"materialized": ["materialized adapter"], "merged": ["merged model"], "lora": ["LoRA adapter"],
                       "onnx": ["adapter (LoRA form)"], "inputs": ["adapter a"], cached: ["LoRA adapter"]}
    for directory, labels in expected_labels.items():
        record = read_report(tmp_path / directory)
        assert record.keys() == REPORT_KEYS and record["passed"], directory
        assert [check["label"] for check in record["checks"]] == labels
        assert [entry["status"] for entry in record["base_identity"]] == ["confirmed"], directory  # its base's name
        for check in record["checks"]:
            assert CHECK_KEYS <= check.keys() and check["passed"], (directory, check)
    assert read_report(cached)["checks"][0]["mode"] == "layerwise"


@pytest.mark.slow
def test_no_verify_writes_no_report(tiny_base, tmp_path):
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter", r=4)
    for command in ("merge", "export-lora", "export-onnx"):
        result = run(command, "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / command,
                     "--no-verify")
        assert result.exit_code == 0 and "verification: not run" in result.output, result.output
        assert not (tmp_path / command / REPORT_FILE).exists(), command


def resolve(root, base, cache, name, options: ReadOptions, monkeypatch):
    """What the resolver plugin answers for ``name``, configured through the environment as serve does."""
    from psoft_deploy.serve.resolver import PsoftResolver  # a vLLM plugin: vLLM is part of the install

    for key, value in options.to_env().items():
        monkeypatch.setenv(key, value)
    resolver = PsoftResolver(root=root, base=str(base), cache_dir=cache, max_lora_rank=None)
    return asyncio.run(resolver.resolve_lora(str(base), name))


@pytest.mark.slow
def test_the_resolver_honours_the_read_options(tiny_base, tmp_path, monkeypatch):
    base = tiny_base("llama")
    root = tmp_path / "root"
    make_peft_adapter(base, root / "peft", r=4)
    request = resolve(root, base, tmp_path / "cache", "peft", ReadOptions(svd_dtype="bfloat16"), monkeypatch)
    lora = load_file(f"{request.lora_path}/adapter_model.safetensors")
    for options in (ReadOptions(svd_dtype="bfloat16"), ReadOptions()):
        factors = load_factors(str(root / "peft"), str(base), options)
        name, module = next(iter(factors.modules.items()))
        same = torch.equal(lora[f"base_model.model.{name}.lora_A.weight"], module.lora()[0])
        assert same == (options.svd_dtype == "bfloat16"), "A rebuilt from the bf16-cast base, as asked"

    changed = tmp_path / "changed"
    shutil.copytree(base, changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] *= 1.001
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    assert run("materialize", "--base", base, "--adapter", root / "peft", "--output", root / "mat").exit_code == 0
    assert resolve(root, changed, tmp_path / "cache", "mat", ReadOptions(), monkeypatch) is None
    assert resolve(root, changed, tmp_path / "cache", "mat", ReadOptions(allow_base_mismatch=True),
                   monkeypatch) is not None


def test_every_option_has_help_and_every_command_an_example():
    from psoft_deploy.train_args import parser

    for name, command in cli.commands.items():
        assert "Example" in (command.help or ""), f"{name} --help shows no example"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts[0]} has no help"
    train = parser()  # `psoft-deploy train --help` is the quick-start script's own argparse help
    assert "example:" in train.format_help()
    assert all(action.help for action in train._actions), "every train option has help"


def test_inspect_takes_the_adapter_as_an_option_or_an_argument(tiny_base, tmp_path):
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter", r=4)
    by_option = run("inspect", "--adapter", tmp_path / "adapter", "--base", base, "--json")
    by_argument = run("inspect", tmp_path / "adapter", "--base", base, "--json")
    assert by_option.exit_code == by_argument.exit_code == 0, by_option.output
    assert json.loads(by_option.output) == json.loads(by_argument.output)
    result = run("inspect", tmp_path / "adapter", "--adapter", tmp_path / "adapter")
    assert result.exit_code == 1 and "give the adapter once" in result.output

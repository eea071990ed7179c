"""Never a PASS on a broken artifact: the base is identified by content (fingerprints recorded by
every PEFT adapter psoft-deploy writes, an absolute path, fail closed), and an adapter whose config
and weights disagree is converted as PEFT loads it or refused, in one line (issues 23 and 26)."""

import json
import os
import shutil
import warnings

import pytest
import torch
from helpers import assert_close_relative, assert_one_line_error, load_peft, make_peft_adapter, run
from safetensors.torch import load_file, save_file

from psoft_deploy.converters.pipeline import read_report
from psoft_deploy.core import factors as factors_module
from psoft_deploy.core.formats import BASE_RECORD
from psoft_deploy.core.model import load_base_model

DATA = os.path.join(os.path.dirname(__file__), "data", "tiny_text.txt")
TARGETS = ["q_proj", "v_proj", "o_proj"]
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """(fp32 base, train's output): `psoft-deploy train` run from the base's parent, given the base
    by a path relative to it."""
    base = tiny_base("llama")
    output = tmp_path_factory.mktemp("trained") / "adapter"
    cwd = os.getcwd()
    os.chdir(base.parent)
    try:
        result = run("train", "--base_model_name_or_path", base.name, "--output_dir", output, "--data_path", DATA,
                     "--max_steps", 2, "--save_steps", 2, "--max_length", 32, "--per_device_train_batch_size", 8,
                     "--learning_rate", 2e-2, "--r", 8, "--psoft_alpha", 8, "--target_modules", *TARGETS)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return base, output


@pytest.fixture
def bf16_copy(trained, tmp_path):
    """The same base with every floating tensor stored in bfloat16."""
    copy = tmp_path / "llama-bf16"
    shutil.copytree(trained[0], copy)
    tensors = load_file(copy / "model.safetensors")
    save_file({key: value.to(torch.bfloat16) if value.is_floating_point() else value
               for key, value in tensors.items()}, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def peft_files(output, directory, *extra):
    """The PEFT adapter files of train's output (and ``extra`` files) alone in ``directory``."""
    directory.mkdir()
    for name in (*PEFT_FILES, *extra):
        shutil.copy(output / name, directory)
    return directory


def test_train_records_the_base_by_absolute_path_and_fingerprints(trained):
    base, output = trained
    checkpoint = output / "checkpoints" / "checkpoint-2"
    for directory in (output, checkpoint):
        assert json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
        record = json.loads((directory / BASE_RECORD).read_text())
        assert record["name_or_path"] == str(base)
        stored = load_file(base / "model.safetensors")
        assert set(record["tensors"]) == {key for key in stored if key.endswith(tuple(f"{t}.weight" for t in TARGETS))}
        for key, fingerprint in record["tensors"].items():
            assert fingerprint["dtype"] == "float32" and fingerprint["shape"] == list(stored[key].shape)
    with warnings.catch_warnings(record=True) as caught:  # PEFT reads the adapter as it reads its own
        warnings.simplefilter("always")
        load_peft(base, output)
    assert not [warning for warning in caught if "Unexpected keyword" in str(warning.message)]


def test_peft_files_on_a_bf16_copy_from_another_directory_are_refused(trained, bf16_copy, tmp_path, monkeypatch):
    base, output = trained
    monkeypatch.chdir(tmp_path)  # not the directory train ran in
    key = "model.layers.0.self_attn.o_proj.weight"
    for adapter in (peft_files(output, tmp_path / "peft", BASE_RECORD), output):
        result = run("merge", "--base", bf16_copy, "--adapter", adapter, "--output", tmp_path / "merged")
        assert_one_line_error(result, "base tensor model.layers.0.self_attn.q_proj.weight differs", "in its dtype",
                              "--allow-base-mismatch")
        assert not (tmp_path / "merged").exists()
    # the PEFT files alone: the recorded absolute path names the fp32 base on this machine
    result = run("merge", "--base", bf16_copy, "--adapter", peft_files(output, tmp_path / "bare"), "--output",
                 tmp_path / "merged")
    assert_one_line_error(result, f"was trained on {base}, not on the base given", "holds other weights")

    allowed = run("merge", "--base", bf16_copy, "--adapter", tmp_path / "peft", "--output", tmp_path / "merged",
                  "--allow-base-mismatch")
    assert allowed.exit_code == 0, allowed.output
    assert allowed.output.startswith("Warning: base tensor model.layers.0.self_attn.q_proj.weight differs")
    assert "proceeding because --allow-base-mismatch was given" in allowed.output.splitlines()[0]

    same = run("merge", "--base", base, "--adapter", tmp_path / "peft", "--output", tmp_path / "exact")
    assert same.exit_code == 0 and "verification: PASS" in same.output, same.output
    assert not same.output.startswith("Warning")
    assert not torch.equal(load_file(tmp_path / "exact" / "model.safetensors")[key],
                           load_file(base / "model.safetensors")[key])


def test_the_base_check_fails_closed(tiny_base, tmp_path, monkeypatch):
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    merge = ("merge", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")

    def broken(*args, **kwargs):
        raise OSError("the hub cache is unreadable")

    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": "org/llama"}))
    monkeypatch.setattr("huggingface_hub.snapshot_download", broken)
    assert_one_line_error(run(*merge), f"could not check that {base} is the base", "(org/llama): OSError: the hub "
                          "cache is unreadable", "--allow-base-mismatch")

    copy = tmp_path / "copy"  # a local base named by the adapter, whose weights cannot be compared
    shutil.copytree(base, copy)
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": str(copy)}))
    monkeypatch.setattr(factors_module, "_weights_difference", broken)
    assert_one_line_error(run(*merge), f"could not check that {base} is the base", f"({copy}): OSError")
    assert not (tmp_path / "merged").exists()
    allowed = run(*merge, "--allow-base-mismatch")
    assert allowed.exit_code == 0 and allowed.output.startswith("Warning: could not check"), allowed.output


@pytest.mark.parametrize("recorded", [None, "/home/alice/models/llama", "someorg/uncached-llama"])
def test_a_base_nothing_contradicts_is_used_saying_what_was_not_checked(recorded, tiny_base, tmp_path):
    """No record of the base (a custom model's adapter), a path on another machine, a hub id neither
    cached here nor named by the base given (a plain local directory): nothing confirms the base and
    nothing contradicts it. Merged and verified without a flag, one line on stderr, the reason in the
    artifact's report."""
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter")
    with_config(tmp_path / "adapter", base_model_name_or_path=recorded)
    reason = ("it records neither its base's fingerprints nor" if recorded is None
              else f"({recorded}): {recorded} is {'a path absent here' if recorded.startswith('/') else 'neither'}")
    result = run("merge", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert result.exit_code == 0 and "verification: PASS" in result.output, result.output
    said = result.stderr.splitlines()
    assert len(said) == 1 and said[0].startswith(f"Warning: not checked that {base} is the base adapter"), said
    assert reason in said[0] and said[0].endswith("proceeding, as nothing contradicts it")
    (identity,) = read_report(tmp_path / "merged")["base_identity"]
    assert identity["status"] == "not checked" and reason in identity["detail"]
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # a process shows a warning once; this is a second command in one process
        verified = run("verify", "--base", base, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "merged",
                       "--json")
    assert verified.exit_code == 0 and verified.stderr.startswith("Warning: not checked"), verified.output
    assert json.loads(verified.stdout)["base_identity"] == {"status": "not checked", "detail": identity["detail"]}


def test_a_base_whose_own_files_name_the_claimed_base_is_confirmed(tiny_base, tmp_path):
    """A hub id beside a plain local directory (``--local-dir``) whose config.json names it."""
    base = tmp_path / "local-dir"
    shutil.copytree(tiny_base("llama"), base)
    config_file = base / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"_name_or_path": "SomeOrg/Llama-Tiny"}))
    make_peft_adapter(base, tmp_path / "adapter")
    with_config(tmp_path / "adapter", base_model_name_or_path="someorg/llama-tiny")
    result = run("merge", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert result.exit_code == 0 and not result.stderr, result.output
    (identity,) = read_report(tmp_path / "merged")["base_identity"]
    assert identity == {"adapter": str(tmp_path / "adapter"), "status": "confirmed",
                        "detail": "the base's own files name it someorg/llama-tiny, as the adapter does"}


def test_a_claimed_base_here_with_another_architecture_is_refused(tiny_base, tmp_path):
    base, other = tiny_base("llama"), tiny_base("qwen2")
    make_peft_adapter(base, tmp_path / "adapter")
    with_config(tmp_path / "adapter", base_model_name_or_path=str(other))
    result = run("merge", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert_one_line_error(result, f"was trained on {other}, not on the base given", "architecture Qwen2ForCausalLM "
                          "there, LlamaForCausalLM here", "--allow-base-mismatch")
    assert not (tmp_path / "merged").exists()


def with_config(adapter, **changes):
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | changes))


@pytest.fixture
def adapter(tiny_base, tmp_path):
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter", target_modules=TARGETS)
    return base, tmp_path / "adapter"


def test_weights_of_a_module_the_config_does_not_target_are_refused(adapter, tmp_path):
    base, adapter_dir = adapter
    with_config(adapter_dir, target_modules=["q_prj", "v_proj", "o_proj"])
    peft = load_peft(base, adapter_dir)  # what PEFT serves: q_proj dropped without a word
    assert not hasattr(peft.get_submodule("base_model.model.model.layers.0.self_attn.q_proj"), "psoft_R")
    result = run("merge", "--base", base, "--adapter", adapter_dir, "--output", tmp_path / "merged")
    assert_one_line_error(result, "holds weights for model.layers.0.self_attn.q_proj and 1 more modules",
                          "does not target", "Correct target_modules")
    assert not (tmp_path / "merged").exists()

    with_config(adapter_dir, target_modules=TARGETS, layers_to_transform=[0])  # PEFT's matching, layers included
    result = run("export-lora", "--base", base, "--adapter", adapter_dir, "--output", tmp_path / "lora")
    assert_one_line_error(result, "holds weights for model.layers.1.self_attn.o_proj and 2 more modules")


def test_a_targeted_module_without_weights_stays_unchanged_as_in_peft(adapter, tmp_path):
    base, adapter_dir = adapter
    with_config(adapter_dir, target_modules=[*TARGETS, "k_proj"])
    result = run("merge", "--base", base, "--adapter", adapter_dir, "--output", tmp_path / "merged")
    assert result.exit_code == 0 and "verification: PASS" in result.output, result.output
    warning = result.output.splitlines()[0]
    assert warning.startswith("Warning: ") and "targets model.layers.0.self_attn.k_proj and 1 more modules" in warning
    assert "it stays unchanged (R = I), as PEFT loads it" in warning

    merged = load_file(tmp_path / "merged" / "model.safetensors")
    with torch.no_grad():
        expected = load_peft(base, adapter_dir).merge_and_unload().state_dict()
    original = load_base_model(base).state_dict()
    for key, tensor in merged.items():
        assert_close_relative(tensor, expected[key])
    unchanged = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(merged[unchanged], original[unchanged]) and torch.equal(expected[unchanged], original[unchanged])

    with_config(adapter_dir, init_weights=False)  # PEFT would start k_proj's R at random
    result = run("merge", "--base", base, "--adapter", adapter_dir, "--output", tmp_path / "random")
    assert_one_line_error(result, "targets model.layers.0.self_attn.k_proj", "init_weights false")

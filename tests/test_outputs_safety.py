"""Nothing lost, nothing misleading (issue #24): no output is, contains or lies inside an input;
a symlinked output is written where it points; a full disk is one line with nothing left behind;
training trains."""

import errno
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run

from psoft_deploy.converters import merge as merge_module

DATA = Path(__file__).parent / "data" / "tiny_text.txt"


@pytest.fixture
def inputs(llama_adapter, tmp_path):
    """Own copies of the base and the adapter (a wrong write may destroy them): TMP/base, TMP/adapters/a."""
    base, adapter = tmp_path / "base", tmp_path / "adapters" / "a"
    shutil.copytree(llama_adapter[0], base)
    shutil.copytree(llama_adapter[1], adapter)
    return base, adapter


def contents(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (relative name -> hash), links not followed."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def assert_nothing_partial(tmp_path, keep=("base", "adapters")):
    assert sorted(path.name for path in tmp_path.iterdir() if path.name not in keep) == []


def writers(base, adapter, output):
    """Every command that writes, with ``output`` as its output (the quickest way each runs)."""
    common = ["--base", base, "--adapter", adapter, "--output", output, "--overwrite"]
    return {
        "materialize": ["materialize", *common],
        "merge": ["merge", *common, "--no-verify"],
        "export-lora": ["export-lora", *common, "--no-verify"],
        "export-onnx": ["export-onnx", *common, "--exporter", "torch", "--no-verify"],
        "train": ["train", "--base_model_name_or_path", base, "--output_dir", output, "--data_path", DATA,
                  "--max_steps", 1, "--max_length", 16, "--r", 4, "--overwrite_output_dir"],
    }


@pytest.mark.parametrize("command", ["materialize", "merge", "export-lora",
                                     pytest.param("export-onnx", marks=pytest.mark.slow), "train"])
def test_no_output_is_contains_or_lies_inside_an_input_and_a_symlinked_output_is_written_through(
        command, inputs, tmp_path):
    base, adapter = inputs
    before = contents(tmp_path)
    cases = [(base, "is the base"), (base / "sub", "lies inside the base"), (tmp_path, "contains the base")]
    if command != "train":  # train has no adapter among its inputs
        cases += [(adapter, "is the adapter"), (adapter / "sub", "lies inside the adapter"),
                  (adapter.parent, "contains the adapter")]
    (tmp_path / "into-base").symlink_to(base)  # through a symlink too
    cases.append((tmp_path / "into-base", "is the base"))
    for output, fragment in cases:
        assert_one_line_error(run(*writers(base, adapter, output)[command]), fragment)
        assert contents(tmp_path) == before, f"{command} --output {output} changed its inputs"
    target = tmp_path / "elsewhere" / "target"
    target.mkdir(parents=True)
    link = tmp_path / "links" / "out"
    link.parent.mkdir()
    link.symlink_to(target)
    result = run(*writers(base, adapter, link)[command])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == target and any(target.iterdir())
    assert [path.name for path in link.parent.iterdir()] == ["out"], "nothing left beside the link"
    assert [path.name for path in target.parent.iterdir()] == ["target"], "nothing left beside the target"
    assert "Warning" not in result.output, result.output
    assert {name: digest for name, digest in contents(tmp_path).items() if name.startswith(("base/", "adapters/"))} \
        == before


def test_verify_report_never_goes_into_an_input(inputs, tmp_path):
    base, adapter = inputs
    before = contents(tmp_path)
    for report, fragment in ((adapter / "adapter_config.json", "lies inside the adapter"),
                             (base / "report.json", "lies inside the base")):
        result = run("verify", "--base", base, "--adapter", adapter, "--candidate", adapter, "--report", report)
        assert_one_line_error(result, fragment)
    assert contents(tmp_path) == before


def test_merge_onto_its_own_base_with_overwrite_is_refused(inputs, tmp_path):
    base, adapter = inputs
    before = contents(base)
    result = run("merge", "--base", base, "--adapter", adapter, "--output", base, "--overwrite")
    assert_one_line_error(result, f"output {base} is the base")
    assert contents(base) == before


def test_train_into_the_base_directory_is_refused_before_anything_is_written(inputs, tmp_path):
    base, _ = inputs
    before = contents(base)
    for output in (base, base / "adapter"):
        result = run("train", "--base_model_name_or_path", base, "--output_dir", output, "--data_path", DATA,
                     "--max_steps", 1)
        assert_one_line_error(result, "the base")
    assert contents(base) == before


def test_output_symlink_to_an_empty_folder_is_written_through(inputs, tmp_path):
    base, adapter = inputs
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    result = run("materialize", "--base", base, "--adapter", adapter, "--output", tmp_path / "link")
    assert result.exit_code == 0 and "Warning" not in result.output, result.output
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "psoft_deploy.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapters", "base", "link", "target"]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["side files", "model card"])
def test_disk_full_while_copying_side_files_or_the_card_is_one_line(where, inputs, tmp_path, monkeypatch):
    base, adapter = inputs
    if where == "side files":
        monkeypatch.setattr(merge_module.shutil, "copyfile", no_space)
    else:
        monkeypatch.setattr(merge_module, "write_card", no_space)
    result = run("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--no-verify")
    assert_one_line_error(result, f"disk full while writing {tmp_path / 'out'}")
    assert_nothing_partial(tmp_path)


def test_free_space_refusal_gives_readable_sizes(inputs, tmp_path, monkeypatch):
    base, adapter = inputs
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    result = run("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--no-verify")
    assert_one_line_error(result, "not enough disk space", ", 1000 bytes are free")
    assert "0.00 GiB" not in result.output
    assert_nothing_partial(tmp_path)


@pytest.mark.parametrize("steps", [0, -2])
def test_train_without_steps_is_refused(steps, inputs, tmp_path):
    base, _ = inputs
    result = run("train", "--base_model_name_or_path", base, "--output_dir", tmp_path / "out", "--data_path", DATA,
                 "--max_steps", steps)
    assert_one_line_error(result, "--max_steps must be at least 1")
    assert_nothing_partial(tmp_path)


@pytest.mark.parametrize("size", ["0", "0GB"])
def test_max_shard_size_must_be_positive(size, inputs, tmp_path):
    base, adapter = inputs
    result = run("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--max-shard-size", size)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "'--max-shard-size'" in errors[0], result.output
    assert "positive" in errors[0]
    assert_nothing_partial(tmp_path)


def test_verbose_after_the_command_is_the_global_option(inputs):
    from psoft_deploy.core import progress

    base, adapter = inputs
    result = run("merge", "--base", base, "--adapter", adapter, "--output", base, "--overwrite", "--verbose")
    assert_one_line_error(result, "is the base")  # not click's "No such option: --verbose"
    assert progress.verbose()


def test_verify_refusing_an_adapter_names_every_candidate_kind(inputs):
    base, adapter = inputs
    result = run("verify", "--base", base, "--adapter", adapter, "--candidate", adapter)
    assert_one_line_error(result, "a merged model, a LoRA adapter or an ONNX export")


def test_a_safetensors_write_that_fails_midway_leaves_no_file(tmp_path):
    from psoft_deploy.core.tensorfile import read_safetensors, write_streaming

    def produce(key):
        if key == "b":
            raise OSError("disk full")
        return torch.ones(4)

    with pytest.raises(OSError):
        write_streaming(tmp_path / "x.safetensors", [("a", torch.float32, (4,)), ("b", torch.float32, (4,))], produce)
    assert list(tmp_path.iterdir()) == []
    write_streaming(tmp_path / "x.safetensors", [("a", torch.float32, (4,))], lambda key: torch.ones(4))
    assert list(tmp_path.iterdir()) == [tmp_path / "x.safetensors"]
    assert torch.equal(read_safetensors(tmp_path / "x.safetensors")["a"], torch.ones(4))

"""What a new user hit in the first hour (issue #17), one test per row: unwritable outputs, an
adapter for another base, a rank above the adapter's, output permissions, progress when not on a
terminal, third-party output, broken characters in `generate`; and every subcommand given an
unwritable output, a missing input and a malformed option answers with one `Error:` line."""

import json
import os
import shutil
import stat
import subprocess
import sys
import warnings

import pytest
from helpers import assert_one_line_error, make_peft_adapter, run
from safetensors.torch import load_file, save_file

from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.generate import TextStream
from psoft_deploy.core.options import ReadOptions
from psoft_deploy.demo import MODEL_SIZES
from psoft_deploy.testing import build_tokenizer, bundled_text


@pytest.fixture(scope="module")
def servable(tiny_base, tmp_path_factory):
    """A base vLLM-CPU could serve (the demo's sizes) and a PEFT adapter for it."""
    base = tiny_base("llama", **MODEL_SIZES)
    adapter = tmp_path_factory.mktemp("servable") / "adapter"
    make_peft_adapter(base, adapter, r=8)
    return base, adapter


def start(*args, prefix=(), env=None) -> subprocess.Popen:
    """``python -m psoft_deploy ARGS`` as a user runs it (stderr not a terminal)."""
    return subprocess.Popen([*prefix, sys.executable, "-m", "psoft_deploy", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


def assert_one_error_line(code, stdout, stderr, *fragments):
    """Exit 1, nothing on stdout, and stderr is exactly one ``Error:`` line: no work was reported."""
    assert code == 1 and "Traceback" not in stdout + stderr, stderr[-3000:]
    assert stdout == "" and len(stderr.splitlines()) == 1 and stderr.startswith("Error: "), stdout + stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def without_root_override() -> list[str]:
    """A command prefix under which file permissions apply to this test's processes: none for a
    normal user; for root, setpriv dropping the capabilities that bypass them (root owns the test
    files, and without CAP_DAC_OVERRIDE the owner's own mode bits apply)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is not installed: no way to make permissions apply")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.slow
def test_unwritable_output_is_refused_before_any_work(servable, tmp_path):
    base, adapter = servable
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    prefix = without_root_override()
    probe = subprocess.run([*prefix, "touch", str(locked / "probe")], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("this machine lets the test process write into a 0555 directory")
    commands = {
        "materialize": ["--base", base, "--adapter", adapter, "--output", locked / "m"],
        "merge": ["--base", base, "--adapter", adapter, "--output", locked / "merged"],
        "export-lora": ["--base", base, "--adapter", adapter, "--output", locked / "sub" / "lora"],
        "export-onnx": ["--base", base, "--adapter", adapter, "--output", locked / "onnx"],
        "verify": ["--base", base, "--adapter", adapter, "--candidate", adapter, "--report", locked / "r.json"],
        "demo": ["--output", locked / "demo"],
        "serve": ["--base", base, "--adapter", f"a={adapter}", "--cache-dir", locked / "cache"],
    }
    try:
        processes = {name: start(name, *args, prefix=prefix) for name, args in commands.items()}
        results = {name: finish(process) for name, process in processes.items()}
    finally:
        locked.chmod(0o755)
    for name, (code, stdout, stderr) in results.items():
        assert_one_error_line(code, stdout, stderr, f"directory {locked} is not writable")
    assert list(locked.iterdir()) == [], "no partial output"


@pytest.mark.slow
def test_read_only_output_parent(servable, tmp_path):
    base, adapter = servable
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no unshare (user and mount namespaces) for a read-only bind mount here")
    target = tmp_path / "read-only"
    target.mkdir()
    script = (f'mount --bind "{target}" "{target}" && mount -o remount,bind,ro "{target}" && exec "$@"')
    process = start("merge", "--base", base, "--adapter", adapter, "--output", target / "merged",
                    prefix=["unshare", "-rm", "sh", "-c", script, "sh"])
    assert_one_error_line(*finish(process), f"directory {target} is not writable")


def test_every_subcommand_answers_bad_input_with_one_error_line(servable, tmp_path):
    """A missing input and a malformed option for every subcommand (unwritable outputs: above)."""
    base, adapter = servable
    missing = tmp_path / "missing"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        ("materialize", "--base", missing, "--adapter", adapter, "--output", tmp_path / "o"),
        ("materialize", "--base", base, "--adapter", adapter, "--output", tmp_path / "o", "--paper-neumann-terms", -1),
        ("inspect", missing),
        ("inspect", adapter, "--svd-dtype", "float8"),
        ("merge", "--base", base, "--adapter", missing, "--output", tmp_path / "o"),
        ("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "o", "--max-shard-size", "lots"),
        ("export-lora", "--base", base, "--adapter", missing, "--output", tmp_path / "o"),
        ("export-lora", "--base", base, "--adapter", adapter, "--output", tmp_path / "o", "--energy", 2),
        ("export-onnx", "--base", missing, "--output", tmp_path / "o"),
        ("export-onnx", "--base", base, "--output", tmp_path / "o", "--opset", 3),
        ("generate", "--onnx", missing, "--prompt", "x"),
        ("generate", "--onnx", missing, "--prompt", "x", "--max-new-tokens", 0),
        ("verify", "--base", base, "--adapter", adapter, "--candidate", missing),
        ("verify", "--base", base, "--adapter", adapter, "--candidate", adapter, "--verify-mode", "fast"),
        ("serve", "--base", missing, "--adapter", f"a={adapter}", "--cache-dir", tmp_path / "cache"),
        ("serve", "--base", base, "--adapter", f"a={adapter}", "--port", "eighty"),
        ("train", "--base_model_name_or_path", base, "--output_dir", tmp_path / "t", "--data_path", missing),
        ("demo", "--output", a_file),
    ]
    for args in cases:
        result = run(*args)
        assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), (args, result.output)
        assert "Traceback" not in result.output, (args, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, (args, result.output)
    assert run("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "o", "--max-shard-size",
               "lots").output.splitlines()[-1].startswith("Error: Invalid value for '--max-shard-size': 'lots'")
    assert not (tmp_path / "o").exists(), "no partial output"


def test_peft_adapter_for_another_base_is_refused_naming_both(tiny_base, tmp_path):
    narrow, wide = tiny_base("llama"), tiny_base("llama", hidden=128)
    make_peft_adapter(narrow, tmp_path / "adapter", r=8)
    result = run("merge", "--base", wide, "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert_one_line_error(result, f"Error: adapter {tmp_path / 'adapter'} was trained on {narrow}, not on the base "
                          f"given ({wide}): ", "model.layers.0.mlp.down_proj.weight is 64×128 there, 128×256 here")
    assert not (tmp_path / "merged").exists()
    allowed = run("merge", "--base", wide, "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged",
                  "--allow-base-mismatch")
    assert allowed.exit_code == 0, allowed.output
    warning = allowed.output.splitlines()[0]
    assert warning.startswith(f"Warning: adapter {tmp_path / 'adapter'} was trained on {narrow}, not on the base")
    assert "cannot be checked" in warning


def with_recorded_base(adapter_dir, name_or_path):
    config_file = adapter_dir / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": name_or_path}))


def test_base_names_are_compared_only_where_comparable(tiny_base, tmp_path):
    """Hub ids against hub-cache snapshot paths, local copies by their weights."""
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter")
    snapshot = tmp_path / "hub" / "models--someorg--tiny-llama" / "snapshots" / "0123abc"
    shutil.copytree(base, snapshot)
    for recorded in ("someorg/tiny-llama", str(snapshot)):
        with_recorded_base(tmp_path / "adapter", recorded)
        assert load_factors(str(tmp_path / "adapter"), str(snapshot)).modules
    with_recorded_base(tmp_path / "adapter", "someorg/other-llama")  # a name alone never refuses (mirrors, copies)
    with pytest.warns(UserWarning, match=r"\(someorg/other-llama\): someorg/other-llama is neither here nor in the hub "
                      r"cache to compare weights with, and .* is known as someorg/tiny-llama; proceeding"):
        factors = load_factors(str(tmp_path / "adapter"), str(snapshot))
    assert factors.base_identity["status"] == "not checked"

    changed = tmp_path / "changed"
    shutil.copytree(base, changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["model.layers.1.self_attn.v_proj.weight"] *= 1.01
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    with_recorded_base(tmp_path / "adapter", str(base))
    with pytest.raises(UserError, match="model.layers.1.self_attn.v_proj.weight holds other weights"):
        load_factors(str(tmp_path / "adapter"), str(changed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_factors(str(tmp_path / "adapter"), str(changed), ReadOptions(allow_base_mismatch=True)).modules
    assert any("--allow-base-mismatch was given" in str(warning.message) for warning in caught)


def test_export_lora_rank_above_the_adapters_writes_the_exact_export(tiny_base, tmp_path):
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter", r=8)
    result = run("export-lora", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "lora",
                 "--rank", 16)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == ("Warning: --rank 16 is above the adapter's rank r=8: writing the exact "
                                             "export at r=8")
    meta = json.loads((tmp_path / "lora" / "psoft_lora_export.json").read_text())
    assert meta["exact"] and {module["rank"] for module in meta["modules"].values()} == {8}


def test_outputs_are_readable_by_other_accounts_under_umask_022(tiny_base, tmp_path):
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter")
    previous = os.umask(0o022)
    try:
        for command, output in (("materialize", "m"), ("export-lora", "lora")):
            assert run(command, "--base", base, "--adapter", tmp_path / "adapter", "--output",
                       tmp_path / output).exit_code == 0
    finally:
        os.umask(previous)
    for output in ("m", "lora"):
        assert stat.S_IMODE((tmp_path / output).stat().st_mode) == 0o755
        files = list((tmp_path / output).iterdir())
        assert files and all(stat.S_IMODE(file.stat().st_mode) == 0o644 for file in files)


@pytest.mark.slow
def test_progress_and_quiet_third_parties_when_not_on_a_terminal(servable, tmp_path):
    """Stage and per-10 % lines on stderr; transformers' bars and torch.onnx's progress only with
    --verbose."""
    base, adapter = servable
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    common = ["export-onnx", "--base", base, "--adapter", adapter, "--exporter", "torch"]
    quiet = start(*common, "--output", tmp_path / "quiet", env=env)
    verbose = start("--verbose", *common, "--output", tmp_path / "verbose", "--no-verify", env=env)
    (code, stdout, stderr), (verbose_code, verbose_stdout, verbose_stderr) = finish(quiet), finish(verbose)
    assert code == 0 and verbose_code == 0, stderr + verbose_stderr
    lines = stderr.splitlines()
    assert all(line.startswith("psoft-deploy: ") for line in lines), lines
    assert "psoft-deploy: factors: 6/6 modules" in lines and "psoft-deploy: verifying the merged model" in lines
    assert stdout.startswith("verification: PASS") and "[torch.onnx]" not in stdout, stdout
    assert "Loading weights" in verbose_stderr and "[torch.onnx]" in verbose_stdout


def test_generated_text_is_passed_on_in_whole_characters(tmp_path):
    """A byte-level BPE token can hold part of a character: the stream never shows U+FFFD."""
    from tokenizers import Tokenizer

    build_tokenizer(tmp_path, bundled_text())
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "The snow ☃ falls, café — naïve 😀 end"
    tokens = tokenizer.encode(text).ids
    prefixes = [tokenizer.decode(tokens[:count]) for count in range(1, len(tokens) + 1)]
    splits = [count for count, prefix in enumerate(prefixes, 1) if prefix.endswith("\ufffd")]
    assert splits, "the text must split characters across tokens"
    pieces = []
    stream = TextStream(tokenizer, pieces.append)
    for count in range(1, len(tokens) + 1):
        stream.update(tokens[:count])
    assert stream.finish(tokens) == text
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    assert TextStream(tokenizer, pieces.append).finish(tokens[:splits[0]]) == prefixes[splits[0] - 1].rstrip("\ufffd")


@pytest.mark.slow
def test_overwrite_over_contents_that_cannot_be_removed_publishes_and_warns(servable, tmp_path):
    base, adapter = servable
    output = tmp_path / "out"
    (output / "kept").mkdir(parents=True)
    (output / "kept" / "file").write_text("old")
    (output / "kept").chmod(0o555)
    prefix = without_root_override()
    try:
        if subprocess.run([*prefix, "rm", str(output / "kept" / "file")], capture_output=True).returncode == 0:
            pytest.skip("this machine lets the test process delete from a 0555 directory")
        code, stdout, stderr = finish(start("materialize", "--base", base, "--adapter", adapter, "--output", output,
                                            "--overwrite", prefix=prefix))
    finally:
        for directory in tmp_path.glob(".out.old-*/kept"):
            directory.chmod(0o755)
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    warning = [line for line in stderr.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1 and "could not all be removed" in warning[0] and ".out.old-" in warning[0], stderr
    assert not (output / "kept").exists() and any(output.iterdir())

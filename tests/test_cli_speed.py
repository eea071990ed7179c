"""A light command line (issue #24): every `--help` and every refused argument answers before torch,
transformers, trl, vLLM or onnxruntime is imported (counted in sys.modules, not timed: timings
belong in benchmarks/)."""

import json
import subprocess
import sys

import pytest

from psoft_deploy.cli import cli

HEAVY = ("torch", "transformers", "trl", "vllm", "onnxruntime", "onnxruntime_genai", "peft", "datasets")
# Runs the CLI on sys.argv[1:], then reports its exit status and the heavy modules imported.
PROBE = f"""
import json, sys
from psoft_deploy.cli import main
sys.argv = ["psoft-deploy", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code
heavy = [name for name in {HEAVY!r} if name in sys.modules]
print("PROBE " + json.dumps({{"code": code, "heavy": heavy}}))
"""


def probe(*args) -> tuple[dict, str]:
    """The probe's report for ``psoft-deploy ARGS`` and what the command printed."""
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=300)
    report = next(line for line in done.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(report.removeprefix("PROBE ")), done.stdout + done.stderr


@pytest.mark.parametrize("command", [None, *cli.commands])
def test_help_imports_nothing_heavy(command):
    report, output = probe(*([command] if command else []), "--help")
    assert report["code"] == 0 and "usage" in output.lower(), output
    assert report["heavy"] == [], report


@pytest.mark.parametrize("args, fragment", [
    (["serve", "--base", "b", "--adapter", "a=x", "--adapter", "a=y"], "distinct names"),
    (["serve", "--base", "b", "--adapter", "bad name=x"], "adapter name 'bad name'"),
    # serve's own options are strict: a typo is not handed to vLLM (which would refuse it after loading)
    (["serve", "--base", "b", "--adaptor", "y=x"], "No such option '--adaptor'. (Did you mean one of: '--adapter'"),
    (["serve", "--base", "b", "--adapter", "y=x", "--adapter-from", "lora", "--", "--dtype", "float32"],
     "No such option '--adapter-from'. (Did you mean one of: '--adapter', '--adapter-form'"),
    (["serve", "--base", "b", "--adapter", "y=x", "float32"], "unexpected extra argument (float32)"),
    (["serve", "--base", "b", "--adapter", "y=x", "--", "--port", "http"], "-- --port http: not a port number"),
    (["merge", "--base", "b", "--adapter", "a", "--output", "o", "--max-shard-size", "0"], "--max-shard-size"),
    (["train", "--base_model_name_or_path", "b", "--output_dir", "o", "--data_path", "d", "--max_steps", "0"],
     "--max_steps"),
    (["train", "--base_model_name_or_path", "b", "--output_dir", "o", "--data_path", "d", "--r", "eight"], "--r"),
])
def test_refused_arguments_answer_before_heavy_imports(args, fragment):
    report, output = probe(*args)
    assert report["code"] in (1, 2) and fragment in output, output
    assert report["heavy"] == [], report

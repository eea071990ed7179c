"""A fast command line (issue #24): every `--help` and every refused argument answers before torch,
transformers, trl, vLLM or onnxruntime is imported."""

import json
import subprocess
import sys

import pytest

from psoft_deploy.cli import cli

HEAVY = ("torch", "transformers", "trl", "vllm", "onnxruntime", "onnxruntime_genai", "peft", "datasets")
# Runs the CLI on sys.argv[1:], then reports its exit status, the heavy modules imported and the time taken.
PROBE = f"""
import json, sys, time
start = time.perf_counter()
from psoft_deploy.cli import main
sys.argv = ["psoft-deploy", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code
heavy = [name for name in {HEAVY!r} if name in sys.modules]
print("PROBE " + json.dumps({{"code": code, "heavy": heavy, "seconds": time.perf_counter() - start}}))
"""
LIMIT_S = 5  # generous for a busy machine; a heavy import takes 10-50 s


def probe(*args) -> tuple[dict, str]:
    """The probe's report for ``psoft-deploy ARGS`` and what the command printed."""
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=300)
    report = next(line for line in done.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(report.removeprefix("PROBE ")), done.stdout + done.stderr


@pytest.mark.parametrize("command", [None, *cli.commands])
def test_help_imports_nothing_heavy(command):
    report, output = probe(*([command] if command else []), "--help")
    assert report["code"] == 0 and "usage" in output.lower(), output
    assert report["heavy"] == [] and report["seconds"] < LIMIT_S, report


@pytest.mark.parametrize("args, fragment", [
    (["serve", "--base", "b", "--adapter", "a=x", "--adapter", "a=y"], "distinct names"),
    (["serve", "--base", "b", "--adapter", "bad name=x"], "adapter name 'bad name'"),
    (["merge", "--base", "b", "--adapter", "a", "--output", "o", "--max-shard-size", "0"], "--max-shard-size"),
    (["train", "--base_model_name_or_path", "b", "--output_dir", "o", "--data_path", "d", "--max_steps", "0"],
     "--max_steps"),
    (["train", "--base_model_name_or_path", "b", "--output_dir", "o", "--data_path", "d", "--r", "eight"], "--r"),
])
def test_refused_arguments_answer_before_heavy_imports(args, fragment):
    report, output = probe(*args)
    assert report["code"] in (1, 2) and fragment in output, output
    assert report["heavy"] == [] and report["seconds"] < LIMIT_S, report

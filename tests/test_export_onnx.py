"""`psoft-deploy export-onnx` (merged graphs) and `psoft-deploy generate` through onnxruntime."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import input_ids, load_peft, make_peft_adapter
from transformers import AutoTokenizer

from psoft_deploy.cli import cli
from psoft_deploy.converters.onnx import onnx_logits
from psoft_deploy.factors import load_factors
from psoft_deploy.generate import generate
from psoft_deploy.model import reference_model


def run(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_merged_export_with_past_equals_the_reference_and_generates(kind, tiny_base, tmp_path):
    base = tiny_base(kind)
    make_peft_adapter(base, tmp_path / "adapter", kind=kind, r=8)
    result = run("export-onnx", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "onnx",
                 "--with-past")
    assert result.exit_code == 0, result.output
    assert "verification: PASS (full, float32)" in result.output
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "config.json"} <= {
        p.name for p in (tmp_path / "onnx").iterdir()}

    ids = input_ids(batch=3, length=9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0  # padded batch
    with torch.no_grad():
        expected = reference_model(base, load_factors(str(tmp_path / "adapter"), str(base)))(
            input_ids=ids, attention_mask=mask).logits.numpy()
    actual = onnx_logits(tmp_path / "onnx", ids.numpy(), mask.numpy())
    keep = mask.numpy().astype(bool)
    assert np.abs(actual[keep] - expected[keep]).max() <= 1e-4

    tokenizer = AutoTokenizer.from_pretrained(base)
    peft = load_peft(base, tmp_path / "adapter")
    for prompt in ("The river carries water", "A cat sleeps"):
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            reference = peft.generate(**encoded, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        _, tokens = generate(tmp_path / "onnx", prompt, max_new_tokens=10)
        assert tokens == reference[0, encoded["input_ids"].shape[1]:].tolist()


def test_generate_needs_no_torch_and_verify_takes_onnx(tiny_base, tmp_path):
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter")
    assert run("export-onnx", "--base", base, "--adapter", tmp_path / "adapter", "--output",
               tmp_path / "onnx").exit_code == 0
    assert run("export-onnx", "--base", base, "--output", tmp_path / "bare").exit_code == 0  # no past, no adapter
    script = (f"import sys; from psoft_deploy.cli import main; sys.argv = ['psoft-deploy', 'generate', '--onnx', "
              f"{str(tmp_path / 'onnx')!r}, '--prompt', 'Snow covers', '--max-new-tokens', '5', '--temperature', "
              "'0.7', '--top-k', '10']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
              "assert 'torch' not in sys.modules, 'generate imported torch'")
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0 and process.stdout.startswith("Snow covers"), process.stderr[-2000:]

    ok = run("verify", "--base", base, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "onnx")
    assert ok.exit_code == 0 and ok.output.startswith("PASS (full, float32)"), ok.output
    wrong = run("verify", "--base", base, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "bare")
    assert wrong.exit_code == 1 and wrong.output.startswith("FAIL (full, float32)"), wrong.output


def test_bad_input(tiny_base, tmp_path):
    bert = tiny_base("bert")
    result = run("export-onnx", "--base", bert, "--output", tmp_path / "out")
    assert result.exit_code == 1 and "exports causal language models" in result.output.strip().splitlines()[-1]
    make_peft_adapter(tiny_base("llama"), tmp_path / "adapter")
    result = run("export-onnx", "--base", tiny_base("opt"), "--adapter", tmp_path / "adapter", "--output",
                 tmp_path / "out")
    assert result.exit_code == 1 and "has no tensor" in result.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.onnx").write_text("theirs")
    result = run("export-onnx", "--base", tiny_base("llama"), "--output", tmp_path / "out")
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"], "no partial output"

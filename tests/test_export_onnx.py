"""`psoft-deploy export-onnx` (merged graphs) and `psoft-deploy generate` through onnxruntime."""

import subprocess
import sys

import helpers
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from psoft_deploy.converters.onnx import onnx_logits
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.generate import generate
from psoft_deploy.core.model import reference_model


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_merged_export_with_past_equals_the_reference_and_generates(kind, tiny_base, tmp_path):
    base = tiny_base(kind)
    helpers.make_peft_adapter(base, tmp_path / "adapter", kind=kind, r=8)
    result = helpers.run("export-onnx", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "onnx",
                 "--with-past", "--exporter", "torch")
    assert result.exit_code == 0, result.output
    assert "verification: PASS (full, float32)" in result.output
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "config.json"} <= {
        p.name for p in (tmp_path / "onnx").iterdir()}

    ids = helpers.input_ids(batch=3, length=9)
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
    peft = helpers.load_peft(base, tmp_path / "adapter")
    for prompt in ("The river carries water", "A cat sleeps"):
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            reference = peft.generate(**encoded, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        _, tokens = generate(tmp_path / "onnx", prompt, max_new_tokens=10)
        assert tokens == reference[0, encoded["input_ids"].shape[1]:].tolist()


@pytest.mark.slow
def test_generate_needs_no_torch_and_verify_takes_onnx(tiny_base, tmp_path):
    base = tiny_base("llama")
    helpers.make_peft_adapter(base, tmp_path / "adapter")
    assert helpers.run("export-onnx", "--base", base, "--adapter", tmp_path / "adapter", "--output",
               tmp_path / "onnx", "--exporter", "torch").exit_code == 0
    assert helpers.run("export-onnx", "--base", base, "--output", tmp_path / "bare", "--exporter", "torch").exit_code == 0
    script = (f"import sys; from psoft_deploy.cli import main; sys.argv = ['psoft-deploy', 'generate', '--onnx', "
              f"{str(tmp_path / 'onnx')!r}, '--prompt', 'Snow covers', '--max-new-tokens', '5', '--temperature', "
              "'0.7', '--top-k', '10']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
              "assert 'torch' not in sys.modules, 'generate imported torch'")
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0 and process.stdout.startswith("Snow covers"), process.stderr[-2000:]

    ok = helpers.run("verify", "--base", base, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "onnx")
    assert ok.exit_code == 0 and ok.output.startswith("PASS (full, float32)"), ok.output
    wrong = helpers.run("verify", "--base", base, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "bare")
    assert wrong.exit_code == 1 and wrong.output.startswith("FAIL (full, float32)"), wrong.output


def test_bad_input(tiny_base, tmp_path):
    result = helpers.run("export-onnx", "--base", tiny_base("t5"), "--output", tmp_path / "out")
    helpers.assert_one_line_error(result, "export-onnx exports causal LMs")
    result = helpers.run("export-onnx", "--base", tiny_base("bert"), "--output", tmp_path / "out", "--with-past")
    helpers.assert_one_line_error(result, "with those options")
    helpers.make_peft_adapter(tiny_base("llama"), tmp_path / "adapter")
    result = helpers.run("export-onnx", "--base", tiny_base("opt"), "--adapter", tmp_path / "adapter", "--output",
                 tmp_path / "out")
    assert result.exit_code == 1 and "has no tensor" in result.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.onnx").write_text("theirs")
    result = helpers.run("export-onnx", "--base", tiny_base("llama"), "--output", tmp_path / "out")
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"], "no partial output"


@pytest.mark.slow
def test_adapters_as_inputs_three_adapters_and_none(tiny_base, tmp_path):
    import gc

    from psoft_deploy.core.errors import UserError
    from psoft_deploy.core.generate import OnnxModel

    base = tiny_base("llama")
    helpers.make_peft_adapter(base, tmp_path / "p4", r=4, target_modules=["q_proj", "v_proj"])
    helpers.make_peft_adapter(base, tmp_path / "p16", r=16, psoft_alpha=16, seed=3, target_modules=["o_proj", "down_proj"])
    helpers.make_paper_checkpoint(base, tmp_path / "paper", tmp_path / "residual", r=8)
    result = helpers.run("export-onnx", "--base", base, "--adapters-as-inputs", "--adapter", f"p4={tmp_path / 'p4'}",
                 "--adapter", f"p16={tmp_path / 'p16'}", "--adapter", f"paper={tmp_path / 'paper'}",
                 "--output", tmp_path / "onnx", "--with-past", "--exporter", "torch")
    assert result.exit_code == 0, result.output
    assert result.output.count("PASS (full, float32)") == 4  # the base and each adapter

    ids = helpers.input_ids(batch=2, length=8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    keep = mask.numpy().astype(bool)
    from psoft_deploy.core.model import load_base_model

    with torch.no_grad():
        base_logits = load_base_model(base)(input_ids=ids, attention_mask=mask).logits.numpy()
    assert np.abs(onnx_logits(tmp_path / "onnx", ids.numpy(), mask.numpy())[keep] - base_logits[keep]).max() <= 1e-4
    for name in ("p4", "p16", "paper"):
        factors = load_factors(str(tmp_path / name), str(base))
        with torch.no_grad():
            expected = reference_model(base, factors)(input_ids=ids, attention_mask=mask).logits.numpy()
        file = tmp_path / "onnx" / "adapters" / f"{name}.onnx_adapter"
        model = OnnxModel(tmp_path / "onnx", file)
        gc.collect()  # our API holds the LoraAdapter: a collected one would silently run the base
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                 "position_ids": np.broadcast_to(np.arange(8), (2, 8)).copy(), **model.empty_past(2)}
        actual = model.run(["logits"], feeds)[0]
        assert np.abs(actual[keep] - expected[keep]).max() <= 1e-4
        assert np.abs(actual[keep] - base_logits[keep]).max() > 1e-3

    # an adapter for modules this graph has no inputs for is refused, not silently ignored
    helpers.make_peft_adapter(base, tmp_path / "other", target_modules=["k_proj"])
    from psoft_deploy.converters.onnx import write_onnx_adapter

    write_onnx_adapter(load_factors(str(tmp_path / "other"), str(base)), tmp_path / "other.onnx_adapter")
    with pytest.raises(UserError, match="does not fit this graph"):
        OnnxModel(tmp_path / "onnx", tmp_path / "other.onnx_adapter")

    tokenizer = AutoTokenizer.from_pretrained(base)
    encoded = tokenizer("The river carries water", return_tensors="pt")
    with torch.no_grad():
        reference = helpers.load_peft(base, tmp_path / "p16").generate(**encoded, max_new_tokens=8, min_new_tokens=8,
                                                                 do_sample=False)
    _, tokens = generate(tmp_path / "onnx", "The river carries water", max_new_tokens=8,
                         adapter_file=tmp_path / "onnx" / "adapters" / "p16.onnx_adapter")
    assert tokens == reference[0, encoded["input_ids"].shape[1]:].tolist()

    good = helpers.run("verify", "--base", base, "--adapter", tmp_path / "p4", "--candidate",
               tmp_path / "onnx" / "adapters" / "p4.onnx_adapter")
    assert good.exit_code == 0 and good.output.startswith("PASS"), good.output
    crossed = helpers.run("verify", "--base", base, "--adapter", tmp_path / "p4", "--candidate",
                  tmp_path / "onnx" / "adapters" / "p16.onnx_adapter")
    assert crossed.exit_code == 1 and crossed.output.startswith("FAIL"), crossed.output


@pytest.mark.slow
def test_float16_export_with_past_generates(tiny_base, tmp_path):

    base = tiny_base("llama")
    helpers.make_peft_adapter(base, tmp_path / "adapter", r=8)
    result = helpers.run("export-onnx", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "onnx",
                 "--with-past", "--precision", "fp16", "--exporter", "torch")
    assert result.exit_code == 0 and "PASS (full, float16)" in result.output, result.output
    report = helpers.verification_report(tmp_path / "onnx", "merged model")
    assert report["dtype"] == "float16" and report["decisive_top1_agreement"] == 1.0
    text, tokens = generate(tmp_path / "onnx", "The river carries water", max_new_tokens=6)
    assert len(tokens) == 6

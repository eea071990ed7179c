"""`psoft-deploy verify` on a model shaped like a real chat model (24 layers, tied embeddings,
logits in the tens, a chat template, pad == EOS): tolerances come from the noise measured in the
same run, correct artifacts pass, wrong ones fail, in float32 and bfloat16."""

import json
import shutil

import pytest
import torch
import transformers
from helpers import make_peft_adapter, run, verification_report
from safetensors.torch import load_file, save_file

from psoft_deploy.converters.verify.inputs import verification_inputs
from psoft_deploy.converters.verify.rule import compare_logits
from psoft_deploy.testing import build_chat_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def verify(base, adapter, candidate, *extra):
    """Exit code and report of `psoft-deploy verify`."""
    report_file = candidate.parent / f"{candidate.name}-report.json"
    result = run("verify", "--base", base, "--adapter", adapter, "--candidate", candidate, "--report", report_file,
                 *extra)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, json.loads(report_file.read_text()), result.output


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A deep chat-shaped base, a PSOFT adapter of a trained size on it, and wrong candidates."""
    work = tmp_path_factory.mktemp("chat")
    build_chat_model(work / "base", layers=24)
    peft_model = make_peft_adapter(work / "base", work / "adapter", r=8, strength=0.2, target_modules=TARGETS)
    peft_model.merge_and_unload().save_pretrained(work / "peft-merged")
    make_peft_adapter(work / "base", work / "other-modules", r=8, strength=0.2, seed=2,
                      target_modules=["k_proj", "o_proj", "up_proj"])
    return work


def save_in(model_dir, output, dtype):
    """``model_dir`` re-saved in ``dtype`` (config and tokenizer kept)."""
    shutil.copytree(model_dir, output)
    transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).save_pretrained(output)
    return output


def revert(merged_dir, base_dir, output, fragment):
    """A merged model with the adapted weights whose names hold ``fragment`` put back to the base's."""
    shutil.copytree(merged_dir, output)
    merged, base = load_file(output / "model.safetensors"), load_file(base_dir / "model.safetensors")
    reverted = {key: base[key].to(value.dtype) if fragment in key else value for key, value in merged.items()}
    save_file(reverted, output / "model.safetensors", metadata={"format": "pt"})
    return output


@pytest.mark.slow
def test_correct_artifacts_pass_on_a_deep_chat_model(chat, tmp_path):
    base, adapter = chat / "base", chat / "adapter"
    for command, output, extra in (("merge", "merged", ()), ("export-lora", "lora", ()),
                                   ("export-onnx", "onnx", ("--with-past", "--exporter", "torch")),
                                   ("export-onnx", "genai", ("--exporter", "genai"))):
        result = run(command, "--base", base, "--adapter", adapter, "--output", tmp_path / output, *extra)
        mode = "layerwise" if command == "export-lora" else "full"  # an exact LoRA: as PEFT loads it
        assert result.exit_code == 0 and f"PASS ({mode}, f" in result.output, result.output
    code, _, output = verify(base, adapter, tmp_path / "lora", "--verify-mode", "full")
    assert code == 0 and output.startswith("PASS (full, f"), output
    report = verification_report(tmp_path / "merged")
    assert report["prompts"].endswith("chat conversations (the tokenizer's template)")
    assert report["decisive_positions"] == report["positions"] > 200, "fp32 noise decides no top-1 here"
    assert report["bare_base"]["mean_abs_logits"] > 1000 * report["bounds"]["mean_abs_logits"]
    code, report, output = verify(base, adapter, chat / "peft-merged")
    assert code == 0 and report["passed"], "PEFT's own merge_and_unload is a correct candidate"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrong_candidates_fail_on_a_deep_chat_model(dtype, chat, tmp_path):
    base, adapter = chat / "base", chat / "adapter"
    name = str(dtype).removeprefix("torch.")
    merged = tmp_path / "merged"
    assert run("merge", "--base", base, "--adapter", adapter, "--output", merged, "--dtype", name).exit_code == 0
    code, report, _ = verify(base, adapter, merged)
    assert code == 0 and report["dtype"] == name and not report["bare_base"]["passes_bounds"]
    assert run("merge", "--base", base, "--adapter", chat / "other-modules", "--output", tmp_path / "other",
               "--dtype", name).exit_code == 0
    wrong = {
        "the bare base": save_in(base, tmp_path / "bare", dtype),
        "half the adapter reverted": revert(merged, base, tmp_path / "half", "v_proj"),
        "an adapter for other modules": tmp_path / "other",
    }
    for label, candidate in wrong.items():
        code, report, output = verify(base, adapter, candidate)
        assert code == 1 and output.startswith(f"FAIL (full, {name})"), f"{label} must fail: {output}"
        assert any("bound" in check for check in report["failed_checks"]), label


@pytest.mark.slow
def test_the_float32_bound_follows_the_measured_noise(tiny_base, tmp_path):
    """Logits in the hundreds put float32 rounding above the old fixed 1e-4: a correct merge still
    passes, because the bound is measured; on a tiny model the bound stays below that constant."""
    build_chat_model(tmp_path / "loud", layers=24, logit_scale=600.0)
    make_peft_adapter(tmp_path / "loud", tmp_path / "adapter", r=8, strength=0.2, target_modules=TARGETS)
    result = run("merge", "--base", tmp_path / "loud", "--adapter", tmp_path / "adapter", "--output", tmp_path / "m")
    assert result.exit_code == 0, result.output
    report = verification_report(tmp_path / "m")
    assert report["max_abs_logits"] > 1e-4 and report["passed"]

    quiet = tiny_base("llama")
    make_peft_adapter(quiet, tmp_path / "tiny-adapter", r=8)
    assert run("merge", "--base", quiet, "--adapter", tmp_path / "tiny-adapter", "--output",
               tmp_path / "tiny-merged").exit_code == 0
    report = verification_report(tmp_path / "tiny-merged")
    assert report["bounds"]["max_abs_logits"] < 1e-5, "no loosening where the fixed bound was right"


@pytest.mark.slow
def test_chat_template_prompts_and_json_lines(chat, tmp_path):
    base, adapter = chat / "base", chat / "adapter"
    inputs, source = verification_inputs([base], None, json.loads((base / "config.json").read_text()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    first = tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0].bool()])
    assert "chat conversations" in source
    assert first.startswith("<|im_start|>user\n") and first.endswith("<|im_start|>assistant\n")

    prompts = tmp_path / "prompts.jsonl"
    conversation = [{"role": "user", "content": "Line one.\nLine two."}]
    prompts.write_text(json.dumps({"messages": conversation}) + "\n" + json.dumps({"text": "A plain prompt"}) + "\n")
    assert run("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "m", "--no-verify").exit_code == 0
    code, report, _ = verify(base, adapter, tmp_path / "m", "--prompts", prompts)
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    expected = len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) + len(tokenizer("A plain prompt")["input_ids"])
    assert code == 0 and report["prompts"] == "2 given prompts" and report["positions"] == expected

    prompts.write_text('{"prompt": "no such field"}\n')
    result = run("verify", "--base", base, "--adapter", adapter, "--candidate", tmp_path / "m", "--prompts", prompts)
    assert result.exit_code == 1 and 'neither a "text" string nor a "messages" list' in result.output


def test_too_few_decisive_positions_are_reported(tiny_base, tmp_path):
    """A sequence classifier gives one position per prompt: too few for the top-1 rule, and the
    report says so instead of "100 % of 0"."""
    base = tiny_base("bert")
    make_peft_adapter(base, tmp_path / "adapter", kind="bert", r=8, modules_to_save=["classifier"])
    assert run("merge", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "m").exit_code == 0
    code, report, output = verify(base, tmp_path / "adapter", tmp_path / "m")
    assert code == 0 and report["decisive_top1_agreement"] is None and report["positions"] == 4
    assert report["decisive_positions"] == 4 and output.startswith("PASS (full, float32)")


def test_kl_is_never_negative():
    logits = 30 * torch.randn(64, 500, generator=torch.Generator().manual_seed(0))
    assert compare_logits(logits, logits)["kl_divergence"] == 0.0
    nearby = logits + 1e-6 * torch.randn(64, 500, generator=torch.Generator().manual_seed(1))
    assert compare_logits(logits.float(), nearby.float())["kl_divergence"] >= 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_candidates_are_checked_layer_by_layer(dtype, tiny_base, tmp_path):
    """For bases too large for a float64 forward, a LoRA candidate is checked per layer with
    PEFT's scaling: the exact export passes, another adapter's export fails."""
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter", r=8)
    make_peft_adapter(base, tmp_path / "other", r=8, seed=3)
    for name in ("adapter", "other"):
        result = run("export-lora", "--base", base, "--adapter", tmp_path / name, "--output", tmp_path / f"lora-{name}",
                     "--dtype", dtype, "--no-verify")
        assert result.exit_code == 0, result.output
    code, report, output = verify(base, tmp_path / "adapter", tmp_path / "lora-adapter", "--verify-mode", "layerwise")
    assert code == 0 and report["candidate"] == "lora" and report["layers_checked"] == 6, output
    assert report["layers_where_the_bare_base_passes"] == 0
    code, report, output = verify(base, tmp_path / "adapter", tmp_path / "lora-other", "--verify-mode", "layerwise")
    assert code == 1 and output.startswith(f"FAIL (layerwise, {dtype})"), output
    # auto: layer by layer as PEFT loads it, at any size; PEFT's own scaling decides
    code, report, output = verify(base, tmp_path / "adapter", tmp_path / "lora-adapter")
    assert code == 0 and report["loaded_by"] == "peft" and output.startswith(f"PASS (layerwise, {dtype})"), output
    config_file = tmp_path / "lora-adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"use_rslora": True}))  # scaling α/√r instead of α/r
    code, report, output = verify(base, tmp_path / "adapter", tmp_path / "lora-adapter")
    assert code == 1 and output.startswith(f"FAIL (layerwise, {dtype})"), output
    config_file.write_text(json.dumps(config))
    weights = tmp_path / "lora-adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({key: value for key, value in tensors.items() if ".layers.0." not in key}, weights)  # half the adapter
    code, report, output = verify(base, tmp_path / "adapter", tmp_path / "lora-adapter")
    assert code == 1 and output.startswith(f"FAIL (layerwise, {dtype})") and "layers.0" in output, output
    save_file(tensors, weights)
    config_file.write_text(json.dumps(config | {"layer_replication": [[0, 2], [1, 2]]}))  # not W x + s·BAx per layer
    code, report, output = verify(base, tmp_path / "adapter", tmp_path / "lora-adapter")
    assert code == 1 and output.startswith(f"FAIL (full, {dtype})"), output
    config_file = tmp_path / "lora-other" / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"use_dora": True}))
    result = run("verify", "--base", base, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "lora-other",
                 "--verify-mode", "layerwise")
    assert result.exit_code == 1 and "is a DoRA adapter" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_int4_exports_on_a_deep_chat_model_are_inconclusive_in_the_logits_and_a_wrong_adapter_fails(chat, tmp_path):
    """On 24 random layers int4's noise hides the adapter in the logits: the bare base passes the
    full bounds, so the full check refuses to vouch (nothing is written); checking the adapter's
    factors in the export passes, and the wrong adapter fails both ways."""
    base, adapter = chat / "base", chat / "adapter"
    result = run("export-onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "auto",
                 "--precision", "int4")
    assert result.exit_code == 1 and "inconclusive: the bare base is within every bound too" in result.output
    assert not (tmp_path / "auto").exists()
    result = run("export-onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "int4",
                 "--precision", "int4", "--verify-mode", "layerwise")
    assert result.exit_code == 0 and "PASS (layerwise, int4)" in result.output, result.output
    code, report, output = verify(base, chat / "other-modules", tmp_path / "int4", "--verify-mode", "layerwise")
    assert code == 1 and any("no LoRA factors" in check for check in report["failed_checks"]), output
    code, report, output = verify(base, chat / "other-modules", tmp_path / "int4", "--verify-mode", "full")
    assert code == 1 and output.startswith("FAIL (full, int4)"), output


def test_a_reference_kept_in_its_stored_bfloat16_computes_as_the_float32_one(tiny_base, tmp_path):
    """What the layerwise graph checks run on above 0.5B parameters: half the memory, the same logits."""
    from psoft_deploy.core.factors import load_factors
    from psoft_deploy.core.model import load_base_model, reference_model, reference_model_stored

    shutil.copytree(tiny_base("llama"), tmp_path / "bf16")
    load_base_model(tmp_path / "bf16", torch.bfloat16).save_pretrained(tmp_path / "bf16")
    make_peft_adapter(tmp_path / "bf16", tmp_path / "adapter", r=4)
    factors = load_factors(str(tmp_path / "adapter"), str(tmp_path / "bf16"))
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    stored = reference_model_stored(tmp_path / "bf16", factors, torch.float32)
    with torch.no_grad():
        expected = reference_model(tmp_path / "bf16", factors, torch.float32)(input_ids=ids).logits
        actual = stored(input_ids=ids).logits
    assert actual.dtype == torch.float32 and torch.equal(actual, expected)
    assert {parameter.dtype for parameter in stored.parameters()} == {torch.bfloat16}

"""Every model family PEFT's PSOFT tests adapt (decoders, seq2seq, encoders, classifiers, ViT, a
custom module without a transformers config): merge and export-lora equal PEFT's own forward,
verify passes them and fails the bare base."""

import json
import shutil

import pytest
import torch
from helpers import assert_one_line_error, load_peft, make_peft_adapter, run
from peft import PeftModel, PsoftConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from psoft_deploy.converters.pipeline import read_report
from psoft_deploy.converters.verify.inputs import family_outputs, verification_inputs
from psoft_deploy.core.architectures import model_family
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import load_base_model
from psoft_deploy.testing import build_tiny_model

# kind: PsoftConfig fields beyond r (target_modules None: PEFT's defaults for the architecture,
# as PEFT's tests use them; SEQ_CLS makes PEFT save the classifier head, as in its tests).
FAMILIES = {
    "llama": {}, "opt": {}, "gptj": {}, "qwen2": {}, "gemma3": {},
    "t5": {}, "bart": {},
    "bert-model": {}, "roberta": {}, "deberta": {}, "deberta-v2": {},
    "bert": {"task_type": "SEQ_CLS"}, "roberta-cls": {"task_type": "SEQ_CLS"}, "llama-cls": {"task_type": "SEQ_CLS"},
    "vit": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"]},
}


def outputs(model, base_dir):
    """The outputs verify compares for this family, on verify's own inputs."""
    config = BaseCheckpoint(str(base_dir)).config
    inputs, _ = verification_inputs([base_dir], None, config)
    with torch.no_grad():
        return family_outputs(model(**inputs), model_family(config), inputs)


# One family of each kind in the fast suite (a decoder, a seq2seq, an encoder, a vision model); the others slow.
FAST_FAMILIES = ("llama", "t5", "bert", "vit")


@pytest.mark.parametrize("kind", [kind if kind in FAST_FAMILIES else pytest.param(kind, marks=pytest.mark.slow)
                                  for kind in FAMILIES])
def test_merge_and_export_lora_equal_peft_in_every_family(kind, tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, kind)
    make_peft_adapter(base, tmp_path / "adapter", kind=kind, r=4, **{"target_modules": None, **FAMILIES[kind]})
    expected = outputs(load_peft(base, tmp_path / "adapter"), base)
    for command in ("merge", "export-lora"):
        result = run(command, "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / command)
        mode = "full" if command == "merge" else "layerwise"  # an exact LoRA: layer by layer as PEFT loads it
        assert result.exit_code == 0 and f"verification: PASS ({mode}, float32)" in result.output, result.output
    merged = outputs(load_base_model(tmp_path / "merge"), base)
    lora = outputs(PeftModel.from_pretrained(load_base_model(base), tmp_path / "export-lora").eval(), base)
    assert (merged - expected).abs().max() <= 1e-4 and (lora - expected).abs().max() <= 1e-4
    result = run("verify", "--base", base, "--adapter", tmp_path / "adapter", "--candidate", base)
    assert result.exit_code == 1 and result.output.startswith("FAIL (full, float32)"), result.output


def test_roberta_classifier_lora_keeps_modules_to_save_as_declared(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "roberta-cls")
    make_peft_adapter(base, tmp_path / "adapter", kind="roberta-cls", r=4, target_modules=None, task_type="SEQ_CLS")
    assert run("export-lora", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "lora",
               "--no-verify").exit_code == 0
    declared = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    assert "classifier" in declared, "PEFT declares the head, not its submodules"
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["modules_to_save"] == declared
    lora = outputs(PeftModel.from_pretrained(load_base_model(base), tmp_path / "lora").eval(), base)
    assert (lora - outputs(load_peft(base, tmp_path / "adapter"), base)).abs().max() <= 1e-4


def test_tied_embeddings_with_a_saved_embedding_are_untied_as_peft_does(tmp_path):
    """modules_to_save=["embed_tokens"] on a tied model: PEFT replaces the input embedding only;
    the merged model unties its head (own tensor, tie_word_embeddings false), and a merge that
    keeps the tie is caught."""
    base = tmp_path / "base"
    build_tiny_model(base, "qwen2")
    peft_model = make_peft_adapter(base, tmp_path / "adapter", kind="qwen2", r=4, modules_to_save=["embed_tokens"])
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    peft_model.save_pretrained(tmp_path / "adapter")
    result = run("merge", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    assert torch.equal(tensors["lm_head.weight"], load_file(base / "model.safetensors")["model.embed_tokens.weight"])
    expected = outputs(load_peft(base, tmp_path / "adapter"), base)
    assert (outputs(load_base_model(tmp_path / "merged"), base) - expected).abs().max() <= 1e-4

    still_tied = tmp_path / "still-tied"
    shutil.copytree(tmp_path / "merged", still_tied)
    save_file({key: value for key, value in tensors.items() if key != "lm_head.weight"},
              still_tied / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((still_tied / "config.json").read_text())
    (still_tied / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    result = run("verify", "--base", base, "--adapter", tmp_path / "adapter", "--candidate", still_tied)
    assert result.exit_code == 1 and result.output.startswith("FAIL"), result.output


@pytest.mark.parametrize("magnitudes", [True, False])
def test_non_orthogonal_r_materializes_and_reloads(magnitudes, tiny_base, tmp_path):
    base = tiny_base("llama")
    make_peft_adapter(base, tmp_path / "adapter", r=4, psoft_orth=False, psoft_mag_a=magnitudes,
                      psoft_mag_b=magnitudes)
    result = run("materialize", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "m")
    assert result.exit_code == 0, result.output
    source, reread = (load_factors(str(path), str(base)) for path in (tmp_path / "adapter", tmp_path / "m"))
    for name, module in source.modules.items():
        assert (reread.modules[name].delta_weight() - module.delta_weight()).abs().max() <= 1e-6


class MLP(nn.Module):
    """PEFT's custom-model test module: no transformers config at all."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def test_a_custom_module_without_a_config_is_verified_layerwise(tmp_path):
    torch.manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file(MLP().state_dict(), tmp_path / "base" / "model.safetensors")
    model = MLP()
    model.load_state_dict(load_file(tmp_path / "base" / "model.safetensors"))
    peft_model = get_peft_model(model, PsoftConfig(r=2, psoft_alpha=2, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".psoft_R." in name:
                parameter.add_(0.1 * torch.randn(parameter.shape))
    peft_model.save_pretrained(tmp_path / "adapter")
    x = torch.randn(5, 10)
    with torch.no_grad():
        expected = peft_model.eval()(x)
    for command in ("merge", "export-lora"):  # PEFT records no base for a custom module: nothing to compare it with
        result = run(command, "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--output",
                     tmp_path / command)
        assert result.exit_code == 0 and "verification: PASS (layerwise, float32)" in result.output, result.output
        assert command != "merge" or result.stderr.startswith("Warning: not checked")  # once per process
        (identity,) = read_report(tmp_path / command)["base_identity"]
        assert identity["status"] == "not checked" and "records neither its base's fingerprints" in identity["detail"]
    merged = MLP()
    merged.load_state_dict(load_file(tmp_path / "merge" / "model.safetensors"))
    with torch.no_grad():
        assert (merged(x) - expected).abs().max() <= 1e-4
    result = run("verify", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--candidate",
                 tmp_path / "base")
    assert result.exit_code == 1 and "FAIL (layerwise, float32)" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "deberta-v2-cls", "vit", "roberta"])
def test_export_onnx_of_encoders_classifiers_and_vit(kind, tmp_path):
    """Merged and verified in onnxruntime; then run at other batch sizes (and lengths) than the
    export saw, against PEFT's forward."""
    from psoft_deploy.converters.onnx import onnx_outputs
    from psoft_deploy.core.architectures import FAMILIES

    base = tmp_path / "base"
    build_tiny_model(base, kind)
    targets = ["q_proj", "v_proj"] if kind == "vit" else None
    make_peft_adapter(base, tmp_path / "adapter", kind=kind, r=4, target_modules=targets,
                      modules_to_save=None if kind == "roberta" else ["classifier"])
    result = run("export-onnx", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "onnx")
    assert result.exit_code == 0 and "verification: PASS (full, float32)" in result.output, result.output
    peft = load_peft(base, tmp_path / "adapter")
    generator = torch.Generator().manual_seed(1)
    if kind == "vit":
        inputs = {"pixel_values": torch.randn(5, 3, 32, 32, generator=generator)}
    else:
        ids = torch.randint(4, 256, (3, 11), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    family = FAMILIES["encoder" if kind == "roberta" else "image-classifier" if kind == "vit" else "classifier"]
    with torch.no_grad():
        expected = peft(**inputs)
    actual = onnx_outputs(tmp_path / "onnx", {key: value.numpy() for key, value in inputs.items()}, family.outputs)
    assert actual.keys() and all(
        (torch.from_numpy(value) - expected[name]).abs().max() <= 1e-4 for name, value in actual.items())


def test_export_onnx_refuses_seq2seq_in_one_line(tmp_path):
    build_tiny_model(tmp_path / "base", "t5")
    make_peft_adapter(tmp_path / "base", tmp_path / "adapter", kind="t5", r=4, target_modules=None)
    result = run("export-onnx", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--output",
                 tmp_path / "onnx")
    assert_one_line_error(result, "export-onnx exports causal LMs")
    assert not (tmp_path / "onnx").exists()

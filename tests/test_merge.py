"""`psoft-deploy merge` and `psoft-deploy verify` on merged models."""

import json
import shutil
from collections import namedtuple

import pytest
import torch
import transformers
from helpers import (
    assert_close_relative,
    assert_one_line_error,
    input_ids,
    make_paper_checkpoint,
    make_peft_adapter,
    run,
    verification_report,
)
from safetensors.torch import load_file, save_file

from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import reference_model
from psoft_deploy.testing import build_tiny_model


def all_tensors(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def merge_ok(base_dir, adapter_dir, output, *extra):
    result = run("merge", "--base", base_dir, "--adapter", adapter_dir, "--output", output, *extra)
    assert result.exit_code == 0, result.output
    assert "verification: PASS" in result.output or "--no-verify" in extra
    return result


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "opt"])
def test_merged_causal_lm_equals_the_reference(kind, tiny_base, tmp_path):
    base_dir = tiny_base(kind)
    make_peft_adapter(base_dir, tmp_path / "adapter", kind=kind, r=8)
    merge_ok(base_dir, tmp_path / "adapter", tmp_path / "merged")

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    factors = load_factors(str(tmp_path / "adapter"), str(base_dir))
    ids = input_ids()
    with torch.no_grad():
        expected = reference_model(base_dir, factors)(ids).logits
        assert (merged(ids).logits - expected).abs().max() <= 1e-4
        assert_close_relative(merged(ids).logits, expected, rtol=1e-5)

    base, out = all_tensors(base_dir), all_tensors(tmp_path / "merged")
    assert out.keys() == base.keys(), "same tensors, tied ones still stored once"
    targets = {f"{name}.weight" for name in factors.modules}
    for key, tensor in base.items():
        if key not in targets:
            assert torch.equal(out[key], tensor), f"{key} must be bit-identical"
    for file in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / file).read_bytes() == (base_dir / file).read_bytes()
    assert [file.name for file in (tmp_path / "merged").glob("model*")] == ["model.safetensors"]  # one shard, no index
    report = verification_report(tmp_path / "merged")
    assert report["passed"] and report["mode"] == "full" and report["max_abs_logits"] <= 1e-4
    card = (tmp_path / "merged" / "README.md").read_text()
    assert str(base_dir) in card and "verification: PASS" in card and "psoft-deploy" in card
    assert "base_model:" not in card, "the hub's base_model field is for hub ids, not local paths"


def test_tied_embeddings_stay_tied(tiny_base, tmp_path):
    base_dir = tiny_base("qwen2")  # tie_word_embeddings=True, attention biases
    make_peft_adapter(base_dir, tmp_path / "adapter", kind="qwen2")
    merge_ok(base_dir, tmp_path / "adapter", tmp_path / "merged")
    assert "lm_head.weight" not in all_tensors(tmp_path / "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bert_classifier_with_modules_to_save(tiny_base, tmp_path):
    base_dir = tiny_base("bert")
    peft_model = make_peft_adapter(base_dir, tmp_path / "adapter", kind="bert", modules_to_save=["classifier"])
    with torch.no_grad():
        classifier = peft_model.base_model.model.classifier.modules_to_save["default"]
        classifier.weight.mul_(3.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_ok(base_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = input_ids()
    with torch.no_grad():
        assert (merged(ids).logits - peft_model(ids).logits).abs().max() <= 1e-4
    assert torch.equal(all_tensors(tmp_path / "merged")["classifier.weight"], classifier.weight)


def test_sharded_base_to_sharded_output(tmp_path):
    base_dir = tmp_path / "base"
    model = build_tiny_model(base_dir, "llama")
    for file in base_dir.glob("model*.safetensors"):
        file.unlink()
    model.save_pretrained(base_dir, max_shard_size="100KB")
    assert (base_dir / "model.safetensors.index.json").is_file()
    make_peft_adapter(base_dir, tmp_path / "adapter")
    merge_ok(base_dir, tmp_path / "adapter", tmp_path / "merged", "--max-shard-size", "150KB")

    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    shards = sorted({file for file in index["weight_map"].values()})
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in all_tensors(base_dir).values())
    for file in shards:  # every shard is within the limit (no single tensor here exceeds it)
        assert (tmp_path / "merged" / file).stat().st_size <= 150_000 + 10_000
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.num_hidden_layers == 2


@pytest.mark.slow  # minutes of the fast suite: llama.cpp or half-precision runs
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "opt"])
def test_half_precision_merge_keeps_every_top1(kind, dtype, tiny_base, tmp_path):
    """A trained base and an adapter of a trained size (‖ΔW‖/‖W‖ ≈ 3–7 %): the reference's
    choices on the verification prompts are decisive, as a real model's are, and a bf16/fp16
    merge must keep every one of them."""
    base_dir = tiny_base(kind, trained=True)
    make_peft_adapter(base_dir, tmp_path / "adapter", kind=kind, r=8, strength=0.1)
    merge_ok(base_dir, tmp_path / "adapter", tmp_path / "merged", "--dtype", dtype)
    assert {str(t.dtype) for t in all_tensors(tmp_path / "merged").values()} == {f"torch.{dtype}"}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == dtype
    report = verification_report(tmp_path / "merged")
    assert report["top1_agreement"] == 1.0, "every verification prompt position, not only the decisive ones"
    assert report["positions"] >= 40 and report["decisive_top1_agreement"] == 1.0
    assert not report["bare_base"]["passes_bounds"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_classifier_merge_is_inconclusive_on_logits_and_verified_layerwise(dtype, tiny_base, tmp_path):
    """A tiny BERT classifier's 3 logits on 4 prompts move less under the adapter than under
    bf16/fp16 rounding: the full check cannot tell the merge from the bare base and says so
    (never a vacuous PASS); the layerwise check, where ‖ΔW‖ ≫ the rounding, passes it."""
    base_dir = tiny_base("bert")
    make_peft_adapter(base_dir, tmp_path / "adapter", kind="bert", r=8, strength=0.1, modules_to_save=["classifier"])
    result = run("merge", "--base", base_dir, "--adapter", tmp_path / "adapter", "--output", tmp_path / "full",
                 "--dtype", dtype)
    assert result.exit_code == 1 and "inconclusive: the bare base is within these bounds too" in result.output
    merge_ok(base_dir, tmp_path / "adapter", tmp_path / "merged", "--dtype", dtype, "--verify-mode", "layerwise")
    report = verification_report(tmp_path / "merged")
    assert report["mode"] == "layerwise" and report["layers_where_the_bare_base_passes"] == 0


def test_half_precision_merge_of_random_weights_is_held_to_decisive_positions(tiny_base, tmp_path):
    """Random weights put many next tokens at near-ties that bf16 rounding alone can flip: the
    merge passes on the positions that rounding cannot decide, and says how many those are."""
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", r=8)
    merge_ok(base_dir, tmp_path / "adapter", tmp_path / "merged", "--dtype", "bfloat16")
    report = verification_report(tmp_path / "merged")
    assert report["positions"] // 2 < report["decisive_positions"] < report["positions"]
    assert report["decisive_top1_agreement"] == 1.0


def test_verify_catches_a_wrong_candidate_in_every_mode(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter")
    merge_ok(base_dir, tmp_path / "adapter", tmp_path / "merged")
    for mode in ("full", "layerwise"):
        result = run("verify", "--base", base_dir, "--adapter", tmp_path / "adapter", "--candidate",
                     tmp_path / "merged", "--verify-mode", mode, "--report", tmp_path / f"{mode}.json")
        assert result.exit_code == 0 and result.output.startswith(f"PASS ({mode}, float32)"), result.output
        assert json.loads((tmp_path / f"{mode}.json").read_text())["passed"]
        # the base itself is not the merged model
        result = run("verify", "--base", base_dir, "--adapter", tmp_path / "adapter", "--candidate", base_dir,
                     "--verify-mode", mode)
        assert result.exit_code == 1 and result.output.startswith(f"FAIL ({mode}, float32)"), result.output
    shutil.copytree(base_dir, tmp_path / "bf16-base")
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16-base")
    result = run("verify", "--base", base_dir, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "bf16-base")
    assert result.exit_code == 1 and result.output.startswith("FAIL (full, bfloat16)"), result.output


def test_verify_with_prompts_file(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter")
    merge_ok(base_dir, tmp_path / "adapter", tmp_path / "merged", "--no-verify")
    assert "verification: not run" in (tmp_path / "merged" / "README.md").read_text()
    (tmp_path / "prompts.txt").write_text("The baker opens his shop.\n\nA cat sleeps on the sill.\n")
    result = run("verify", "--base", base_dir, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "merged",
                 "--prompts", tmp_path / "prompts.txt", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    ids = transformers.AutoTokenizer.from_pretrained(base_dir)(["The baker opens his shop.", "A cat sleeps on the sill."])
    assert report["positions"] == sum(len(x) for x in ids["input_ids"])


Case = namedtuple("Case", "name fragment")


def assert_clean_failure(result, tmp_path, fragment, keep=("base", "adapter")):
    assert_one_line_error(result, fragment)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)
    assert left == [] or left == ["existing"], f"partial output left behind: {left}"


@pytest.fixture
def sharded(tmp_path):
    """A sharded llama base (own copy, to be broken) and an adapter for it."""
    base_dir = tmp_path / "base"
    model = build_tiny_model(base_dir, "llama", with_tokenizer=False)
    for file in base_dir.glob("model*.safetensors"):
        file.unlink()
    model.save_pretrained(base_dir, max_shard_size="100KB")
    make_peft_adapter(base_dir, tmp_path / "adapter")
    return base_dir, tmp_path / "adapter"


def test_truncated_base_shard(sharded, tmp_path):
    base_dir, adapter = sharded
    shard = sorted(base_dir.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    result = run("merge", "--base", base_dir, "--adapter", adapter, "--output", tmp_path / "out")
    assert_clean_failure(result, tmp_path, "not a readable safetensors file")


def point_norm_to_a_missing_shard(weight_map):
    weight_map["model.norm.weight"] = "model-00099-of-00099.safetensors"


def drop_an_adapted_tensor(weight_map):
    del weight_map["model.layers.1.self_attn.v_proj.weight"]


@pytest.mark.parametrize("edit,fragment", [
    (point_norm_to_a_missing_shard, "is missing"),
    (drop_an_adapted_tensor, "has no tensor 'model.layers.1.self_attn.v_proj.weight'"),
])
def test_broken_index(edit, fragment, sharded, tmp_path):
    base_dir, adapter = sharded
    index_file = base_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    edit(index["weight_map"])
    index_file.write_text(json.dumps(index))
    result = run("merge", "--base", base_dir, "--adapter", adapter, "--output", tmp_path / "out", "--no-verify")
    assert_clean_failure(result, tmp_path, fragment)


def test_adapter_for_another_architecture(tiny_base, tmp_path):
    make_peft_adapter(tiny_base("llama"), tmp_path / "adapter")
    result = run("merge", "--base", tiny_base("opt"), "--adapter", tmp_path / "adapter", "--output", tmp_path / "out")
    assert_clean_failure(result, tmp_path, "has no tensor 'model.layers.0.")


def test_adapter_for_a_base_of_other_shapes(tiny_base, tmp_path):
    wide, narrow = tiny_base("llama"), tiny_base("llama", hidden=32)
    make_peft_adapter(wide, tmp_path / "adapter")
    assert run("materialize", "--base", wide, "--adapter", tmp_path / "adapter", "--output",
               tmp_path / "materialized").exit_code == 0
    result = run("merge", "--base", narrow, "--adapter", tmp_path / "materialized", "--output", tmp_path / "out")
    assert_clean_failure(result, tmp_path, "another base", keep=("adapter", "materialized"))


def test_nan_in_the_result(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", target_modules=["q_proj"])
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    for key in tensors:
        if key.endswith("vector_b"):
            tensors[key] = torch.full_like(tensors[key], 1e9)  # finite, but the merged fp16 weight overflows
    save_file(tensors, weights)
    result = run("merge", "--base", base_dir, "--adapter", tmp_path / "adapter", "--output", tmp_path / "out",
                 "--dtype", "float16")
    assert_clean_failure(result, tmp_path, "NaN or Inf in model.layers.0.self_attn.q_proj.weight")


def test_existing_output_and_no_disk_space(tiny_base, tmp_path, monkeypatch):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "model.safetensors").write_text("theirs")
    result = run("merge", "--base", base_dir, "--adapter", tmp_path / "adapter", "--output", tmp_path / "existing")
    assert_clean_failure(result, tmp_path, "--overwrite")
    assert (tmp_path / "existing" / "model.safetensors").read_text() == "theirs"

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    result = run("merge", "--base", base_dir, "--adapter", tmp_path / "adapter", "--output", tmp_path / "out")
    assert_clean_failure(result, tmp_path, "not enough disk space")


def test_failed_verification_leaves_nothing(tiny_base, tmp_path, monkeypatch):
    from psoft_deploy.core.psoft import ModuleFactors

    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter")
    correct = ModuleFactors.delta_weight
    monkeypatch.setattr(ModuleFactors, "delta_weight", lambda self: 1.01 * correct(self))  # a subtly wrong merge
    result = run("merge", "--base", base_dir, "--adapter", tmp_path / "adapter", "--output", tmp_path / "out")
    assert_clean_failure(result, tmp_path, "failed verification, nothing written")


def test_merge_reads_a_paper_checkpoint_and_a_materialized_adapter(tiny_base, tmp_path):

    base_dir = tiny_base("llama")
    make_paper_checkpoint(base_dir, tmp_path / "paper", tmp_path / "residual")
    merge_ok(base_dir, tmp_path / "paper", tmp_path / "merged-paper")
    make_peft_adapter(base_dir, tmp_path / "adapter")
    assert run("materialize", "--base", base_dir, "--adapter", tmp_path / "adapter", "--output",
               tmp_path / "m").exit_code == 0
    merge_ok(base_dir, tmp_path / "m", tmp_path / "merged-m")
    merge_ok(base_dir, tmp_path / "adapter", tmp_path / "merged-peft")
    a, b = all_tensors(tmp_path / "merged-m"), all_tensors(tmp_path / "merged-peft")
    assert all(torch.equal(a[key], b[key]) for key in a)

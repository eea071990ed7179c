"""`psoft-deploy export-lora`: exact and truncated LoRA forms, loaded back through PEFT's LoRA code."""

import json
import shutil
import sys
import warnings
from dataclasses import replace

import pytest
import torch
from helpers import (
    VARIANTS,
    assert_close_relative,
    assert_one_line_error,
    input_ids,
    load_peft,
    make_paper_checkpoint,
    make_peft_adapter,
    run,
    verification_report,
)
from safetensors.torch import load_file, save_file

from psoft_deploy.converters.lora_format import LoraAdapter, lora_keys, vllm_max_lora_rank
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import reference_model
from psoft_deploy.core.options import ReadOptions


def export(base_dir, adapter_dir, output, *extra):
    return run("export-lora", "--base", base_dir, "--adapter", adapter_dir, "--output", output, *extra)


def export_ok(*args):
    result = export(*args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("verification: PASS"), result.output
    return result


def assert_lora_equals_reference(base_dir, adapter_dir, lora_dir):
    factors = load_factors(str(adapter_dir), str(base_dir))
    ids = input_ids()
    with torch.no_grad():
        expected = reference_model(base_dir, factors)(ids).logits
        actual = load_peft(base_dir, lora_dir)(ids).logits
    assert (actual - expected).abs().max() <= 1e-4


# The rotation variants (orthogonality, magnitudes, Neumann terms, inits, SVD backends) change only R,
# A and B, which test_peft_adapters.py pins to PEFT for every variant; export-lora's own code depends
# on the rank (shapes, r = lora_alpha), so the exact export is checked at ranks 1, 4, 16 and full.
EXPORT_VARIANTS = ("default", "rank-1", "rank-16", "rank-full")


@pytest.mark.parametrize("variant", EXPORT_VARIANTS)
def test_exact_export_at_every_rank_loads_in_peft(variant, tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", **VARIANTS[variant])
    export_ok(base_dir, tmp_path / "adapter", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] and config["rank_pattern"] == {}
    assert config["base_model_name_or_path"] == str(base_dir.absolute())
    assert_lora_equals_reference(base_dir, tmp_path / "adapter", tmp_path / "lora")
    meta = json.loads((tmp_path / "lora" / "psoft_lora_export.json").read_text())
    assert meta["exact"] and all(m["fingerprint"]["sha256"] for m in meta["modules"].values())
    assert verification_report(tmp_path / "lora")["passed"]


@pytest.mark.parametrize("kind", ["qwen2", "opt", "mistral"])
def test_exact_export_on_other_architectures(kind, tiny_base, tmp_path):
    base_dir = tiny_base(kind)
    make_peft_adapter(base_dir, tmp_path / "adapter", kind=kind, r=8)
    export_ok(base_dir, tmp_path / "adapter", tmp_path / "lora")
    assert_lora_equals_reference(base_dir, tmp_path / "adapter", tmp_path / "lora")


def test_bert_classifier_keeps_modules_to_save(tiny_base, tmp_path):
    base_dir = tiny_base("bert")
    peft_model = make_peft_adapter(base_dir, tmp_path / "adapter", kind="bert", modules_to_save=["classifier"])
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    export_ok(base_dir, tmp_path / "adapter", tmp_path / "lora", "--target", "vllm")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    ids = input_ids()
    with torch.no_grad():
        assert (load_peft(base_dir, tmp_path / "lora")(ids).logits - peft_model(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("terms", [5, None])
def test_paper_checkpoint_export(terms, tiny_base, tmp_path):

    base_dir = tiny_base("llama")
    make_paper_checkpoint(base_dir, tmp_path / "paper", tmp_path / "residual")
    extra = ["--paper-cayley", "exact"] if terms is None else []
    export_ok(base_dir, tmp_path / "paper", tmp_path / "lora", *extra)
    factors = load_factors(str(tmp_path / "paper"), str(base_dir), ReadOptions(paper_neumann_terms=terms))
    ids = input_ids()
    with torch.no_grad():
        expected = reference_model(base_dir, factors)(ids).logits
        assert (load_peft(base_dir, tmp_path / "lora")(ids).logits - expected).abs().max() <= 1e-4


def peft_lora_deltas(base_dir, lora_dir):
    model = load_peft(base_dir, lora_dir)
    return {name.removeprefix("base_model.model."): module.get_delta_weight("default")
            for name, module in model.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A}


@pytest.mark.parametrize("source", ["peft", "paper"])
def test_rank_k_truncation_is_the_best_rank_k_approximation(source, tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    if source == "peft":
        make_peft_adapter(base_dir, tmp_path / "adapter", r=8, ab_svd_init="pissa_init")
    else:

        make_paper_checkpoint(base_dir, tmp_path / "adapter", tmp_path / "residual", r=8)
    export_ok(base_dir, tmp_path / "adapter", tmp_path / "lora", "--rank", 3)
    factors = load_factors(str(tmp_path / "adapter"), str(base_dir))
    meta = json.loads((tmp_path / "lora" / "psoft_lora_export.json").read_text())
    assert not meta["exact"]
    for name, delta_k in peft_lora_deltas(base_dir, tmp_path / "lora").items():
        dense = factors.modules[name].delta_weight().double()
        U, S, Vh = torch.linalg.svd(dense)  # the dense SVD psoft-deploy never runs
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        assert_close_relative(delta_k.double(), best)
        expected_error = (torch.linalg.norm(dense - best) / torch.linalg.norm(dense)).item()
        assert meta["modules"][name]["relative_error"] == pytest.approx(expected_error, rel=1e-4)


def rewrite_truncated(lora_dir, pairs, exact_factors):
    """Replace a truncated export's factors by ``pairs`` (module → lora_A, lora_B) and make its record
    say the errors they have against ``exact_factors``: a record that matches what the file holds."""
    weights = lora_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    meta = json.loads((lora_dir / "psoft_lora_export.json").read_text())
    for name, (lora_A, lora_B) in pairs.items():
        for key, tensor in zip(lora_keys(name), (lora_A, lora_B)):
            tensors[f"base_model.model.{key}"] = tensor.contiguous()
        delta = exact_factors.modules[name].delta_weight().double()
        error = torch.linalg.norm(lora_B.double() @ lora_A.double() - delta) / torch.linalg.norm(delta)
        meta["modules"][name]["relative_error"] = error.item()
    save_file(tensors, weights)
    (lora_dir / "psoft_lora_export.json").write_text(json.dumps(meta))


def test_a_truncated_lora_is_held_to_the_optimum_verify_computes_not_to_its_record(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", r=8)
    make_peft_adapter(base_dir, tmp_path / "other", r=8, seed=7)
    export_ok(base_dir, tmp_path / "adapter", tmp_path / "lora", "--rank", 3)
    export_ok(base_dir, tmp_path / "adapter", tmp_path / "vllm", "--energy", 0.8, "--target", "vllm")  # zero-padded
    export_ok(base_dir, tmp_path / "other", tmp_path / "other-lora", "--rank", 3)
    factors = load_factors(str(tmp_path / "adapter"), str(base_dir))
    for honest in ("lora", "vllm"):
        result = run("verify", "--base", base_dir, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / honest)
        assert result.exit_code == 0 and result.output.startswith("PASS (truncated-lora"), result.output
    worse = {name: (lora_A[:3], lora_B[:, :3]) for name, (lora_A, lora_B) in  # rank 3, not the best rank 3
             ((name, module.lora()) for name, module in factors.modules.items())}
    stored = load_file(tmp_path / "other-lora" / "adapter_model.safetensors")
    other = {name: tuple(stored[f"base_model.model.{key}"] for key in lora_keys(name)) for name in factors.modules}
    for label, pairs in (("worse", worse), ("another", other)):
        shutil.copytree(tmp_path / "lora", tmp_path / label)
        rewrite_truncated(tmp_path / label, pairs, factors)
        result = run("verify", "--base", base_dir, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / label)
        assert result.exit_code == 1 and result.output.startswith("FAIL (truncated-lora"), result.output
        assert "the optimal at rank 3" in result.output
    zero = {name: (lora_A, torch.zeros_like(lora_B)) for name, (lora_A, lora_B) in worse.items()}
    shutil.copytree(tmp_path / "lora", tmp_path / "zero")
    rewrite_truncated(tmp_path / "zero", zero, factors)
    result = run("verify", "--base", base_dir, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "zero")
    assert result.exit_code == 1 and "update is zero (rank 0)" in result.output, result.output


def test_energy_picks_the_smallest_sufficient_rank(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", r=8)
    export_ok(base_dir, tmp_path / "adapter", tmp_path / "lora", "--energy", 0.9)
    factors = load_factors(str(tmp_path / "adapter"), str(base_dir))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    deltas = peft_lora_deltas(base_dir, tmp_path / "lora")
    ranks = set()
    for name, module in factors.modules.items():
        S = torch.linalg.svdvals(module.delta_weight().double())
        share = torch.cumsum(S.square(), 0) / S.square().sum()
        expected = int((share < 0.9).sum()) + 1
        rank = config["rank_pattern"].get(name, config["r"])
        assert rank == expected
        assert config["alpha_pattern"].get(name, config["lora_alpha"]) == rank  # scaling stays 1
        kept = (torch.linalg.norm(deltas[name].double()) / torch.linalg.norm(S)).square()
        assert kept >= 0.9 - 1e-6
        ranks.add(rank)
    assert len(ranks) > 1, "this adapter must exercise rank_pattern"


def test_vllm_target_pads_to_one_rank_and_names_max_lora_rank(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", r=16, psoft_alpha=16)
    export_ok(base_dir, tmp_path / "adapter", tmp_path / "peft-lora", "--energy", 0.8)
    result = export_ok(base_dir, tmp_path / "adapter", tmp_path / "vllm-lora", "--energy", 0.8, "--target", "vllm")
    config = json.loads((tmp_path / "vllm-lora" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {} and config["r"] == config["lora_alpha"]
    assert f"--max-lora-rank {vllm_max_lora_rank(config['r'])}" in result.output
    padded, plain = peft_lora_deltas(base_dir, tmp_path / "vllm-lora"), peft_lora_deltas(base_dir, tmp_path / "peft-lora")
    for name in plain:
        torch.testing.assert_close(padded[name], plain[name], rtol=1e-6, atol=1e-7)


def test_vllm_limits():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 46, 300, 320, 321, 512)] == [1, 8, 8, 16, 64, 320, 320, 512, 512]
    with pytest.raises(UserError, match="above vLLM's largest"):
        vllm_max_lora_rank(513)


def test_vllm_target_refuses_other_modules_to_save(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", modules_to_save=["lm_head"])
    result = export(base_dir, tmp_path / "adapter", tmp_path / "lora", "--target", "vllm")
    assert_one_line_error(result, "vLLM rejects LoRA adapters with modules_to_save")
    assert not (tmp_path / "lora").exists()
    export_ok(base_dir, tmp_path / "adapter", tmp_path / "lora")  # fine for PEFT


def test_bad_options_and_a_wrong_candidate(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter")
    for extra, fragment in ((["--rank", 2, "--energy", 0.9], "not both"), (["--energy", 1.5], "0<x<=1"),
                            (["--rank", 0], "x>=1")):
        result = export(base_dir, tmp_path / "adapter", tmp_path / "lora", *extra)
        assert result.exit_code in (1, 2) and fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "lora").exists()
    make_peft_adapter(base_dir, tmp_path / "other", seed=7)
    export_ok(base_dir, tmp_path / "other", tmp_path / "other-lora")
    for mode in ("auto", "layerwise", "full"):  # auto: layer by layer as PEFT loads it
        result = run("verify", "--base", base_dir, "--adapter", tmp_path / "adapter", "--candidate",
                     tmp_path / "other-lora", "--verify-mode", mode)
        shown = "full" if mode == "full" else "layerwise"
        assert result.exit_code == 1 and result.output.startswith(f"FAIL ({shown}, float32)"), result.output


def test_half_precision_lora(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", r=8)
    export_ok(base_dir, tmp_path / "adapter", tmp_path / "lora", "--dtype", "bfloat16")
    report = verification_report(tmp_path / "lora")
    assert report["dtype"] == "bfloat16" and report["loaded_by"] == "peft" and report["worst_ratio_to_bound"] <= 1
    assert report["layers_where_the_bare_base_passes"] == 0
    result = run("verify", "--base", base_dir, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "lora",
                 "--verify-mode", "full", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["decisive_top1_agreement"] == 1.0, result.output


@pytest.fixture
def without_mlx(monkeypatch):
    """mlx and mlx-lm unimportable, as where `.[mlx]` is not installed (test_mlx.py runs them)."""
    for name in ("mlx", "mlx.core", "mlx_lm"):
        monkeypatch.setitem(sys.modules, name, None)


def test_mlx_target_writes_the_exact_factors_in_mlx_layout(tiny_base, tmp_path, without_mlx):
    """Without mlx, the files alone are judged, and one line says so."""
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", r=8)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # a process shows a warning once
        result = export(base_dir, tmp_path / "adapter", tmp_path / "mlx", "--target", "mlx")
    assert result.exit_code == 0 and result.stdout.startswith("verification: PASS (layerwise, float32)"), result.output
    assert result.stderr.splitlines() == ["Warning: mlx is not installed here: the MLX adapter's files were judged, "
                                          "it was not run (pip install -e '.[mlx]')"]
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]
    parameters = config["lora_parameters"]
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == layers
    assert parameters == {"rank": 8, "scale": 1.0, "dropout": 0.0,
                          "keys": ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]}
    tensors = load_file(tmp_path / "mlx" / "adapters.safetensors")
    factors = load_factors(str(tmp_path / "adapter"), str(base_dir))
    assert len(tensors) == 2 * len(factors.modules)
    for name, module in factors.modules.items():
        lora_A, lora_B = module.lora()
        torch.testing.assert_close(tensors[f"{name}.lora_a"], lora_A.T.float())  # (in, r)
        torch.testing.assert_close(tensors[f"{name}.lora_b"], lora_B.T.float())  # (r, out)
    report = verification_report(tmp_path / "mlx")
    assert report["passed"] and report["runtime"].startswith("not run: mlx is not installed here")
    assert "not run in mlx-lm (mlx is not installed here" in report["tolerance"]


def test_mlx_verification_fails_a_wrong_adapter(tiny_base, tmp_path, without_mlx):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", r=8)
    make_peft_adapter(base_dir, tmp_path / "other", r=8, seed=7)
    assert export(base_dir, tmp_path / "other", tmp_path / "mlx", "--target", "mlx").exit_code == 0
    result = run("verify", "--base", base_dir, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "mlx")
    assert result.exit_code == 1 and result.stdout.startswith("FAIL (layerwise, float32)"), result.output


@pytest.mark.parametrize("config, fragment", [
    ({"modules_to_save": ["lm_head"]}, "mlx-lm adapters hold LoRA layers only"),
    ({"layers_to_transform": [0]}, "mlx-lm applies one set of modules to the last num_layers layers"),
])
def test_mlx_target_refuses_what_mlx_lm_cannot_express(config, fragment, tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", **config)
    assert_one_line_error(export(base_dir, tmp_path / "adapter", tmp_path / "mlx", "--target", "mlx"), fragment)
    assert not (tmp_path / "mlx").exists()


def test_sglang_target_is_one_rank_and_refuses_what_sglang_cannot_apply(tiny_base, tmp_path):
    base_dir = tiny_base("llama")
    make_peft_adapter(base_dir, tmp_path / "adapter", r=16, psoft_alpha=16)
    result = export_ok(base_dir, tmp_path / "adapter", tmp_path / "sglang", "--energy", 0.8, "--target", "sglang")
    assert f"--lora-paths NAME={tmp_path / 'sglang'}" in result.output
    adapter = LoraAdapter.read(tmp_path / "sglang")
    assert adapter.rank_pattern == {} and adapter.alpha_pattern == {} and adapter.r == adapter.lora_alpha
    adapter.check_sglang("the export")
    with pytest.raises(UserError, match="SGLang applies one rank"):
        replace(adapter, rank_pattern={"q_proj": 2}).check_sglang("a PEFT export")
    make_peft_adapter(base_dir, tmp_path / "saved", modules_to_save=["lm_head"])
    result = export(base_dir, tmp_path / "saved", tmp_path / "sglang-saved", "--target", "sglang")
    assert_one_line_error(result, "SGLang's LoRA loader cannot apply modules_to_save")

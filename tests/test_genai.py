"""`psoft-deploy export-onnx` through onnxruntime-genai's model builder, `generate` with og.Generator,
and `verify` of those exports."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, load_peft, make_peft_adapter, run, verification_report
from transformers import AutoTokenizer

from psoft_deploy.converters import genai, genai_runtime
from psoft_deploy.converters.genai_runtime import GenaiModel, genai_generate
from psoft_deploy.converters.verify.tolerances import MAX_LOGIT_NOISE
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.generate import read_adapter_file
from psoft_deploy.core.model import load_base_model
from psoft_deploy.demo import MODEL_SIZES
from psoft_deploy.testing import build_chat_model

PROMPTS = ["The river carries water", "A cat sleeps on the", "def fibonacci(n):"]


def token_ids(base, text: str) -> list[int]:
    return AutoTokenizer.from_pretrained(base)(text)["input_ids"]


def transformers_greedy(model, tokens: list[int], count: int) -> list[int]:
    """Up to ``count`` greedy tokens, the EOS that ends them included (as `genai_generate` returns them)."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([tokens]), max_new_tokens=count, do_sample=False)
    return out[0, len(tokens):].tolist()


@pytest.fixture(scope="module")
def two_adapters(tiny_base, tmp_path_factory):
    """A tiny Llama, two PSOFT adapters on different modules and ranks, their merged fp32 exports,
    and one export of the base with both as inputs."""
    work = tmp_path_factory.mktemp("genai")
    base = tiny_base("llama", trained=True, heads=2)  # head size 32: onnxruntime's fp16 decode fails at 16
    make_peft_adapter(base, work / "a", r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    make_peft_adapter(base, work / "b", r=8, psoft_alpha=8, seed=3, target_modules=["k_proj", "o_proj", "gate_proj"])
    for name in ("a", "b"):
        result = run("export-onnx", "--base", base, "--adapter", work / name, "--output", work / f"merged-{name}")
        assert result.exit_code == 0 and "verification: PASS (full, fp32)" in result.output, result.output
    result = run("export-onnx", "--base", base, "--adapters-as-inputs", "--adapter", f"a={work / 'a'}",
                 "--adapter", f"b={work / 'b'}", "--output", work / "inputs")
    assert result.exit_code == 0 and result.output.count("PASS (full, fp32)") == 2, result.output
    return base, work


@pytest.mark.slow
def test_fp32_export_equals_peft_and_greedy_generate_equals_transformers(two_adapters):
    base, work = two_adapters
    assert {"genai_config.json", "model.onnx", "tokenizer.json"} <= {p.name for p in (work / "merged-a").iterdir()}
    report = verification_report(work / "merged-a")
    assert report["passed"] and report["bare_base"]["passes_bounds"] is False
    card = (work / "merged-a" / "README.md").read_text()
    assert "verification: PASS (full, fp32)" in card and "exact LoRA form" in card and "og.Model" in card
    assert "adapters/b.onnx_adapter" in (work / "inputs" / "README.md").read_text()
    peft = load_peft(base, work / "a")
    model = GenaiModel(work / "merged-a")
    for prompt in PROMPTS:
        tokens = token_ids(base, prompt)
        with torch.no_grad():
            expected = peft(input_ids=torch.tensor([tokens])).logits[0].double().numpy()
        assert np.abs(model.logits(tokens) - expected).max() <= 1e-4
        _, generated = genai_generate(work / "merged-a", prompt, max_new_tokens=8)
        assert generated == transformers_greedy(peft, tokens, 8)
        # and with no adapter: the base as the adapters-as-inputs export runs it
        _, generated = genai_generate(work / "inputs", prompt, max_new_tokens=8)
        assert generated == transformers_greedy(load_base_model(base), tokens, 8)


@pytest.mark.slow
def test_one_model_switches_between_two_adapters_and_none_per_request(two_adapters):
    base, work = two_adapters
    model = GenaiModel(work / "inputs", {name: work / "inputs" / "adapters" / f"{name}.onnx_adapter"
                                         for name in ("a", "b")})
    merged = {name: GenaiModel(work / f"merged-{name}") for name in ("a", "b")}
    tokens = token_ids(base, PROMPTS[0])
    with torch.no_grad():
        base_logits, base_float32 = (load_base_model(base, dtype)(input_ids=torch.tensor([tokens])).logits[0]
                                     .double().numpy() for dtype in (torch.float64, torch.float32))
    tolerance = MAX_LOGIT_NOISE * np.abs(base_float32 - base_logits).max()  # float32's noise, measured here
    for adapter in ("a", None, "b", "a", None, "b"):  # requests in turn, on one loaded model
        logits = model.logits(tokens, adapter)
        expected = merged[adapter].logits(tokens) if adapter else base_logits
        assert np.abs(logits - expected).max() <= tolerance, adapter
        if adapter:
            assert np.abs(logits - base_logits).max() > 10 * tolerance
    # two requests in flight at once, each with its own adapter
    first, second = model.generator(tokens, "a", max_new_tokens=4), model.generator(tokens, "b", max_new_tokens=4)
    for _ in range(4):
        first.generate_next_token()
        second.generate_next_token()
    assert list(first.get_sequence(0))[len(tokens):] == genai_generate(work / "merged-a", PROMPTS[0],
                                                                       max_new_tokens=4)[1]
    assert list(second.get_sequence(0))[len(tokens):] == genai_generate(work / "merged-b", PROMPTS[0],
                                                                        max_new_tokens=4)[1]
    # an adapter file carries its own modules only: the others stay at the graph's rank-0 default
    names = read_adapter_file(work / "inputs" / "adapters" / "a.onnx_adapter")
    assert {name.split(".")[4] for name in names} == {"q_proj", "v_proj", "down_proj"}


def test_an_adapter_files_parameters_outlive_the_reader(tmp_path):
    import gc

    written = {f"m.lora_{factor}.weight": np.random.default_rng(0).standard_normal(shape).astype(np.float32)
               for factor, shape in (("A", (64, 4)), ("B", (4, 64)))}
    genai_runtime.write_adapter_file(written, tmp_path / "a.onnx_adapter")
    read = read_adapter_file(tmp_path / "a.onnx_adapter")
    gc.collect()
    _ = [np.ones(4096) for _ in range(256)]  # reuse the memory an onnxruntime view would point into
    assert all(np.array_equal(read[name], array) for name, array in written.items())


@pytest.mark.slow
def test_the_graph_verification_runs_is_ogs_and_on_mapped_weights_within_float32_rounding(two_adapters):
    base, work = two_adapters
    arrays = read_adapter_file(work / "inputs" / "adapters" / "a.onnx_adapter")
    tokens = token_ids(base, PROMPTS[1])
    og_logits = GenaiModel(work / "inputs", {"a": work / "inputs" / "adapters" / "a.onnx_adapter"}).logits(tokens, "a")
    prepacked = genai_runtime.GraphSession(work / "inputs").logits(tokens, arrays)
    assert np.array_equal(prepacked, og_logits)
    mapped = genai_runtime.GraphSession(work / "inputs", mapped_weights=True)
    data_file = str((work / "inputs" / "model.onnx.data").resolve())
    assert data_file in Path("/proc/self/maps").read_text()  # the weights are the file's pages, not copies
    peft = load_peft(base, work / "a")
    with torch.no_grad():
        float32 = peft(input_ids=torch.tensor([tokens])).logits[0].double().numpy()
        float64 = peft.double()(input_ids=torch.tensor([tokens])).logits[0].numpy()
    float32_noise = np.abs(float32 - float64).max()  # measured here
    assert np.abs(mapped.logits(tokens, arrays) - og_logits).max() <= MAX_LOGIT_NOISE * float32_noise
    assert np.abs(mapped.logits(tokens) - og_logits).max() > 10 * MAX_LOGIT_NOISE * float32_noise  # rank 0: the base
    with pytest.raises(UserError, match=r"^the adapter's parameters do not fit .+ \(no input for model\.other\.A\)"):
        mapped.logits(tokens, {"model.other.A": np.zeros((64, 4), np.float32)})  # another model's adapter file


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_reduced_precision_exports_pass_the_noise_rule_and_a_wrong_adapter_fails(two_adapters, precision, tmp_path):
    import onnx

    base, work = two_adapters
    adapter, other = work / "a", work / "b"
    if precision == "int4":  # judged by behaviour: adapters strong enough to change the tiny model's answers
        adapter, other = tmp_path / "strong", tmp_path / "strong-other"
        make_peft_adapter(base, adapter, r=4, strength=3.0, target_modules=["q_proj", "v_proj", "down_proj"])
        make_peft_adapter(base, other, r=8, psoft_alpha=8, seed=3, strength=3.0,
                          target_modules=["k_proj", "o_proj", "gate_proj"])
    result = run("export-onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "onnx",
                 "--precision", precision)
    assert result.exit_code == 0 and f"verification: PASS (full, {precision})" in result.output, result.output
    report = verification_report(tmp_path / "onnx")
    assert report["bare_base"]["passes_bounds"] is False and "rank 0" in report["tolerance"]
    assert "out of the weights' rounding" in (tmp_path / "onnx" / "README.md").read_text()
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    if precision == "int4":
        assert any(node.op_type == "MatMulNBits" for node in graph.graph.node)
    lora_types = {i.type.tensor_type.elem_type for i in graph.graph.input if ".lora_" in i.name}
    assert lora_types == {onnx.TensorProto.FLOAT if precision == "int4" else onnx.TensorProto.FLOAT16}
    wrong = run("verify", "--base", base, "--adapter", other, "--candidate", tmp_path / "onnx")
    assert wrong.exit_code == 1 and wrong.output.startswith(f"FAIL (full, {precision})"), wrong.output
    layerwise = run("verify", "--base", base, "--adapter", adapter, "--candidate", tmp_path / "onnx",
                    "--verify-mode", "layerwise")
    assert layerwise.exit_code == 0 and layerwise.output.startswith(f"PASS (layerwise, {precision})"), layerwise.output
    wrong = run("verify", "--base", base, "--adapter", other, "--candidate", tmp_path / "onnx",
                "--verify-mode", "layerwise")
    assert wrong.exit_code == 1 and "no LoRA factors in the export" in wrong.output, wrong.output


@pytest.mark.slow
def test_layerwise_runs_the_adapter_through_the_graph_and_a_factor_wired_to_another_layer_fails(two_adapters,
                                                                                                tmp_path):
    """Layer 0's and layer 1's q_proj LoRA inputs swapped where the graph consumes them: each input still
    holds its module's factors and the graph at rank 0 is still the base; only running the adapter shows it."""
    import shutil

    import onnx

    base, work = two_adapters
    shutil.copytree(work / "merged-a", tmp_path / "swapped")
    graph_file = tmp_path / "swapped" / "model.onnx"
    graph = onnx.load(str(graph_file), load_external_data=False)
    swap = {}
    for factor in genai.FACTORS:
        first, second = (genai.lora_input(f"model.layers.{layer}.self_attn.q_proj", factor) for layer in (0, 1))
        swap |= {first: second, second: first}
    for node in graph.graph.node:
        node.input[:] = [swap.get(name, name) for name in node.input]
    onnx.save(graph, str(graph_file))
    layerwise = ("verify", "--base", base, "--adapter", work / "a", "--verify-mode", "layerwise", "--candidate")
    good = run(*layerwise, work / "merged-a")
    assert good.exit_code == 0 and good.output.startswith("PASS (layerwise, fp32)"), good.output
    assert verification_report(work / "merged-a")["mode"] == "full"  # the export's own check ran in full mode
    swapped = run(*layerwise, tmp_path / "swapped")
    assert swapped.exit_code == 1 and swapped.output.startswith("FAIL (layerwise, fp32)"), swapped.output
    assert "the graph with the adapter vs the reference:" in swapped.output
    assert "the graph at rank 0 vs the base" not in swapped.output  # the base is intact


@pytest.mark.slow
def test_adapter_files_verify_one_by_one_and_crossed_ones_fail(two_adapters):
    base, work = two_adapters
    files = work / "inputs" / "adapters"
    good = run("verify", "--base", base, "--adapter", work / "b", "--candidate", files / "b.onnx_adapter")
    assert good.exit_code == 0 and good.output.startswith("PASS (full, fp32)"), good.output
    crossed = run("verify", "--base", base, "--adapter", work / "b", "--candidate", files / "a.onnx_adapter")
    assert crossed.exit_code == 1 and crossed.output.startswith("FAIL"), crossed.output


@pytest.mark.slow
def test_generate_applies_the_chat_template_streams_and_needs_no_torch(tmp_path):
    build_chat_model(tmp_path / "base", layers=2)
    make_peft_adapter(tmp_path / "base", tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    result = run("export-onnx", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--output",
                 tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    messages = [{"role": "user", "content": "Name three colours."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    pieces = []
    text, generated = genai_generate(tmp_path / "onnx", "Name three colours.", max_new_tokens=6,
                                     on_text=pieces.append)
    peft = load_peft(tmp_path / "base", tmp_path / "adapter")
    with torch.no_grad():
        expected = peft.generate(input_ids=torch.tensor([tokens]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(tokens):].tolist()
    assert generated == expected
    assert "".join(pieces) == text and "\ufffd" not in text

    script = ("import sys; from psoft_deploy.cli import main\n"
              f"sys.argv = ['psoft-deploy', 'generate', '--onnx', {str(tmp_path / 'onnx')!r}, '--prompt', "
              "'Name three colours.', '--max-new-tokens', '6', '--no-chat-template']\n"
              "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
              "assert 'torch' not in sys.modules, 'generate imported torch'")
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0 and process.stdout.startswith("Name three colours."), process.stderr[-2000:]


@pytest.mark.slow
def test_exporter_choice_and_bad_options(tiny_base, tmp_path):
    opt = tiny_base("opt")
    make_peft_adapter(opt, tmp_path / "adapter", kind="opt")
    result = run("export-onnx", "--base", opt, "--adapter", tmp_path / "adapter", "--output", tmp_path / "onnx")
    assert result.exit_code == 0 and "verification: PASS (full, float32)" in result.output, result.output
    assert (tmp_path / "onnx" / "model.onnx").is_file() and not (tmp_path / "onnx" / "genai_config.json").exists()
    assert "through torch.onnx: fp32, the adapter merged in float32" in (tmp_path / "onnx" / "README.md").read_text()
    for options, message in ((["--precision", "int4"], "need the onnxruntime-genai exporter"),
                             (["--exporter", "genai"], "does not convert OPTForCausalLM")):
        result = run("export-onnx", "--base", opt, "--adapter", tmp_path / "adapter", "--output", tmp_path / "x",
                     *options)
        assert_one_line_error(result, message)
    gemma3 = tiny_base("gemma3")  # transformers 5 writes its rope_parameters per layer type
    make_peft_adapter(gemma3, tmp_path / "gemma3-adapter")
    for options, message in ((["--exporter", "genai"], "does not read Gemma3ForCausalLM's per-layer-type"),
                             (["--precision", "int4"], "need the onnxruntime-genai exporter, and its model builder")):
        result = run("export-onnx", "--base", gemma3, "--adapter", tmp_path / "gemma3-adapter", "--output",
                     tmp_path / "x", *options)
        assert_one_line_error(result, message)
    llama = tiny_base("llama")
    make_peft_adapter(llama, tmp_path / "saves-head", modules_to_save=["lm_head"])
    result = run("export-onnx", "--base", llama, "--adapter", tmp_path / "saves-head", "--output", tmp_path / "x",
                 "--exporter", "genai")
    assert result.exit_code == 1 and "does not convert adapters with modules_to_save" in result.output, result.output
    make_peft_adapter(llama, tmp_path / "llama-adapter")
    result = run("export-onnx", "--base", llama, "--adapter", tmp_path / "llama-adapter", "--output", tmp_path / "x",
                 "--with-past")
    assert_one_line_error(result, "pass --exporter torch")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_cuda_export_that_cannot_run_here_does_not_pass_on_its_factors_alone(two_adapters, tmp_path):
    import onnxruntime_genai as og

    if og.is_cuda_available():
        pytest.skip("this machine runs CUDA exports: they are verified by running them")
    base, work = two_adapters
    export = ["export-onnx", "--base", base, "--adapter", work / "a", "--output", tmp_path / "onnx", "--precision",
              "int4", "--execution-provider", "cuda"]
    refused = run(*export)
    last = refused.output.strip().splitlines()[-1]
    assert refused.exit_code == 1 and "FAIL (layerwise, int4)" in last and "the graph was not run (cuda" in last
    assert "--no-verify" in last and not (tmp_path / "onnx").exists()
    assert run(*export, "--no-verify").exit_code == 0
    verify = ["verify", "--base", base, "--adapter", work / "a", "--candidate", tmp_path / "onnx"]
    for command in ([*verify, "--verify-mode", "layerwise"], [*verify, "--verify-mode", "full"],
                    ["generate", "--onnx", tmp_path / "onnx", "--prompt", "hi"]):
        failed = run(*command)
        last = failed.output.strip().splitlines()[-1]
        assert failed.exit_code == 1 and last.startswith(("Error:", "FAIL")) and "cuda" in last, failed.output
        assert "--verify-mode layerwise" not in failed.output


@pytest.mark.slow
def test_a_cuda_fp32_export_with_attention_adapters_names_the_precisions_that_take_them(two_adapters, tmp_path):
    """The builder's cuda fp32 graph fuses q/k/v into one Attention node and drops their LoRA; the
    torch exporter (the generic advice) cannot target cuda."""
    base, work = two_adapters
    refused = run("export-onnx", "--base", base, "--adapter", work / "a", "--output", tmp_path / "onnx",
                  "--execution-provider", "cuda", "--no-verify")
    last = assert_one_line_error(refused, "q_proj")
    assert "--precision fp16 or int4" in last and "--exporter torch" not in last and not (tmp_path / "onnx").exists()


def test_builder_refusal_names_every_layer_as_wide_as_the_vocabulary():
    llama = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    assert genai.builder_refusal(llama) is None
    for sizes, named in (({"intermediate_size": 256}, "intermediate_size"),
                         ({"hidden_size": 256, "num_attention_heads": 8, "head_dim": 16}, "hidden_size"),
                         ({"num_attention_heads": 16, "head_dim": 16}, "num_attention_heads × head_dim"),
                         ({"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64},
                          "num_key_value_heads × head_dim"),
                         ({"architectures": ["Phi3ForCausalLM"]}, "2 × intermediate_size"),
                         ({"architectures": ["Phi3ForCausalLM"], "intermediate_size": 96, "head_dim": 32},
                          "(num_attention_heads + 2 × num_key_value_heads) × head_dim")):
        refusal = genai.builder_refusal(llama | sizes)
        assert refusal.startswith("would wire the LM head onto a layer") and f"{named} is 256 too" in refusal, sizes


def build_past_the_refusal(base, adapter, output, precision: str) -> None:
    """A merged export made by calling the model builder directly, past `builder_refusal`."""
    factors = load_factors(str(adapter), str(base))
    output.mkdir()
    genai.build(base, output, {name: module.lora() for name, module in factors.modules.items()},
                precision=precision, execution_provider="cpu", as_inputs=False)
    (output / genai_runtime.EXPORT_RECORD).write_text(json.dumps({"precision": precision, "execution_provider": "cpu"}))


@pytest.fixture(scope="module")
def mis_built(tiny_base, tmp_path_factory):
    """A tiny Llama whose intermediate_size equals its vocab_size (256, the demo's old shape: the
    builder wires the LM head onto layer 0) and a PSOFT adapter for it."""
    base = tiny_base("llama", hidden=128, heads=2)
    adapter = tmp_path_factory.mktemp("mis-built") / "adapter"
    make_peft_adapter(base, adapter, r=8)
    return base, adapter


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_graph_with_the_head_wired_onto_a_layer_fails_in_every_mode(mis_built, precision, tmp_path):
    base, adapter = mis_built
    assert "intermediate_size is 256 too" in genai.builder_refusal(json.loads((base / "config.json").read_text()))
    build_past_the_refusal(base, adapter, tmp_path / "onnx", precision)
    for mode in ("full", "layerwise"):
        result = run("verify", "--base", base, "--adapter", adapter, "--candidate", tmp_path / "onnx",
                     "--verify-mode", mode)
        assert result.exit_code == 1 and result.output.startswith(f"FAIL ({mode}, {precision})"), result.output
    assert "the graph at rank 0 vs the base: " in result.output


@pytest.mark.slow
def test_auto_exports_a_model_the_builder_would_mis_build_through_torch_onnx(mis_built, tmp_path, caplog):
    base, adapter = mis_built
    caplog.set_level(logging.INFO, logger="psoft_deploy")
    result = run("export-onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "onnx")
    assert result.exit_code == 0 and "verification: PASS (full, float32)" in result.output, result.output
    assert not (tmp_path / "onnx" / "genai_config.json").exists()
    notes = [record.getMessage() for record in caplog.records if record.getMessage().startswith("note:")]
    assert len(notes) == 1 and "would wire the LM head onto a layer" in notes[0], notes
    assert notes[0].endswith("exporting with torch.onnx") and "\n" not in notes[0]
    refused = run("export-onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "x",
                  "--exporter", "genai")
    last = refused.output.strip().splitlines()[-1]
    assert refused.exit_code == 1 and "would wire the LM head onto a layer" in last and "--exporter torch" in last


@pytest.mark.slow
def test_the_demo_model_exports_and_its_graph_equals_the_merged_model(tiny_base, tmp_path):
    base = tiny_base("llama", **MODEL_SIZES)
    config = json.loads((base / "config.json").read_text())
    assert len(AutoTokenizer.from_pretrained(base)) == config["vocab_size"]
    assert genai.builder_refusal(config) is None
    adapter = tmp_path / "adapter"
    make_peft_adapter(base, adapter, r=8, target_modules=["q_proj", "v_proj", "o_proj"])  # the demo's targets
    result = run("export-onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "onnx")
    assert result.exit_code == 0 and "verification: PASS (full, fp32)" in result.output, result.output
    layerwise = run("verify", "--base", base, "--adapter", adapter, "--candidate", tmp_path / "onnx",
                    "--verify-mode", "layerwise")
    assert layerwise.exit_code == 0 and layerwise.output.startswith("PASS (layerwise, fp32)"), layerwise.output
    assert run("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "merged").exit_code == 0
    graph = GenaiModel(tmp_path / "onnx")
    merged = {dtype: load_base_model(tmp_path / "merged", dtype) for dtype in (torch.float32, torch.float64)}
    deviation = noise = 0.0
    for prompt in PROMPTS:
        tokens = token_ids(base, prompt)
        with torch.no_grad():
            logits = {dtype: model(input_ids=torch.tensor([tokens])).logits[0].double().numpy()
                      for dtype, model in merged.items()}
        noise = max(noise, np.abs(logits[torch.float32] - logits[torch.float64]).max())
        deviation = max(deviation, np.abs(graph.logits(tokens) - logits[torch.float32]).max())
    assert deviation <= MAX_LOGIT_NOISE * noise, (deviation, noise)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_builder_families_export_int4_and_verify(tiny_base, kind, tmp_path):
    """Qwen2's q/k/v carry biases (the builder keeps them unpacked with LoRA)."""
    base = tiny_base(kind, trained=True)
    make_peft_adapter(base, tmp_path / "adapter", strength=3.0, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    result = run("export-onnx", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "onnx",
                 "--precision", "int4")
    assert result.exit_code == 0 and "verification: PASS (full, int4)" in result.output, result.output
    layerwise = run("verify", "--base", base, "--adapter", tmp_path / "adapter", "--candidate", tmp_path / "onnx",
                    "--verify-mode", "layerwise")
    assert layerwise.exit_code == 0 and layerwise.output.startswith("PASS (layerwise, int4)"), layerwise.output
    assert "over 8 layers" in layerwise.output  # q, k, v and down, 2 layers


@pytest.mark.slow
def test_generate_prints_past_a_token_that_is_no_character(two_adapters):
    """A byte-level token holding a lone byte decodes as U+FFFD in place; og's own decode drops
    everything after it, so the text after it was never printed."""
    from tokenizers import Tokenizer

    from psoft_deploy.converters.genai_runtime import _Decoder
    from psoft_deploy.core.generate import TextStream

    _, work = two_adapters
    export = work / "merged-a"
    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
    ids = (tokenizer.encode("The river", add_special_tokens=False).ids + [tokenizer.token_to_id("ÿ")]
           + tokenizer.encode(" carries water", add_special_tokens=False).ids)
    printed = []
    stream = TextStream(_Decoder(export, GenaiModel(export).tokenizer), printed.append)
    for end in range(1, len(ids) + 1):
        stream.update(ids[:end])
    assert "".join(printed) == "The river\ufffd carries water"


@pytest.mark.slow
def test_an_export_of_the_base_alone_is_verified_against_the_base(two_adapters, mis_built, tmp_path):
    """No adapter: the graph itself is checked against the base in float64; a mis-built one fails."""
    from psoft_deploy.converters.verify import verify_base_export
    from psoft_deploy.core.base import BaseCheckpoint

    base, _ = two_adapters
    result = run("export-onnx", "--base", base, "--output", tmp_path / "onnx")
    assert result.exit_code == 0 and "verification: PASS (full, fp32)" in result.output, result.output
    mis_base, _ = mis_built
    output = tmp_path / "mis-built"
    output.mkdir()
    genai.build(mis_base, output, {}, precision="fp32", execution_provider="cpu", as_inputs=False)
    (output / genai_runtime.EXPORT_RECORD).write_text(json.dumps({"precision": "fp32", "execution_provider": "cpu"}))
    report = verify_base_export(BaseCheckpoint(str(mis_base)), output)
    assert not report.passed and report.failed_checks, report

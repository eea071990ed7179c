"""Artifacts served by vLLM (CPU, float32): a merged model and an exported LoRA adapter give the same
greedy tokens as transformers (merged) and transformers + PEFT's PSOFT layer (LoRA export, with
LoRA restricted to the adapted layers as `psoft-deploy serve` configures vLLM).

vLLM runs in a child process (offline engine, in-process executor): it pins torch to one thread
and binds CPU affinity, which must not leak into the other tests.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import load_peft, make_peft_adapter, run
from transformers import AutoModelForCausalLM, AutoTokenizer

from psoft_deploy.core.architectures import ARCHITECTURES
from psoft_deploy.testing import build_tiny_model

PROMPTS = ["The river carries water", "A cat sleeps on the", "Snow covers the fields", "The baker opens"]
MAX_TOKENS = 12
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]

VLLM_GREEDY = textwrap.dedent("""
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model, lora, prompts, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    options = dict(enable_lora=True, max_lora_rank=64, max_loras=1, lora_target_modules=json.loads(sys.argv[5])) if lora else {}
    llm = LLM(model=model, dtype="float32", max_model_len=128, kv_cache_memory_bytes=64 << 20,
              enforce_eager=True, distributed_executor_backend="uni", **options)
    request = LoRARequest("exported", 1, lora) if lora else None
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), lora_request=request)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
""")


def vllm_greedy(model_dir, lora_dir=None) -> list[list[int]]:
    process = subprocess.run(
        [sys.executable, "-c", VLLM_GREEDY, str(model_dir), str(lora_dir or ""), json.dumps(PROMPTS), str(MAX_TOKENS),
         json.dumps(ARCHITECTURES["LlamaForCausalLM"].vllm_target_modules(TARGETS))],
        capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stderr[-5000:]
    line = next(line for line in process.stdout.splitlines() if line.startswith("TOKENS "))
    return json.loads(line.removeprefix("TOKENS "))


def transformers_greedy(model, tokenizer) -> list[list[int]]:
    tokens = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        tokens.append(out[0, ids["input_ids"].shape[1]:].tolist())
    return tokens


@pytest.mark.slow
def test_merged_model_and_exported_lora_in_vllm(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", hidden=128, heads=2)
    make_peft_adapter(base, tmp_path / "adapter", r=8, target_modules=TARGETS)
    for command in ("merge", "export-lora"):
        result = run(command, "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / command)
        assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(base)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merge", dtype=torch.float32).eval()
    psoft = transformers_greedy(load_peft(base, tmp_path / "adapter"), tokenizer)
    assert transformers_greedy(merged, tokenizer) == psoft
    assert vllm_greedy(tmp_path / "merge") == psoft
    assert vllm_greedy(base, tmp_path / "export-lora") == psoft
    assert vllm_greedy(base) != psoft, "the adapter must change the greedy tokens for this test to mean anything"

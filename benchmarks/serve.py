"""Generation throughput: PSOFT adapters through vLLM (exact LoRA form) vs the base through vLLM vs
transformers + PEFT's PSOFT layer, same model, prompts and token budget, one run.

A ~100M-parameter Llama (768 wide, 12 layers, random weights) and N PSOFT adapters (PEFT format,
r = 32 on q_proj and v_proj). 16 prompts × 64 greedy tokens (EOS ignored). Each vLLM
configuration runs in its own process (offline engine, float32, after a warm-up): the base
alone, and N = 1, 4, 8 adapters assigned round-robin to the prompts, with LoRA restricted to
the adapted layers as `psoft-deploy serve` configures it (``--lora-target-modules``).

    python benchmarks/serve.py [--prompts 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from psoft_deploy.converters.lora_format import vllm_lora_target_modules

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB = 768, 12, 12, 2048, 32000
RANK, TARGETS = 32, ["q_proj", "v_proj"]
ADAPTER_COUNTS = (1, 4, 8)

VLLM_RUN = """
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

model, loras, prompts, tokens = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
options = dict(enable_lora=True, max_lora_rank=RANK, max_loras=len(loras),
               lora_target_modules=TARGET_MODULES) if loras else {}
llm = LLM(model=model, dtype="float32", max_model_len=256, kv_cache_memory_bytes=256 << 20, enforce_eager=True,
          distributed_executor_backend="uni", skip_tokenizer_init=True, **options)
requests = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(loras)]
assigned = [requests[k % len(requests)] for k in range(len(prompts))] if requests else None
params = SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, detokenize=False)
inputs = [{"prompt_token_ids": ids} for ids in prompts]
llm.generate(inputs, SamplingParams(temperature=0, max_tokens=4, detokenize=False), lora_request=assigned)  # warm-up
start = time.perf_counter()
outputs = llm.generate(inputs, params, lora_request=assigned)
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "seconds": seconds}))
""".replace("RANK", str(RANK)).replace("TARGET_MODULES", repr(vllm_lora_target_modules(TARGETS)))


def build(work: Path, adapters: int) -> tuple[Path, list[Path]]:
    """The base model and ``adapters`` PSOFT adapters, each exported to its exact LoRA form."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from psoft_deploy.cli import cli
    from psoft_deploy.testing import llama_modules, write_psoft_adapter

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, intermediate_size=INTERMEDIATE, vocab_size=VOCAB,
                         max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(work / "base")
    loras = []
    for index in range(adapters):
        directory = write_psoft_adapter(work / f"psoft-{index}", llama_modules(LAYERS, TARGETS), RANK, seed=index + 1,
                                        std=0.1)
        cli.main(["export-lora", "--base", str(work / "base"), "--adapter", str(directory), "--output",
                  str(work / f"lora-{index}"), "--no-verify"], standalone_mode=False)
        loras.append(work / f"lora-{index}")
    return work / "base", loras


def vllm_throughput(base: Path, loras: list[Path], prompts: list[list[int]], tokens: int) -> float:
    process = subprocess.run(
        [sys.executable, "-c", VLLM_RUN, str(base), json.dumps([str(p) for p in loras]), json.dumps(prompts),
         str(tokens)], capture_output=True, text=True,
    )
    if process.returncode != 0:
        raise SystemExit(process.stderr[-4000:])
    result = json.loads(next(l for l in process.stdout.splitlines() if l.startswith("RESULT ")).split(" ", 1)[1])
    return result["tokens"] / result["seconds"]


def peft_throughput(base: Path, adapter: Path, prompts: list[list[int]], tokens: int) -> float:
    """transformers ``generate`` with PEFT's PSOFT layer (the adapter as trained), one batch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    input_ids = torch.tensor(prompts)
    with torch.no_grad():
        model.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False)
        seconds = time.perf_counter() - start
    return (out.shape[1] - input_ids.shape[1]) * out.shape[0] / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, VOCAB, (args.prompts, 16), generator=generator).tolist()
    with tempfile.TemporaryDirectory() as work:
        base, loras = build(Path(work), max(ADAPTER_COUNTS))
        results = {"vLLM, base model alone (anchor)": vllm_throughput(base, [], prompts, args.tokens)}
        for count in ADAPTER_COUNTS:
            results[f"vLLM, {count} PSOFT adapter(s) as exact LoRA"] = vllm_throughput(base, loras[:count], prompts,
                                                                                        args.tokens)
        peft = peft_throughput(base, Path(work) / "psoft-0", prompts, args.tokens)
        results["transformers + PEFT PSOFT generate"] = peft
    anchor = results["vLLM, base model alone (anchor)"]
    print(f"Llama {HIDDEN}×{LAYERS} (~100M), PSOFT r={RANK} on {', '.join(TARGETS)}, {args.prompts} prompts × "
          f"{args.tokens} greedy tokens, float32, torch threads={torch.get_num_threads()}")
    for label, rate in results.items():
        print(f"  {label:<44} {rate:8.1f} tok/s   {rate / anchor:5.2f}x base   {rate / peft:5.2f}x transformers+PEFT")


if __name__ == "__main__":
    main()

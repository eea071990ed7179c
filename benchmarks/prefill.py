"""A long prefill through vLLM with PSOFT adapters as k×k cores (k = 128) over the base's shared basis,
against the same adapters as exact LoRA and the base alone: the engine's peak RSS and the time to
first token of 2,048-token prompts, one run.

A Llama 768 wide × 12 layers (random weights, float32); PSOFT adapters r = 128 on every projection
(q, k, v, o, gate, up, down), their exact LoRA form built with psoft-deploy's math and their cores by
`SharedBasis.shared_form`, as `psoft-deploy serve` does. Each configuration runs in its own process
(vLLM's offline engine, enforce-eager, after a warm-up): ``--requests`` prompts of ``--length`` tokens,
each to its own adapter, one token each. Printed: the peak RSS the prefill added over the engine's
RSS before it (and its difference to the base alone's), and the median time to first token against the
base alone's, in the same run.

    python benchmarks/prefill.py [--length 2048] [--requests 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from psoft_deploy.core.architectures import ARCHITECTURES
from serve import build  # benchmarks/serve.py: the base, adapters, their cores and the basis

MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
             intermediate_size=2048, vocab_size=32000, tie_word_embeddings=False)
RANK = 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ENGINE_RUN = """
import json, os, resource, statistics, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import psutil
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

model, paths, prompts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
length = len(prompts[0])
options = dict(enable_lora=True, max_lora_rank=RANK, max_loras=len(paths), max_cpu_loras=len(paths),
               lora_target_modules=TARGET_MODULES) if paths else {}
llm = LLM(model=model, dtype="float32", max_model_len=length + 16, kv_cache_memory_bytes=1 << 30, enforce_eager=True,
          max_num_seqs=len(prompts), max_num_batched_tokens=length, distributed_executor_backend="uni",
          skip_tokenizer_init=True, **options)
requests = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(paths)] or [None] * len(prompts)
params = SamplingParams(temperature=0, max_tokens=1, detokenize=False)
llm.generate([{"prompt_token_ids": prompts[0][:64]}], params, lora_request=requests[0], use_tqdm=False)  # warm-up
before = psutil.Process().memory_info().rss
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
ttft = []
for ids, request in zip(prompts, requests):
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], params, lora_request=request, use_tqdm=False)
    ttft.append(time.perf_counter() - start)
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10, peak_before)
print("RESULT " + json.dumps({"peak_growth": peak - before, "ttft": statistics.median(ttft)}))
""".replace("RANK", str(RANK)).replace("TARGET_MODULES", repr(ARCHITECTURES["LlamaForCausalLM"].vllm_target_modules(
    TARGETS)))


def run_engine(base: Path, paths: list[Path], prompts: list[list[int]], basis=None) -> dict:
    env = dict(os.environ) | ({"PSOFT_DEPLOY_SHARED_BASIS": str(basis.path)} if basis else {})
    process = subprocess.run([sys.executable, "-c", ENGINE_RUN, str(base), json.dumps([str(p) for p in paths]),
                              json.dumps(prompts)], capture_output=True, text=True, env=env)
    if process.returncode != 0:
        raise SystemExit(process.stderr[-4000:])
    return json.loads(next(line for line in process.stdout.splitlines() if line.startswith("RESULT ")).split(" ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=4)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, MODEL["vocab_size"], (args.requests, args.length), generator=generator).tolist()
    with tempfile.TemporaryDirectory() as work:
        base, loras, cores, basis = build(Path(work), MODEL, args.requests, RANK, TARGETS, kept=args.requests,
                                          strength=0.02)
        rows = {"base alone (anchor)": run_engine(base, [], prompts),
                f"exact LoRA r {RANK}": run_engine(base, loras, prompts),
                f"cores k {RANK}": run_engine(base, cores, prompts, basis)}
    anchor = rows["base alone (anchor)"]
    print(f"\nLlama 768 wide × 12 layers, PSOFT r = {RANK} on every projection, {args.requests} prompts × "
          f"{args.length} tokens, each to its own adapter, float32, torch threads={torch.get_num_threads()}")
    for label, row in rows.items():
        print(f"  {label:<22} prefill peak RSS +{row['peak_growth'] / 2**20:7.1f} MiB "
              f"({(row['peak_growth'] - anchor['peak_growth']) / 2**20:+7.1f} MiB vs base)   "
              f"TTFT {row['ttft'] * 1000:7.0f} ms ({row['ttft'] / anchor['ttft']:4.2f}x base)")


if __name__ == "__main__":
    main()

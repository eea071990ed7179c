"""Generation through vLLM: PSOFT adapters as k×k cores over the base's shared basis vs the same
adapters as exact LoRA vs the base alone, same model, prompts and token budget, one run.

Two Llama shapes with random weights: 768 wide × 12 layers (~100M), and SmolLM2-135M's (576 wide,
30 layers, head size 64, tied embeddings). PSOFT adapters r = 32 on q_proj and v_proj, their exact
LoRA form built with psoft-deploy's math (one principal subspace per module, a random R per adapter),
their cores by `SharedBasis.shared_form`, as `psoft-deploy serve` does. Each configuration runs in its
own process (vLLM's offline engine, float32, enforce-eager, after a warm-up); requests are spread
round-robin over 1, 8 or 64 distinct adapters, and in the last run over 1,000 registered adapters,
each answering its own request (1,000 prompts × a quarter of the tokens: another workload, so its
rate is not compared with the base's). Printed per configuration: tokens/s (and its ratio to the base
alone, measured in the same run), the median time to first token, and for the cores the engine's RSS
growth per registered adapter against r² × modules × 4 bytes. The answers of the 1,000-adapter run's
first 64 adapters are compared with the exact-LoRA run's.

With ``--tensor-parallel-size N`` (N > 1) every engine runs at that tensor parallelism (vLLM's `mp`
executor, a core per rank unless ``VLLM_CPU_OMP_THREADS_BIND`` says otherwise), and with ``--device cuda``
on a GPU (vLLM's CUDA build, docs/install.md) with CUDA graphs on (no enforce-eager); the rows are then
the base alone (the anchor), and 64 distinct adapters as exact LoRA and as cores, their answers
compared with each other and with transformers + PEFT's greedy answers (each prompt under its adapter).

    python benchmarks/serve.py [--prompts 64] [--tokens 32] [--model 768x12|smollm|both]
                               [--tensor-parallel-size N] [--device cpu|cuda]
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

from psoft_deploy.converters.lora_format import LoraAdapter, lora_keys
from psoft_deploy.core.architectures import ARCHITECTURES

MODELS = {
    "768x12": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                   intermediate_size=2048, vocab_size=32000, tie_word_embeddings=False),
    "smollm": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
}
RANK, TARGETS = 32, ["q_proj", "v_proj"]
SPREADS = (1, 8, 64)
REGISTERED = 1000

ENGINE_RUN = """
import json, os, statistics, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import psutil
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

model, paths, distinct, prompts, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
tp, device = int(sys.argv[6]), sys.argv[7]
options = dict(enable_lora=True, max_lora_rank=RANK, max_loras=max(1, min(distinct, 64)), max_cpu_loras=max(1, len(paths)),
               lora_target_modules=TARGET_MODULES) if paths else {}
llm = LLM(model=model, dtype="float32", max_model_len=256, kv_cache_memory_bytes=512 << 20, enforce_eager=device == "cpu",
          max_num_seqs=64, distributed_executor_backend="mp" if tp > 1 else "uni", tensor_parallel_size=tp,
          skip_tokenizer_init=True, **options)
engine = llm.llm_engine
requests = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(paths)]
rss = psutil.Process().memory_info().rss
for request in requests:
    engine.add_lora(request)
growth = (psutil.Process().memory_info().rss - rss) / max(1, len(requests))
assigned = [requests[k % distinct] for k in range(len(prompts))] if requests else [None] * len(prompts)
params = SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, detokenize=False)
llm.generate([{"prompt_token_ids": ids} for ids in prompts[:8]], SamplingParams(temperature=0, max_tokens=4, detokenize=False),
             lora_request=assigned[:8] if requests else None, use_tqdm=False)  # warm-up
start = time.perf_counter()
for k, (ids, lora) in enumerate(zip(prompts, assigned)):
    engine.add_request(str(k), {"prompt_token_ids": ids}, params, lora_request=lora)
first, answers = {}, {}
while engine.has_unfinished_requests():
    for output in engine.step():
        if output.outputs and output.outputs[0].token_ids and output.request_id not in first:
            first[output.request_id] = time.perf_counter() - start
        if output.finished:
            answers[output.request_id] = list(output.outputs[0].token_ids)
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"tokens": sum(map(len, answers.values())), "seconds": seconds,
                              "ttft": statistics.median(first.values()), "rss_per_adapter": growth,
                              "answers": [answers[str(k)] for k in range(len(prompts))]}))
""".replace("RANK", str(RANK)).replace("TARGET_MODULES", repr(ARCHITECTURES["LlamaForCausalLM"].vllm_target_modules(TARGETS)))


def build(work: Path, config: dict, count: int, rank: int = RANK, targets: list[str] = TARGETS,
          kept: int = max(SPREADS), strength: float = 0.1) -> tuple[Path, list[Path], list[Path], object]:
    """A Llama of ``config`` (random weights), ``count`` PSOFT adapters of ``rank`` on ``targets`` (a random R
    each, generators of ``strength``): their exact LoRA directories (the first ``kept`` kept), their cores, the basis."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from psoft_deploy.core.base import BaseCheckpoint
    from psoft_deploy.core.psoft import ModuleFactors, RotationSpec, SubspaceSpec, principal_subspace, rotation
    from psoft_deploy.serve.shared import SharedBasis
    from psoft_deploy.testing import llama_modules

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, **config)).save_pretrained(work / "base")
    checkpoint = BaseCheckpoint(work / "base")
    modules = llama_modules(config["num_hidden_layers"], targets)
    subspaces = {m: principal_subspace(checkpoint.tensor(f"{m}.weight"), rank, 1.0, SubspaceSpec()) for m in modules}
    basis = SharedBasis.build(work / "cache", checkpoint, modules, rank)
    generator = torch.Generator().manual_seed(1)
    loras, cores = [], []
    for index in range(count):
        tensors = {}
        for module, (A, B) in subspaces.items():
            R = rotation(strength * torch.randn(rank * (rank - 1) // 2, generator=generator), rank, RotationSpec())
            tensors |= dict(zip(lora_keys(module), ModuleFactors(A=A, B=B, R=R, scale=1.0).lora()))
        directory = work / f"lora-{index}"
        directory.mkdir()
        LoraAdapter(r=rank, lora_alpha=rank, target_modules=targets).write(directory, tensors)
        core_dir, why = basis.shared_form(directory, work / "cache")
        if core_dir is None:
            raise SystemExit(f"adapter {index} is not in the shared basis: {why}")
        cores.append(core_dir)
        if index < kept:
            loras.append(directory)
        else:
            for file in directory.iterdir():
                file.unlink()
            directory.rmdir()
    return work / "base", loras, cores, basis


def run_engine(base: Path, paths: list[Path], distinct: int, prompts: list[list[int]], tokens: int,
               basis=None, tp: int = 1, device: str = "cpu") -> dict:
    env = dict(os.environ) | ({"PSOFT_DEPLOY_SHARED_BASIS": str(basis.path)}
                              if basis else {})  # as serve runs adapters that all lie in the basis
    if tp > 1:  # a core per rank (vLLM-CPU's own binding needs a NUMA node per rank)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, range(tp))))
    process = subprocess.run([sys.executable, "-c", ENGINE_RUN, str(base), json.dumps([str(p) for p in paths]),
                              str(distinct), json.dumps(prompts), str(tokens), str(tp), device], capture_output=True,
                             text=True, env=env)
    if process.returncode != 0:
        raise SystemExit(process.stderr[-4000:])
    result = json.loads(next(line for line in process.stdout.splitlines() if line.startswith("RESULT ")).split(" ", 1)[1])
    return result | {"said": [line for line in process.stderr.splitlines() if line.startswith("psoft-deploy: ")]}


def bench(shape: str, prompts_count: int, tokens: int) -> None:
    config = MODELS[shape]
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, config["vocab_size"], (prompts_count, 16), generator=generator).tolist()
    many = torch.randint(10, config["vocab_size"], (REGISTERED, 16), generator=generator).tolist()
    many[:prompts_count] = prompts
    with tempfile.TemporaryDirectory() as work:
        base, loras, cores, basis = build(Path(work), MODELS[shape], REGISTERED)
        rows = {"base alone (anchor)": run_engine(base, [], 1, prompts, tokens)}
        for spread in SPREADS:
            rows[f"exact LoRA, {spread} registered, {spread} distinct"] = run_engine(base, loras[:spread], spread, prompts, tokens)
            rows[f"cores, {spread} registered, {spread} distinct"] = run_engine(base, cores[:spread], spread, prompts, tokens,
                                                                                 basis)
        rows[f"cores, {REGISTERED} registered, 64 distinct"] = run_engine(base, cores, 64, prompts, tokens, basis)
        short = max(4, tokens // 4)
        rows[f"cores, {REGISTERED} registered, each its own request ({short} tokens)"] = everyone = run_engine(
            base, cores, REGISTERED, many, short, basis)
    anchor = rows["base alone (anchor)"]["tokens"] / rows["base alone (anchor)"]["seconds"]
    modules = config["num_hidden_layers"] * len(TARGETS)
    per_adapter = RANK * RANK * modules * 4
    print(f"\nLlama {shape} ({config['hidden_size']} wide, {config['num_hidden_layers']} layers), PSOFT r={RANK} on "
          f"{', '.join(TARGETS)}, {prompts_count} prompts × {tokens} greedy tokens, float32, torch threads="
          f"{torch.get_num_threads()}; r² × modules × 4 B = {per_adapter / 1024:.0f} KiB")
    for label, row in rows.items():
        rate = row["tokens"] / row["seconds"]
        rss = f"   RSS +{row['rss_per_adapter'] / 1024:7.0f} KiB/adapter ({row['rss_per_adapter'] / per_adapter:4.2f}x)" \
            if "registered" in label and "cores" in label else ""
        ratio = "   (another workload)" if "own request" in label else f"{rate / anchor:5.2f}x base"
        print(f"  {label:<62} {rate:8.1f} tok/s  {ratio:>10}   TTFT {row['ttft'] * 1000:7.0f} ms{rss}")
    lora_answers = rows["exact LoRA, 64 registered, 64 distinct"]["answers"]
    equal = sum(a[:short] == b for a, b in zip(lora_answers, everyone["answers"][:prompts_count]))
    answered = sum(len(a) == short for a in everyone["answers"])
    print(f"  1,000 adapters: {answered}/{REGISTERED} answered; the first {prompts_count} equal the exact-LoRA run's: "
          f"{equal}/{prompts_count}")


def peft_answers(base: Path, loras: list[Path], prompts: list[list[int]], tokens: int, device: str) -> list[list[int]]:
    """transformers + PEFT's greedy tokens of each prompt under its adapter (prompt k: adapter k mod count), float32."""
    from peft import PeftModel

    from psoft_deploy.core.model import load_base_model

    model = PeftModel.from_pretrained(load_base_model(base, torch.float32).to(device), loras[0], adapter_name="a0")
    for index, path in enumerate(loras[1:], 1):
        model.load_adapter(path, adapter_name=f"a{index}")
    answers = []
    with torch.no_grad():
        for k, ids in enumerate(prompts):
            model.set_adapter(f"a{k % len(loras)}")
            out = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False)
            answers.append(out[0, len(ids):].tolist())
    return answers


def bench_distinct(shape: str, prompts_count: int, tokens: int, tp: int, device: str) -> None:
    """The base alone and 64 distinct adapters as exact LoRA and as cores, every engine at tensor parallelism
    ``tp`` on ``device`` (CUDA: graphs on), the answers compared with transformers + PEFT's."""
    config, spread = MODELS[shape], max(SPREADS)
    prompts = torch.randint(10, config["vocab_size"], (prompts_count, 16), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as work:
        base, loras, cores, basis = build(Path(work), MODELS[shape], spread)
        rows = {"base alone (anchor)": run_engine(base, [], 1, prompts, tokens, tp=tp, device=device),
                f"exact LoRA, {spread} distinct": run_engine(base, loras, spread, prompts, tokens, tp=tp, device=device),
                f"cores, {spread} distinct": run_engine(base, cores, spread, prompts, tokens, basis, tp=tp, device=device)}
        reference = peft_answers(base, loras[:spread], prompts, tokens, device)
    anchor = rows["base alone (anchor)"]["tokens"] / rows["base alone (anchor)"]["seconds"]
    graphs = ", CUDA graphs" if device == "cuda" else ""
    print(f"\nLlama {shape} ({config['hidden_size']} wide, {config['num_hidden_layers']} layers), PSOFT r={RANK} on "
          f"{', '.join(TARGETS)}, {prompts_count} prompts × {tokens} greedy tokens, float32, {device}{graphs}, "
          f"tensor parallel size {tp}")
    for label, row in rows.items():
        rate = row["tokens"] / row["seconds"]
        print(f"  {label:<30} {rate:8.1f} tok/s  {rate / anchor:5.2f}x base   TTFT {row['ttft'] * 1000:7.0f} ms")
    for label in (f"exact LoRA, {spread} distinct", f"cores, {spread} distinct"):
        equal = sum(a == b for a, b in zip(rows[label]["answers"], reference))
        print(f"  {label}: answers equal transformers + PEFT's: {equal}/{prompts_count}")
    print(f"  the plugin said: {'; '.join(rows[f'cores, {spread} distinct']['said']) or 'nothing'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU and vLLM's CUDA build (docs/install.md)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for shape in MODELS if args.model == "both" else [args.model]:
        if args.tensor_parallel_size > 1 or args.device == "cuda":
            bench_distinct(shape, args.prompts, args.tokens, args.tensor_parallel_size, args.device)
        else:
            bench(shape, args.prompts, args.tokens)


if __name__ == "__main__":
    main()

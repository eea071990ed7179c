"""A platform's adapters: PSOFT adapters arriving by the thousand in an adapter root, served by
`psoft-deploy serve` over HTTP, against vLLM's own server serving the base alone, one run.

A Qwen2 256 wide × 4 layers (random weights, float32); PEFT PSOFT adapters r 8 on q/k/v/o_proj (PEFT's
own files, a random R per adapter). Every server gets the same KV cache, context and --max-num-seqs.
Rows:
- the base alone (anchor): N requests (16-token prompts, 8 greedy tokens each), 64 in flight;
- serve --adapter-root with the N adapters in it: the same requests, each to its own adapter, first
  pass (each adapter made servable on arrival: cores from R, loaded by vLLM) and second pass;
  tokens/s and its ratio to the anchor, request latency p50/p99;
- time to ready: vLLM alone, serve --adapter-root (N adapters in it), serve with N --adapter;
- engine RSS (vLLM's processes) per resident adapter after R adapters were each asked once, against
  r² × modules × 4 bytes.

    python benchmarks/adapter_root.py [--adapters 1000] [--resident 10000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file

RANK, TARGETS, TOKENS, IN_FLIGHT = 8, ["q_proj", "k_proj", "v_proj", "o_proj"], 8, 64
SHAPE = dict(hidden=256, layers=4, heads=4)
VLLM_ARGS = ["--max-num-seqs", str(IN_FLIGHT), "--kv-cache-memory-bytes", str(1 << 30), "--max-model-len", "256",
             "--dtype", "float32"]


def build(work: Path, count: int) -> tuple[Path, list[Path]]:
    """The base and ``count`` PEFT PSOFT adapters in ``work/root`` (one made by PEFT, the others its
    files with another random R)."""
    from peft import PsoftConfig, get_peft_model

    from psoft_deploy.core.model import load_base_model
    from psoft_deploy.testing import build_tiny_model

    build_tiny_model(work / "base", "qwen2", **SHAPE)
    first = work / "root" / "a0"
    get_peft_model(load_base_model(work / "base"), PsoftConfig(r=RANK, psoft_alpha=RANK, target_modules=TARGETS)
                   ).save_pretrained(first)
    weights = load_file(first / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    paths = [first]
    for index in range(1, count):
        directory = work / "root" / f"a{index}"
        directory.mkdir()
        shutil.copy(first / "adapter_config.json", directory)
        save_file({key: (1 + 0.05 * torch.randn(value.shape, generator=generator)) if "vector" in key
                   else 0.1 * torch.randn(value.shape, generator=generator) for key, value in weights.items()},
                  directory / "adapter_model.safetensors")
        paths.append(directory)
    return work / "base", paths


class Server:
    """A server process (vLLM's, or serve's), ready when /health answers; its start-up time."""

    def __init__(self, command: list[str], port: int, log: Path):
        self.port, self.log = port, open(log, "w")
        start = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        while not self.healthy():
            if self.process.poll() is not None:
                raise SystemExit(f"server exited: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.ready_s = time.perf_counter() - start

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def rss(self) -> int:
        processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        return sum(process.memory_info().rss for process in processes if process.is_running())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def vllm_alone(base: Path, port: int, log: Path) -> Server:
    return Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--port",
                   str(port), *VLLM_ARGS], port, log)


def serve(base: Path, port: int, log: Path, cache: Path, *options: str) -> Server:
    return Server([sys.executable, "-m", "psoft_deploy", "serve", "--base", str(base), "--port", str(port),
                   "--cache-dir", str(cache), *options, "--", *VLLM_ARGS], port, log)


def ask(port: int, models: list[str], prompts: list[list[int]], tokens: int = TOKENS) -> dict:
    """One request per (model, prompt), IN_FLIGHT at a time: generated tokens, seconds, latencies."""

    def one(job):
        model, prompt = job
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "min_tokens": tokens,
                           "temperature": 0, "ignore_eos": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            usage = json.loads(response.read())["usage"]
        return usage["completion_tokens"], time.perf_counter() - began

    start = time.perf_counter()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        results = list(pool.map(one, zip(models, prompts)))
    latencies = sorted(latency for _, latency in results)
    return {"tokens": sum(tokens for tokens, _ in results), "seconds": time.perf_counter() - start,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--resident", type=int, default=10000)
    parser.add_argument("--port", type=int, default=8631)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, paths = build(work, max(args.adapters, args.resident))
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        prompts = torch.randint(10, vocab, (args.adapters, 16), generator=torch.Generator().manual_seed(1)).tolist()
        names = [path.name for path in paths]
        first_root = work / "first-root"  # the first N adapters alone in a root (the resolver takes no symlink out)
        first_root.mkdir()
        for path in paths[:args.adapters]:
            shutil.copytree(path, first_root / path.name)
        rows, ready = {}, {}

        server = vllm_alone(base, args.port, work / "vllm-alone.log")
        ready["vLLM alone (anchor)"] = server.ready_s
        try:
            ask(server.port, [str(base)] * 8, prompts[:8])  # warm-up
            rows["base alone (anchor)"] = ask(server.port, [str(base)] * args.adapters, prompts)
        finally:
            server.stop()

        server = serve(base, args.port, work / "serve-root.log", work / "cache", "--adapter-root", str(first_root))
        ready[f"serve --adapter-root ({args.adapters} adapters in it)"] = server.ready_s
        try:
            ask(server.port, [str(base)] * 8, prompts[:8])  # warm-up
            adapters = names[:args.adapters]
            rows["cores, first pass (each adapter registered on arrival)"] = ask(server.port, adapters, prompts)
            rows["cores, second pass"] = ask(server.port, adapters, prompts)
        finally:
            server.stop()

        named = [option for path in paths[:args.adapters] for option in ("--adapter", f"{path.name}={path}")]
        server = serve(base, args.port, work / "serve-named.log", work / "cache-named", *named)
        ready[f"serve, {args.adapters} --adapter"] = server.ready_s
        server.stop()

        server = serve(base, args.port, work / "serve-resident.log", work / "cache", "--adapter-root", str(work / "root"))
        try:
            ask(server.port, [str(base)] * 8, prompts[:8], tokens=1)
            before = server.rss()
            resident = names[:args.resident]
            ask(server.port, resident, [prompts[k % len(prompts)] for k in range(len(resident))], tokens=1)
            per_adapter = (server.rss() - before) / len(resident)
        finally:
            server.stop()

    anchor = rows["base alone (anchor)"]
    print(f"\nQwen2 {SHAPE['hidden']}×{SHAPE['layers']}, PSOFT r {RANK} on {', '.join(TARGETS)}; {args.adapters} requests "
          f"(16-token prompts, {TOKENS} greedy tokens), {IN_FLIGHT} in flight; float32; {psutil.cpu_count()} CPUs")
    for label, row in rows.items():
        rate = row["tokens"] / row["seconds"]
        print(f"  {label:<58} {rate:8.1f} tok/s  {rate / (anchor['tokens'] / anchor['seconds']):5.2f}x base   "
              f"latency p50 {row['p50'] * 1000:6.0f} ms  p99 {row['p99'] * 1000:6.0f} ms")
    for label, seconds in ready.items():
        print(f"  time to ready, {label:<48} {seconds:7.1f} s")
    budget = RANK * RANK * len(TARGETS) * SHAPE["layers"] * 4
    print(f"  engine RSS per resident adapter at {args.resident}: {per_adapter / 1024:.1f} KiB "
          f"({per_adapter / budget:.2f}x r² × modules × 4 B = {budget / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()

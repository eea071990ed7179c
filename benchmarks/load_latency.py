"""Latency of making an adapter servable on a running `psoft-deploy serve`: posted to the load endpoint
vs resolved by name from the adapter root, one at a time, p50 and p99.

The demo's tiny Llama (128 wide, 2 layers); N PEFT PSOFT adapters (r = 8 on q_proj and v_proj, each
its own random R and magnitudes) in the adapter root; one more named at start, so that the server holds
the shared basis and the others arrive as cores. Rows:
- endpoint: ``POST /v1/load_lora_adapter`` until its 200 (preparation, then vLLM's load);
- endpoint, prepared: the same directories posted again under new names (serve's cache already holds them);
- resolver: the first request naming an adapter of the root (1 token) until its answer;
- loaded: a 1-token request to an adapter already loaded (what the resolver rows include besides the load).

    python benchmarks/load_latency.py [--adapters 50]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

TARGETS, RANK = ["q_proj", "v_proj"], 8


def write_adapters(base: Path, directories: list[Path]) -> None:
    """A PEFT PSOFT adapter in each directory, each with its own random R and magnitudes."""
    from peft import PsoftConfig, get_peft_model

    from psoft_deploy.core.model import load_base_model

    model = get_peft_model(load_base_model(base), PsoftConfig(r=RANK, psoft_alpha=RANK, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(0)
    for directory in directories:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".psoft_R." in name:
                    noise = 0.1 * torch.randn(param.shape, generator=generator)
                    param.copy_(1 + noise if name.endswith(("vector_a", "vector_b")) else noise)
        model.save_pretrained(directory)


def timed_post(url: str, payload: dict) -> float:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        assert response.status == 200, response.read()
        response.read()
    return time.perf_counter() - start


def row(label: str, seconds: list[float]) -> str:
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return (f"  {label:<38} n={len(seconds):<4} p50 {cuts[49] * 1000:7.1f} ms   p99 {cuts[98] * 1000:7.1f} ms   "
            f"first {seconds[0] * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=50, help="adapters per row")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    from psoft_deploy.demo import MODEL_SIZES
    from psoft_deploy.testing import build_tiny_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        build_tiny_model(work / "base", "llama", **MODEL_SIZES)
        count = args.adapters
        posted, resolved = [f"posted-{i}" for i in range(count)], [f"resolved-{i}" for i in range(count)]
        write_adapters(work / "base", [work / "named", *(work / "root" / name for name in posted + resolved)])
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        with open(work / "serve.log", "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "psoft_deploy", "serve", "--base", str(work / "base"), "--adapter",
                 f"named={work / 'named'}", "--adapter-root", str(work / "root"), "--port", str(port), "--cache-dir",
                 str(work / "cache"), "--", "--enforce-eager", "--max-num-seqs", "8"], stdout=log, stderr=subprocess.STDOUT)
        try:
            while "psoft-deploy: serving on" not in (work / "serve.log").read_text():
                if server.poll() is not None:
                    raise SystemExit((work / "serve.log").read_text()[-3000:])
                time.sleep(1)
            load, completions = f"{url}/v1/load_lora_adapter", f"{url}/v1/completions"

            def one_token(model: str) -> float:
                return timed_post(completions, {"model": model, "prompt": "The river", "max_tokens": 1, "temperature": 0})

            rows = {
                "endpoint": [timed_post(load, {"lora_name": name, "lora_path": name}) for name in posted],
                "endpoint, prepared (cache hit)": [timed_post(load, {"lora_name": f"again-{name}", "lora_path": name})
                                                   for name in posted],
                "resolver (first request, 1 token)": [one_token(name) for name in resolved],
                "loaded (1-token request)": [one_token(name) for name in resolved],
            }
        finally:
            server.terminate()
            server.wait(timeout=120)
    print(f"\nMaking a PSOFT adapter servable (tiny Llama {MODEL_SIZES['hidden']}×{MODEL_SIZES['layers']}, r={RANK} on "
          f"{', '.join(TARGETS)}, cores over the shared basis), one request at a time, torch threads="
          f"{torch.get_num_threads()}:")
    for label, seconds in rows.items():
        print(row(label, seconds))


if __name__ == "__main__":
    main()

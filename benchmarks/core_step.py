"""Memory and time of the cores step of one layer slice: ``C[slot] · (x·V)`` per token, k = 128.

``gather`` is the step before issue 34 (``bmm(cores[slots], coordinates)``: a (tokens, k, k) copy of the
cores per slice and layer); ``bag`` is `vllm_shared.add_cores` (an embedding bag over the slots' rows).
Each runs in its own process, after its inputs exist: printed is the growth of the peak RSS during the
step (one call) and the median time of 10 calls, for 2,048 and 8,192 tokens over 64 slots.

    python benchmarks/core_step.py [--rank 128] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from psoft_deploy.serve.vllm_shared import add_cores

SLOTS = 64


def step(kind: str, tokens: int, rank: int, dtype: str) -> dict:
    torch.manual_seed(0)
    cores = torch.randn(SLOTS + 1, rank, rank, dtype=getattr(torch, dtype))
    coordinates = torch.randn(tokens, rank, dtype=cores.dtype)
    slots = torch.randint(0, SLOTS + 1, (tokens,))

    def run():
        if kind == "gather":
            return torch.bmm(cores[slots], coordinates[:, :, None])[:, :, 0]
        return add_cores(coordinates, cores, slots)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    times = []
    for _ in range(10):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak / 1024, "ms": sorted(times)[5] * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    size = torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"k = {args.rank}, {args.dtype}, {SLOTS} slots; a (tokens, k, k) copy is tokens × {args.rank ** 2 * size / 2**20:.3f} MiB")
    for tokens in (2048, 8192):
        for kind in ("gather", "bag"):
            out = subprocess.run([sys.executable, __file__, "--one", kind, str(tokens), str(args.rank), args.dtype],
                                 capture_output=True, text=True, check=True).stdout
            got = json.loads(out.splitlines()[-1])
            print(f"{tokens:>5} tokens  {kind:<6}  peak RSS +{got['peak_mib']:7.1f} MiB  {got['ms']:8.2f} ms")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        kind, tokens, rank, dtype = sys.argv[2:6]
        print(json.dumps(step(kind, int(tokens), int(rank), dtype)))
    else:
        main()

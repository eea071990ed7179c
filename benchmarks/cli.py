"""Time to answer `--help` (and a refused option) against importing torch and vLLM.

tests/test_cli_speed.py checks that these answers import none of the heavy libraries; this script
prints what that is worth here: each command's wall time and its ratio to `import torch` and
`import vllm`, measured in the same run (median of ``--repeats``).

    python benchmarks/cli.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from psoft_deploy.cli import cli


def seconds(args: list[str], repeats: int) -> float:
    """The median wall time of ``python ARGS``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    torch_s = seconds(["-c", "import torch"], repeats)
    vllm_s = seconds(["-c", "import vllm"], repeats)
    print(f"{'import torch':45} {torch_s:6.2f} s")
    print(f"{'import vllm':45} {vllm_s:6.2f} s")
    runs = [[name, "--help"] for name in ["", *cli.commands]] + [["serve", "--base", "b", "--adaptor", "a=x"]]
    for args in runs:
        took = seconds(["-m", "psoft_deploy", *filter(None, args)], repeats)
        print(f"{'psoft-deploy ' + ' '.join(filter(None, args)):45} {took:6.2f} s "
              f"({took / torch_s:.2f}x import torch, {took / vllm_s:.2f}x import vllm)")


if __name__ == "__main__":
    main()

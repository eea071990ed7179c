"""Streaming merge vs PEFT's merge_and_unload + save_pretrained vs a plain copy, one run.

Builds a ~1.1B-parameter bf16 Llama (TinyLlama shape) with random weights locally, in
several shards, and a PSOFT adapter for it (q_proj, v_proj; its R parameters written
directly, as PEFT saves them). Each measured step runs in its own process, which reports
its wall time and peak RSS:

* copy: a plain copy of the shard files (the I/O floor);
* merge from the materialized adapter (no SVD), without and with verification;
* merge from the PEFT adapter (rebuilds A, B by SVD first);
* PEFT: from_pretrained, PeftModel.from_pretrained (SVD), merge_and_unload, save_pretrained.

The base files were just written, so every step reads them from the page cache.

    python benchmarks/merge.py [--layers 22] [--rank 64] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4
SHARD_SIZE = "500MB"
TARGETS = ["q_proj", "v_proj"]


def build_base(directory: Path, layers: int) -> None:
    """Write config.json and bf16 shards of random weights, one shard at a time."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {key: tensor.to(torch.bfloat16) for key, tensor in LlamaForCausalLM(config).state_dict().items()}
    split = split_torch_state_dict_into_shards(shapes, max_shard_size=SHARD_SIZE)
    generator = torch.Generator().manual_seed(0)
    for filename, keys in split.filename_to_tensors.items():
        shard = {}
        for key in keys:
            if key.endswith("norm.weight"):
                shard[key] = torch.ones(shapes[key].shape, dtype=torch.bfloat16)
            else:
                shard[key] = (0.02 * torch.randn(shapes[key].shape, generator=generator)).to(torch.bfloat16)
        save_file(shard, directory / filename, metadata={"format": "pt"})
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)


def build_adapter(directory: Path, base: Path, layers: int, rank: int) -> None:
    """A PEFT PSOFT adapter for ``base`` with trained-like R parameters (A and B are never saved by PEFT)."""
    from psoft_deploy.testing import llama_modules, write_psoft_adapter

    write_psoft_adapter(directory, llama_modules(layers, TARGETS), rank, base=base)


def step(name: str, work: Path) -> None:
    """Run one measured step in this process and print its wall time and peak RSS as JSON."""
    base, adapter, materialized, output = work / "base", work / "adapter", work / "materialized", work / "out"
    start = time.perf_counter()
    if name == "copy":
        output.mkdir()
        for file in base.iterdir():
            shutil.copyfile(file, output / file.name)
    elif name.startswith("merge"):
        from psoft_deploy.cli import cli

        source = adapter if name == "merge-peft" else materialized
        args = ["merge", "--base", str(base), "--adapter", str(source), "--output", str(output)]
        cli.main(args + ([] if name == "merge-verify" else ["--no-verify"]), standalone_mode=False)
    elif name == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(output, max_shard_size=SHARD_SIZE)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(name: str, work: Path) -> dict:
    process = subprocess.run([sys.executable, __file__, "--step", name, "--work", str(work)],
                             capture_output=True, text=True)
    if process.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{process.stderr[-3000:]}")
    shutil.rmtree(work / "out")
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None, help="Scratch directory (default: a temporary one).")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        return step(args.step, args.work)

    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        (work / "base").mkdir()
        build_base(work / "base", args.layers)
        build_adapter(work / "adapter", work / "base", args.layers, args.rank)
        from psoft_deploy.cli import cli

        cli.main(["materialize", "--base", str(work / "base"), "--adapter", str(work / "adapter"),
                  "--output", str(work / "materialized")], standalone_mode=False)
        shards = sorted((work / "base").glob("*.safetensors"))
        largest = max(file.stat().st_size for file in shards)
        total = sum(file.stat().st_size for file in shards)
        results = {name: measure(name, work) for name in ("copy", "merge", "merge-verify", "merge-peft", "peft")}

    copy = results["copy"]
    print(f"bf16 Llama, {args.layers} layers, {total / 2**30:.2f} GiB in {len(shards)} shards "
          f"(largest {largest / 2**30:.2f} GiB); PSOFT r={args.rank} on {', '.join(TARGETS)}; "
          f"torch threads={torch.get_num_threads()}")
    labels = {
        "copy": "plain copy of the shards (anchor)",
        "merge": "psoft-deploy merge, materialized, --no-verify",
        "merge-verify": "psoft-deploy merge, materialized, verified",
        "merge-peft": "psoft-deploy merge, PEFT adapter (SVD)",
        "peft": "PEFT merge_and_unload + save_pretrained",
    }
    for name, label in labels.items():
        r = results[name]
        print(f"  {label:<48} {r['seconds']:7.1f} s ({r['seconds'] / copy['seconds']:5.2f}x copy)  "
              f"peak RSS {r['peak_rss'] / 2**30:5.2f} GiB (largest shard {(r['peak_rss'] - largest) / 2**30:+.2f} GiB)")
    print(f"  PEFT / psoft-deploy (materialized, verified): {results['peft']['seconds'] / results['merge-verify']['seconds']:.1f}x "
          f"time, {results['peft']['peak_rss'] / results['merge-verify']['peak_rss']:.1f}x peak RSS")


if __name__ == "__main__":
    main()

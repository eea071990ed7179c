"""Time to a ready-to-use model: materialized adapter vs `PeftModel.from_pretrained`.

PEFT rebuilds A and B of every targeted layer with an SVD of the base weight each time it
loads a PSOFT adapter; a materialized adapter carries them. Both paths below start from
files on disk and end with a model in eval mode whose logits agree; the script prints
both times and their ratio, measured in the same run on the same adapter.

    python benchmarks/load_time.py [--hidden 1024 --layers 4 --rank 64 --repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, PsoftConfig, get_peft_model
from transformers.utils import logging as hf_logging

from psoft_deploy.converters.pipeline import materialize
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import load_base_model, reference_model
from psoft_deploy.testing import build_tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def best_time(function, repeats: int):
    """(seconds of the fastest run, result of the last run)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        base_dir, adapter_dir, materialized_dir = work / "base", work / "adapter", work / "materialized"
        build_tiny_model(base_dir, "llama", hidden=args.hidden, layers=args.layers, vocab_size=1024,
                         with_tokenizer=False)
        config = PsoftConfig(r=args.rank, psoft_alpha=args.rank, target_modules=TARGETS, init_weights=False)
        get_peft_model(load_base_model(base_dir), config).save_pretrained(adapter_dir)

        start = time.perf_counter()
        factors = load_factors(str(adapter_dir), BaseCheckpoint(str(base_dir)))
        materialize(factors, materialized_dir, base_name=str(base_dir))
        materialize_seconds = time.perf_counter() - start

        peft_seconds, peft_model = best_time(
            lambda: PeftModel.from_pretrained(load_base_model(base_dir), adapter_dir).eval(), args.repeats
        )
        ours_seconds, our_model = best_time(
            lambda: reference_model(base_dir, load_factors(str(materialized_dir), str(base_dir))), args.repeats
        )
        base_seconds, _ = best_time(lambda: load_base_model(base_dir), args.repeats)

        ids = torch.randint(4, 1024, (1, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (peft_model(ids).logits - our_model(ids).logits).abs().max().item()

    modules = args.layers * len(TARGETS)
    print(f"llama hidden={args.hidden} layers={args.layers}, PSOFT r={args.rank} on {modules} modules, "
          f"torch threads={torch.get_num_threads()}, best of {args.repeats}")
    print(f"  base model alone (anchor)                 {base_seconds:8.2f} s")
    print(f"  PeftModel.from_pretrained (SVD per layer) {peft_seconds:8.2f} s")
    print(f"  materialized adapter, ready model         {ours_seconds:8.2f} s")
    print(f"  one-time materialize (includes the SVDs)  {materialize_seconds:8.2f} s")
    print(f"  ratio PEFT / materialized: {peft_seconds / ours_seconds:.1f}x faster to a ready model "
          f"(max |Δlogits| {diff:.1e})")


if __name__ == "__main__":
    main()

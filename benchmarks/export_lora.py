"""export-lora vs PEFT's convert_to_lora / save_as_lora, same adapter, one run.

A PSOFT adapter on all 7 projections of a 2048-wide Llama (r = 128, R parameters written as
PEFT saves them). Measured:

* conversion step, from the loaded model / derived factors: PEFT's ``convert_to_lora`` (a
  dense ΔW and a full SVD per layer) vs the closed form ``lora_B = s·B(R−I)``, ``lora_A = A``;
* end to end, from the PEFT adapter on disk to a LoRA adapter on disk: PEFT
  (``from_pretrained`` + ``PeftModel.from_pretrained`` + ``save_as_lora``) vs
  ``psoft-deploy export-lora --no-verify`` (both rebuild A, B by SVD of the base first), and
  ``psoft-deploy export-lora`` as a user runs it (verified), from the PEFT adapter and from the
  adapter materialized once (its A and B stored: no SVD);
* the result error of each: max over layers of ‖ΔW_lora − ΔW‖ / ‖ΔW‖ against PEFT's own
  ``get_delta_weight``.

    python benchmarks/export_lora.py [--layers 2] [--rank 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora.conversion import convert_to_lora, save_as_lora
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from psoft_deploy.cli import cli
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import load_base_model
from psoft_deploy.testing import build_tiny_model, llama_modules, write_psoft_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_error(lora_tensors: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """Max relative Frobenius error of the LoRA ΔW (scaling 1) over layers."""
    worst = 0.0
    for name, delta in exact.items():
        A = lora_tensors[f"base_model.model.{name}.lora_A.weight"].double()
        B = lora_tensors[f"base_model.model.{name}.lora_B.weight"].double()
        worst = max(worst, (torch.linalg.norm(B @ A - delta) / torch.linalg.norm(delta)).item())
    return worst


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        base_dir, adapter_dir = work / "base", work / "adapter"
        build_tiny_model(base_dir, "llama", hidden=args.hidden, layers=args.layers, vocab_size=1024,
                         with_tokenizer=False)
        write_psoft_adapter(adapter_dir, llama_modules(args.layers, TARGETS), args.rank, base=base_dir)

        peft_e2e, peft_model = timed(lambda: PeftModel.from_pretrained(load_base_model(base_dir), adapter_dir))
        save_seconds, _ = timed(lambda: save_as_lora(work / "peft-lora", peft_model, rank=args.rank))
        peft_e2e += save_seconds
        exact = {name.removeprefix("base_model.model."): module.get_delta_weight("default").double()
                 for name, module in peft_model.named_modules()
                 if hasattr(module, "psoft_R") and "default" in module.psoft_R}
        peft_step, (_, peft_state) = timed(lambda: convert_to_lora(peft_model, rank=args.rank))
        peft_error = lora_error(load_file(work / "peft-lora" / "adapter_model.safetensors"), exact)

        def export(adapter: Path, output: str, *options: str) -> float:
            return timed(lambda: cli.main(["export-lora", "--base", str(base_dir), "--adapter", str(adapter),
                                           "--output", str(work / output), *options], standalone_mode=False))[0]

        ours_e2e = export(adapter_dir, "ours", "--no-verify")
        ours_verified = export(adapter_dir, "ours-verified")
        cli.main(["materialize", "--base", str(base_dir), "--adapter", str(adapter_dir), "--output",
                  str(work / "materialized")], standalone_mode=False)
        from_materialized = export(work / "materialized", "from-materialized")
        verdict = json.loads((work / "from-materialized" / "psoft_verification.json").read_text())["checks"][0]
        factors = load_factors(str(adapter_dir), str(base_dir))
        ours_step, closed_form = timed(lambda: {name: module.lora() for name, module in factors.modules.items()})
        ours_error = lora_error(load_file(work / "ours" / "adapter_model.safetensors"), exact)
        step_error = lora_error({f"base_model.model.{name}.lora_{k}.weight": t for name, (a, b) in closed_form.items()
                                 for k, t in (("A", a), ("B", b))}, exact)
        assert step_error == ours_error or abs(step_error - ours_error) < 1e-6

    modules = args.layers * len(TARGETS)
    print(f"Llama {args.hidden} wide, {args.layers} layers, PSOFT r={args.rank} on {modules} modules "
          f"(7 per layer), torch threads={torch.get_num_threads()}")
    print(f"  conversion step   PEFT convert_to_lora {peft_step:8.3f} s   closed form {ours_step:8.4f} s   "
          f"-> {peft_step / ours_step:,.0f}x faster")
    print(f"  end to end        PEFT load+save_as_lora {peft_e2e:6.2f} s   psoft-deploy export-lora {ours_e2e:6.2f} s"
          f"   -> {peft_e2e / ours_e2e:.1f}x faster")
    print(f"  end to end, verified: from the PEFT adapter {ours_verified:6.2f} s ({peft_e2e / ours_verified:.1f}x faster "
          f"than PEFT); from the materialized adapter {from_materialized:6.2f} s "
          f"({peft_e2e / from_materialized:.1f}x faster); its check: {verdict['mode']}, {verdict['dtype']}, "
          f"{'PASS' if verdict['passed'] else 'FAIL'}")
    print(f"  max relative ΔW error vs PEFT's get_delta_weight: PEFT {peft_error:.1e}, psoft-deploy {ours_error:.1e}")


if __name__ == "__main__":
    main()

"""`psoft-deploy demo`: the whole flow on a tiny local model, nothing downloaded."""

from __future__ import annotations

import tempfile
from importlib.resources import as_file, files
from pathlib import Path

import click
import torch

from .core.errors import UserError
from .core.outputs import check_writable
from .testing import build_tiny_model

TRAIN_STEPS = 30
# The tiny Llama's sizes: head size 128 / 2 = 64, which vLLM's CPU attention supports (16 is refused);
# a vocabulary of exactly the tokenizer's size (its 256 bytes and 4 special tokens, plus merges), and
# unlike any layer's width (128, 256), which onnxruntime-genai's builder would take for the LM head.
MODEL_SIZES = {"hidden": 128, "heads": 2, "layers": 2, "vocab_size": 384}


def run_demo(output: str | None = None) -> Path:
    """Build a tiny Llama, train a PSOFT adapter with `psoft-deploy train`, check PEFT reproduces
    it, then inspect, merge and export it, each conversion verified."""
    from peft import PeftModel
    from transformers.utils import logging as hf_logging

    from .converters import pipeline
    from .converters.verify.tolerances import MAX_LOGIT_NOISE
    from .core.base import BaseCheckpoint
    from .core.factors import load_factors
    from .core.model import load_base_model, reference_model
    from .core.options import WriteOptions
    from .core.report import format_report, inspect_adapter
    from .train import train

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    work = Path(output) if output else Path(tempfile.mkdtemp(prefix="psoft-demo-"))
    if work.is_dir() and any(work.iterdir()):
        raise UserError(f"demo output {work} is not empty; pass a new directory")
    check_writable(work / "base", "demo output")
    base, adapter = work / "base", work / "psoft-adapter"

    click.echo(f"[1/6] building a tiny Llama and its tokenizer in {base}")
    build_tiny_model(base, "llama", **MODEL_SIZES)

    with as_file(files("psoft_deploy").joinpath("data/tiny_corpus.txt")) as corpus:
        click.echo(f"[2/6] psoft-deploy train: {TRAIN_STEPS} steps on the bundled text -> {adapter}")
        train([str(arg) for arg in (
             "--base_model_name_or_path", base, "--output_dir", adapter, "--data_path", corpus,
             "--max_length", 32, "--per_device_train_batch_size", 8, "--learning_rate", 2e-2, "--r", 8,
             "--psoft_alpha", 8, "--target_modules", "q_proj", "v_proj", "o_proj", "--max_steps", TRAIN_STEPS,
             "--logging_steps", 5, "--save_steps", 1000)])

    click.echo("[3/6] checking that PEFT, loading the saved adapter (with its SVD), reproduces it")
    factors = load_factors(str(adapter), str(base))
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_base_model(base), adapter).eval()(ids).logits.double()
        ours, truth = (reference_model(base, factors, dtype)(ids).logits.double()
                       for dtype in (torch.float32, torch.float64))
    bound = MAX_LOGIT_NOISE * (ours - truth).abs().max().item()  # float32's own noise, measured here
    diff = (peft_logits - truth).abs().max().item()
    click.echo(f"      max |Δlogits| PEFT (float32) vs psoft-deploy (float64) = {diff:.2e} (bound {bound:.2e}: "
               f"{MAX_LOGIT_NOISE:g}× what float32 does to psoft-deploy's own)")
    if not diff <= bound:
        raise UserError("PEFT does not reproduce the trained adapter")

    click.echo("[4/6] psoft-deploy inspect")
    checkpoint = BaseCheckpoint(str(base))
    click.echo(format_report(inspect_adapter(factors.adapter, factors, checkpoint)))
    click.echo("[5/6] psoft-deploy merge (verified)")
    merged = pipeline.merge(checkpoint, factors, work / "merged", adapter_name=str(adapter))
    click.echo(f"      verification: {merged.verification}")
    click.echo("[6/6] psoft-deploy export-lora --target vllm (verified)")
    lora = pipeline.export_lora(checkpoint, factors, work / "lora", options=WriteOptions(target="vllm"))
    click.echo(f"      verification: {lora.verification}")
    click.echo(f"done: artifacts in {work}")
    click.echo(f"serve them: psoft-deploy serve --base {base} --adapter demo={adapter}")
    return work

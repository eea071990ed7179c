"""`psoft-deploy demo`: the whole flow on a tiny local model, nothing downloaded."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch

from .errors import UserError
from .tiny import build_tiny_model, bundled_text

TRAIN_STEPS = 30


def run_demo(output: str | None = None) -> Path:
    """Build a tiny Llama, train a PSOFT adapter with PEFT, materialize, inspect and check it."""
    from peft import PeftModel, PsoftConfig, get_peft_model
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .base import BaseCheckpoint
    from .factors import load_factors
    from .formats import read_adapter
    from .materialize import write_materialized
    from .model import load_base_model, reference_model
    from .report import format_report, inspect_adapter

    hf_logging.disable_progress_bar()
    work = Path(output) if output else Path(tempfile.mkdtemp(prefix="psoft-demo-"))
    if work.is_dir() and any(work.iterdir()):
        raise UserError(f"demo output {work} is not empty; pass a new directory")
    base_dir, peft_dir, materialized_dir = work / "base", work / "peft-adapter", work / "materialized"

    click.echo(f"[1/5] building a tiny Llama and its tokenizer in {base_dir}")
    build_tiny_model(base_dir, "llama", hidden=64, layers=2)

    click.echo(f"[2/5] training a PSOFT adapter with PEFT for {TRAIN_STEPS} steps on the bundled text")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batch = tokenizer(bundled_text(), padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    config = PsoftConfig(r=8, psoft_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(load_base_model(base_dir), config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(TRAIN_STEPS):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    click.echo(f"      loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    peft_model.save_pretrained(peft_dir)

    click.echo(f"[3/5] materializing {peft_dir} -> {materialized_dir}")
    start = time.perf_counter()
    factors = load_factors(str(peft_dir), BaseCheckpoint(str(base_dir)))
    write_materialized(factors, materialized_dir, base_name=str(base_dir))
    click.echo(f"      {len(factors.modules)} modules in {time.perf_counter() - start:.2f} s")

    click.echo("[4/5] inspecting the materialized adapter")
    materialized = read_adapter(materialized_dir)
    base = BaseCheckpoint(str(base_dir))
    report_factors = load_factors(str(materialized_dir), base)
    click.echo("      " + format_report(inspect_adapter(materialized, report_factors, base)).replace("\n", "\n      "))

    click.echo("[5/5] checking the materialized adapter against PEFT's own forward")
    ids = batch["input_ids"][:4]
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_base_model(base_dir), peft_dir).eval()(ids).logits
        ours = reference_model(base_dir, report_factors)(ids).logits
    diff = (ours - peft_logits).abs().max().item()
    verdict = "PASS" if diff <= 1e-4 else "FAIL"
    click.echo(f"      max |Δlogits| = {diff:.2e} (fp32 tolerance 1e-4): {verdict}")
    if verdict == "FAIL":
        raise UserError("the materialized adapter does not reproduce PEFT's forward")
    click.echo(f"done: artifacts in {work}")
    return work

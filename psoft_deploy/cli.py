"""The `psoft-deploy` command line."""

from __future__ import annotations

import functools
import json
import warnings

import click

from . import __version__
from .errors import UserError


class PsoftGroup(click.Group):
    """A click group that turns `UserError` into one ``Error: ...`` line and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            raise click.ClickException(str(error)) from None


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"Warning: {message}", err=True)


def adapter_options(command):
    """Options every command that reads an adapter shares."""
    options = [
        click.option("--svd-device", default="cpu", show_default=True,
                     help="Device for rebuilding A, B of PEFT adapters (the device the adapter was trained on)."),
        click.option("--svd-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Dtype the base was loaded in when the adapter was trained (PEFT adapters; default: "
                          "as stored). An fp32 base trained in bf16 needs bfloat16 here."),
        click.option("--force-unseeded", is_flag=True,
                     help="Accept a PEFT 0.19 low-rank adapter although its A, B cannot be reproduced."),
        click.option("--paper-cayley", type=click.Choice(["neumann", "exact"]), default="neumann",
                     show_default=True, help="How a paper-repository checkpoint built R when trained."),
        click.option("--paper-neumann-terms", type=int, default=5, show_default=True,
                     help="Cayley–Neumann terms of a paper-repository checkpoint."),
        click.option("--allow-base-mismatch", is_flag=True,
                     help="Warn instead of failing when a materialized adapter's base fingerprint differs."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def factor_kwargs(options: dict) -> dict:
    """Keyword arguments for `load_factors` from the shared adapter options."""
    return {
        "svd_device": options["svd_device"],
        "svd_dtype": options["svd_dtype"],
        "allow_base_mismatch": options["allow_base_mismatch"],
        "force_unseeded": options["force_unseeded"],
        "paper_neumann_terms": options["paper_neumann_terms"] if options["paper_cayley"] == "neumann" else None,
    }


def base_and_adapter(command):
    """The --base and --adapter options of the converters."""
    command = click.option("--adapter", required=True, type=click.Path(),
                           help="Adapter directory (PEFT, paper repository or materialized).")(command)
    return click.option("--base", required=True, help="Base model: a local directory or a hub id.")(command)


VERIFY_MODE = click.option(
    "--verify-mode", type=click.Choice(["auto", "full", "layerwise"]), default="auto", show_default=True,
    help="full: run the candidate and the reference (in float64) on prompts; layerwise: check each weight "
         "while streaming (for models too large to run in float64); auto: full up to 0.5B parameters.",
)


@click.group(cls=PsoftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="psoft-deploy")
def cli():
    """Take trained PSOFT adapters to production: exact, fast, verified.

    Every command reads PEFT PSOFT adapters, paper-repository checkpoints and
    psoft-deploy's own materialized adapters alike (the format is detected).
    """
    warnings.showwarning = _show_warning


@cli.command()
@base_and_adapter
@click.option("--output", required=True, type=click.Path(), help="Directory to write the materialized adapter to.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@adapter_options
def materialize(base, adapter, output, overwrite, **options):
    """Write a self-contained adapter: exact A, B, R per module plus base fingerprints.

    Loading it needs no SVD, and using it on a different base fails loudly.

    \b
    Example:
      psoft-deploy materialize --base meta-llama/Llama-3.2-1B --adapter ./psoft-adapter --output ./materialized
    """
    from .base import BaseCheckpoint
    from .factors import load_factors
    from .materialize import write_materialized

    checkpoint = BaseCheckpoint(base)
    factors = load_factors(adapter, checkpoint, **factor_kwargs(options))
    write_materialized(factors, output, base_name=base, overwrite=overwrite)
    svd = factors.svd or {}
    click.echo(
        f"materialized {len(factors.modules)} modules (r={factors.adapter.rank}, from {factors.adapter.format}"
        f"{', SVD ' + svd['backend'] + ' on ' + svd['device'] + ', dtype ' + svd['dtype'] if svd else ''}) "
        f"-> {output}"
    )


@cli.command(name="inspect")
@click.argument("adapter", type=click.Path())
@click.option("--base", default=None, help="Base model (directory or hub id) for ‖ΔW‖/‖W‖ and singular gaps.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@adapter_options
def inspect_command(adapter, base, as_json, **options):
    """Describe an adapter: format, versions, rank, targets, sizes, orthogonality, fragility.

    \b
    Example:
      psoft-deploy inspect ./psoft-adapter --base meta-llama/Llama-3.2-1B --json
    """
    from .base import BaseCheckpoint
    from .factors import derive_factors
    from .formats import read_adapter
    from .report import format_report, inspect_adapter

    kwargs = factor_kwargs(options)
    source = read_adapter(adapter, force_unseeded=kwargs.pop("force_unseeded"),
                          paper_neumann_terms=kwargs.pop("paper_neumann_terms"))
    checkpoint = BaseCheckpoint(base) if base else None
    factors = None if source.format == "peft" and checkpoint is None else derive_factors(source, checkpoint, **kwargs)
    report = inspect_adapter(source, factors, checkpoint)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@cli.command()
@base_and_adapter
@click.option("--output", required=True, type=click.Path(), help="Directory for the merged model.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Output dtype of floating tensors (auto: keep the base's).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--no-verify", is_flag=True, help="Skip the verification against the reference forward.")
@VERIFY_MODE
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@adapter_options
def merge(base, adapter, output, dtype, max_shard_size, no_verify, verify_mode, overwrite, **options):
    """Fold the adapter into the base: one dense model directory for any runtime.

    Streams the base shard by shard (float32 accumulation), keeps every other tensor
    unchanged, copies config and tokenizer files, writes a model card, and verifies the
    result against the reference forward before it appears at OUTPUT.

    \b
    Example:
      psoft-deploy merge --base meta-llama/Llama-3.2-1B --adapter ./psoft-adapter --output ./merged
    """
    from psoft_deploy.converters.merge import merge_to_directory, write_model_card
    from psoft_deploy.converters.verify import record_verification, verify_candidate

    from .base import BaseCheckpoint
    from .factors import load_factors
    from .outputs import atomic_output_dir

    checkpoint = BaseCheckpoint(base)
    factors = load_factors(adapter, checkpoint, **factor_kwargs(options))
    with atomic_output_dir(output, overwrite) as staging:
        plan = merge_to_directory(checkpoint, factors, staging, dtype=dtype, max_shard_size=max_shard_size)
        verification = "not run (--no-verify)"
        if not no_verify:
            verification = record_verification(staging, "merged model",
                                               verify_candidate(checkpoint, factors, staging, mode=verify_mode))
        write_model_card(staging, base=base, adapter=adapter, factors=factors, verification=verification)
    click.echo(f"verification: {verification}")
    click.echo(f"merged {len(factors.modules)} modules into {output} "
               f"({len(plan.shards)} shard(s), {plan.total_size / 2**20:.1f} MiB)")


@cli.command(name="export-lora")
@base_and_adapter
@click.option("--output", required=True, type=click.Path(), help="Directory for the LoRA adapter.")
@click.option("--rank", type=int, default=None, help="Optimal rank-K truncation of every layer (default: exact).")
@click.option("--energy", type=float, default=None,
              help="Per layer, the smallest rank keeping this fraction of ‖ΔW‖² (e.g. 0.99).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="dtype of the LoRA weights.")
@click.option("--target", type=click.Choice(["peft", "vllm"]), default="peft", show_default=True,
              help="vllm: one rank for all layers (zero-padded) and vLLM's limits checked now, not at serve time.")
@click.option("--no-verify", is_flag=True, help="Skip loading the export through PEFT and comparing.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@adapter_options
def export_lora_command(base, adapter, output, rank, energy, dtype, target, no_verify, overwrite, **options):
    """Write the adapter as a PEFT LoRA adapter: exact (lora_B = s·B(R−I), lora_A = A), or truncated.

    The result loads with PeftModel.from_pretrained and serves with vLLM, LoRAX, SGLang or
    TensorRT-LLM. Truncation uses the SVD of a small r×r core per layer, never a dense SVD.

    \b
    Examples:
      psoft-deploy export-lora --base meta-llama/Llama-3.2-1B --adapter ./psoft-adapter --output ./lora
      psoft-deploy export-lora --base ... --adapter ... --output ./lora-99 --energy 0.99 --target vllm
    """
    from pathlib import Path

    from psoft_deploy.converters.lora import export_lora
    from psoft_deploy.converters.verify import record_verification, verify_candidate

    from .base import BaseCheckpoint
    from .factors import load_factors
    from .outputs import atomic_output_dir

    checkpoint = BaseCheckpoint(base)
    factors = load_factors(adapter, checkpoint, **factor_kwargs(options))
    base_name = str(Path(base).absolute()) if Path(base).is_dir() else base
    with atomic_output_dir(output, overwrite) as staging:
        result = export_lora(factors, staging, base_name=base_name, rank=rank, energy=energy, dtype=dtype,
                             target=None if target == "peft" else target)
        verification = "not run (--no-verify)"
        if not no_verify:
            verification = record_verification(staging, "exported adapter", verify_candidate(checkpoint, factors, staging))
    ranks = sorted(set(result.ranks.values()))
    worst = max(result.errors, key=result.errors.get)
    click.echo(f"verification: {verification}")
    click.echo(f"exported {len(result.ranks)} modules to {output} as LoRA, rank "
               f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]}'}"
               + ("" if result.exact else f", largest relative error {result.errors[worst]:.2e} ({worst})"))
    if result.max_lora_rank is not None:
        click.echo(f"serve with vLLM: --enable-lora --max-lora-rank {result.max_lora_rank}")


@cli.command(name="export-onnx")
@click.option("--base", required=True, help="Base model: a local directory or a hub id.")
@click.option("--adapter", "adapters", multiple=True,
              help="Adapter to merge in (any format). With --adapters-as-inputs: NAME=PATH, repeatable.")
@click.option("--adapters-as-inputs", is_flag=True,
              help="Export the base once with LoRA inputs (rank-0 defaults) and one .onnx_adapter per adapter.")
@click.option("--output", required=True, type=click.Path(), help="Directory for model.onnx and its weights.")
@click.option("--with-past", is_flag=True, help="One graph for prefill and decode, with past/present key-values.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--no-verify", is_flag=True, help="Skip running onnxruntime against the reference.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@adapter_options
def export_onnx_command(base, adapters, adapters_as_inputs, output, with_past, dtype, opset, no_verify, overwrite,
                        **options):
    """Export a causal LM as one ONNX graph, verified in onnxruntime against the reference.

    With --adapter, the merged model (base + adapter). With --adapters-as-inputs, the base
    once, with LoRA A and B inputs (dynamic rank, rank-0 defaults: no adapter = the base) for
    every module the adapters adapt, and adapters/NAME.onnx_adapter per adapter (scale folded
    into B); switching adapters is then a memory-mapped load. Inputs input_ids and
    attention_mask (with --with-past also position_ids and past.{i}.key/value), outputs logits
    (and present.{i}.key/value); dynamic batch, sequence and past lengths; weights as
    external data; tokenizer and config copied.

    \b
    Examples:
      psoft-deploy export-onnx --base ./llama --adapter ./psoft-adapter --output ./onnx --with-past
      psoft-deploy export-onnx --base ./llama --adapters-as-inputs --adapter math=./a --adapter code=./b --output ./o
      psoft-deploy generate --onnx ./o --adapter-file ./o/adapters/math.onnx_adapter --prompt "2 + 2 ="
    """
    import shutil
    import tempfile
    from pathlib import Path

    import torch

    from psoft_deploy.converters.merge import merge_to_directory
    from psoft_deploy.converters.onnx import export_graph, write_onnx_adapter
    from psoft_deploy.converters.verify import format_verification, verify_full

    from .base import BaseCheckpoint
    from .factors import load_factors
    from .outputs import atomic_output_dir

    checkpoint = BaseCheckpoint(base)
    named = parse_named_adapters(adapters) if adapters_as_inputs else {}
    if not adapters_as_inputs and len(adapters) > 1:
        raise UserError("a merged export takes one --adapter; pass --adapters-as-inputs for several")
    factors = {name: load_factors(path, checkpoint, **factor_kwargs(options)) for name, path in named.items()}
    merged_factors = load_factors(adapters[0], checkpoint, **factor_kwargs(options)) if adapters and not named else None
    lora_modules = sorted({module for f in factors.values() for module in f.modules})
    checks = []  # (label, factors or None for the base, adapter file)
    with atomic_output_dir(output, overwrite) as staging:
        merged = Path(tempfile.mkdtemp(prefix=".merged-", dir=staging.parent))
        try:
            if merged_factors is not None:
                merge_to_directory(checkpoint, merged_factors, merged, dtype="float32")
            export_graph(merged if merged_factors is not None else checkpoint.path, staging, with_past=with_past,
                         dtype=getattr(torch, dtype), opset=opset, lora_modules=lora_modules)
        finally:
            shutil.rmtree(merged, ignore_errors=True)
        checks.append(("merged model" if merged_factors is not None else "base", merged_factors, None))
        if factors:
            (staging / "adapters").mkdir()
        for name, adapter_factors in factors.items():
            write_onnx_adapter(adapter_factors, staging / "adapters" / f"{name}.onnx_adapter")
            checks.append((f"adapter {name}", adapter_factors, staging / "adapters" / f"{name}.onnx_adapter"))
        reports = {}
        for label, reference, adapter_file in checks if not no_verify else []:
            report = verify_full(checkpoint, reference, staging, kind="onnx", adapter_file=adapter_file)
            reports[label] = report
            click.echo(f"verification ({label}): {format_verification(report)}")
            if not report["passed"]:
                raise UserError(f"the ONNX export failed verification ({label}), nothing written")
        (staging / "psoft_verification.json").write_text(json.dumps(reports, indent=2) + "\n")
    what = "the merged model" if merged_factors is not None else "the base" + (
        f" with LoRA inputs and {len(factors)} adapter file(s)" if factors else "")
    click.echo(f"exported {what} to {output}/model.onnx" + (" (with past key-values)" if with_past else ""))


def parse_named_adapters(items) -> dict[str, str]:
    """NAME=PATH pairs (a bare PATH is named after its directory)."""
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = item.rstrip("/").rsplit("/", 1)[-1], item
        if not name or not path or name in named:
            raise UserError(f"--adapter takes NAME=PATH with distinct names, got {item!r}")
        named[name] = path
    return named


@cli.command()
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(), help="An export-onnx output directory.")
@click.option("--adapter-file", type=click.Path(), default=None, help="An .onnx_adapter to run the graph with.")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k likeliest (0: all).")
@click.option("--seed", type=int, default=0, show_default=True)
def generate(onnx_dir, adapter_file, prompt, max_new_tokens, temperature, top_k, seed):
    """Generate text with an exported graph through onnxruntime alone (no torch)."""
    from .generate import generate as run_generation

    text, _ = run_generation(onnx_dir, prompt, adapter_file=adapter_file, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, seed=seed)
    click.echo(prompt + text)


@cli.command()
@base_and_adapter
@click.option("--candidate", required=True, type=click.Path(), help="The artifact to check: a merged model directory or a LoRA adapter.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help='Verification prompts: JSON lines ({"text": ...} or {"messages": [...]}, rendered with the '
                   "tokenizer's chat template) or one plain prompt per line. Default: chat conversations where "
                   "the tokenizer has a template, else plain text.")
@click.option("--json", "json_report", type=click.Path(), default=None, help="Also write the report to this file.")
@VERIFY_MODE
@adapter_options
def verify(base, adapter, candidate, prompts, json_report, verify_mode, **options):
    """Compare a converted artifact with the reference PSOFT forward; exit 1 if it does not pass.

    \b
    Example:
      psoft-deploy verify --base meta-llama/Llama-3.2-1B --adapter ./psoft-adapter --candidate ./merged
    """
    from pathlib import Path

    from psoft_deploy.converters.verify import format_verification, read_prompts, verify_candidate

    from .base import BaseCheckpoint
    from .factors import load_factors

    checkpoint = BaseCheckpoint(base)
    factors = load_factors(adapter, checkpoint, **factor_kwargs(options))
    report = verify_candidate(checkpoint, factors, Path(candidate), mode=verify_mode,
                              prompts=read_prompts(prompts) if prompts else None)
    if json_report:
        Path(json_report).write_text(json.dumps(report, indent=2) + "\n")
    click.echo(format_verification(report))
    if not report["passed"]:
        raise click.exceptions.Exit(1)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--base", required=True, help="Base model: a local directory or a hub id.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="Serve the adapter at PATH (any PSOFT format, or LoRA) as model NAME. Repeatable.")
@click.option("--adapter-root", type=click.Path(), default=None,
              help="Also serve any adapter later placed in DIR/NAME, on the first request for NAME.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--cache-dir", type=click.Path(), default=None,
              help="Where converted adapters are kept (default: $PSOFT_DEPLOY_CACHE or ~/.cache/psoft-deploy/lora).")
@click.option("--verbose", is_flag=True, help="Also copy vLLM's own log to stderr (it always goes to a log file).")
@adapter_options
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(base, adapters, adapter_root, host, port, cache_dir, verbose, vllm_args, **options):
    """Serve many PSOFT adapters at once through vLLM's OpenAI-compatible server.

    Each adapter is converted once to its exact LoRA form (cached by content hash), then vLLM
    starts with --enable-lora and every adapter as a model name; the base keeps its own name.
    The base's stored dtype is served unless you pass --dtype; on CPU the KV cache and the
    context length are sized to the memory available. Arguments after -- go to vLLM unchanged
    and win over what serve chooses.

    \b
    Example (the demo's tiny model and its trained adapter):
      psoft-deploy demo --output ./demo
      psoft-deploy serve --base ./demo/base --adapter demo=./demo/psoft-adapter
    """
    from pathlib import Path

    from psoft_deploy.serve.cache import default_cache_dir
    from psoft_deploy.serve.launcher import plan_serve, run_server

    named = parse_named_adapters(adapters)
    if not named and not adapter_root:
        raise UserError("nothing to serve: pass --adapter NAME=PATH and/or --adapter-root DIR")
    kwargs = factor_kwargs(options)
    kwargs.pop("allow_base_mismatch")
    plan = plan_serve(base, named, adapter_root=adapter_root, host=host, port=port,
                      cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(), vllm_args=vllm_args,
                      factor_options=kwargs)
    raise SystemExit(run_server(plan, host, port, verbose=verbose))


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def train(arguments):
    """Fine-tune a PSOFT adapter with transformers' Trainer on psoft-deploy's own layer.

    Takes the method's quick-start command line (psoft_finetuning.py's options, e.g.
    --base_model_name_or_path, --data_path, --r, --target_modules q_proj v_proj); see
    `psoft-deploy train --help`. Writes a PEFT adapter and its materialized factors, which
    every psoft-deploy command accepts.
    """
    from .train import train as run_training

    output = run_training(list(arguments))
    click.echo(f"trained adapter (PEFT format + materialized factors) in {output}")


@cli.command()
@click.option("--output", type=click.Path(), default=None, help="Work directory (default: a new temporary one).")
def demo(output):
    """Build a tiny local model, train a PSOFT adapter, then inspect, merge and export it (verified).

    Nothing is downloaded.
    """
    from .demo import run_demo

    run_demo(output)


def main():
    cli(prog_name="psoft-deploy")

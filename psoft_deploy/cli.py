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


@click.group(cls=PsoftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="psoft-deploy")
def cli():
    """Take trained PSOFT adapters to production: exact, fast, verified.

    Every command reads PEFT PSOFT adapters, paper-repository checkpoints and
    psoft-deploy's own materialized adapters alike (the format is detected).
    """
    warnings.showwarning = _show_warning


@cli.command()
@click.option("--base", required=True, help="Base model: a local directory or a hub id.")
@click.option("--adapter", required=True, type=click.Path(), help="Adapter directory (any supported format).")
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
@click.option("--output", type=click.Path(), default=None, help="Work directory (default: a new temporary one).")
def demo(output):
    """Build a tiny local model, train a PSOFT adapter with PEFT, materialize and inspect it.

    Nothing is downloaded.
    """
    from .demo import run_demo

    run_demo(output)


def main():
    cli(prog_name="psoft-deploy")

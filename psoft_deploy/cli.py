"""The `psoft-deploy` command line."""

from __future__ import annotations

import json
import os
import signal
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import click

from .core import __version__, progress
from .core.errors import UserError
from .core.options import read_options, verify_mode_option, write_options
from .core.outputs import atomic_write_text, check_apart, check_output, check_writable


class PsoftGroup(click.Group):
    """A click group that turns `UserError` into one ``Error: ...`` line and exit status 1, and takes
    its --verbose after the command too (``merge ... --verbose``)."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, verbose_first(args))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            if progress.verbose() and error.__cause__ is not None:  # what led to it, for a bug report
                traceback.print_exception(error.__cause__)
            raise click.ClickException(str(error)) from None


def verbose_first(args: list[str]) -> list[str]:
    """``args`` with a --verbose given after the command name moved before it, where the group's
    option is parsed; serve keeps its own --verbose (vLLM's log), and arguments after ``--`` stay."""
    command = next((index for index, arg in enumerate(args) if not arg.startswith("-")), None)
    if command is None or args[command] == "serve":
        return args
    end = args.index("--", command) if "--" in args[command:] else len(args)
    if "--verbose" not in args[command:end]:
        return args
    return ["--verbose", *args[:command], *[arg for arg in args[command:end] if arg != "--verbose"], *args[end:]]


class ServeCommand(click.Command):
    """serve's own options parsed strictly (a typo is refused at once, with click's "Did you mean");
    what follows the first ``--`` goes to vLLM unchanged, as ``vllm_args``."""

    def parse_args(self, ctx, args):
        split = args.index("--") if "--" in args else len(args)
        rest = super().parse_args(ctx, args[:split])
        ctx.params["vllm_args"] = tuple(args[split + 1:])
        return rest

    def collect_usage_pieces(self, ctx):
        return [*super().collect_usage_pieces(ctx), "[-- VLLM_ARGS]..."]


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings from psoft-deploy's own code as one line; other libraries' only with --verbose."""
    import psoft_deploy

    from . import converters, serve
    from .core import progress

    ours = {Path(package.__file__).parent for package in (psoft_deploy, converters, serve)}
    if progress.verbose() or ours & set(Path(filename).parents):
        click.echo(f"Warning: {message}", err=True)


def base_and_adapter(command):
    """The --base and --adapter options of the commands that read one adapter."""
    command = click.option("--adapter", required=True, type=click.Path(),
                           help="Adapter directory (PEFT, paper repository or materialized).")(command)
    return BASE(command)


BASE = click.option("--base", required=True, help="Base model: a local directory or a hub id.")


def output_option(what: str):
    return click.option("--output", required=True, type=click.Path(), help=f"Directory to write {what} to.")


class ShardSize(click.ParamType):
    """A size such as 5GB, 500MB or a number of bytes, as transformers' max_shard_size takes it."""

    name = "size"

    def convert(self, value, param, ctx):
        from huggingface_hub.serialization._base import parse_size_to_int

        try:
            size = int(value) if str(value).isdigit() else parse_size_to_int(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a size such as 5GB, 500MB or 2000000000", param, ctx)
        if size <= 0:
            self.fail(f"{value!r} is not a positive size such as 5GB or 500MB", param, ctx)
        return size


PROMPTS = click.option(
    "--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
    help='Verification prompts: JSON lines ({"text": ...} or {"messages": [...]}, rendered with the tokenizer\'s '
         "chat template) or one plain prompt per line; for lossy exports, prompts where the adapter changes the "
         "answers. Default: chat conversations where the tokenizer has a template, else plain text.")


@click.group(cls=PsoftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="psoft-deploy")
@click.option("--verbose", is_flag=True,
              help="Also show other libraries' output (transformers' warnings and progress bars, torch.onnx's "
                   "progress, onnxruntime's and Python warnings); may also follow the command. `serve --verbose` "
                   "shows vLLM's log.")
@click.pass_context
def cli(ctx, verbose):
    """Take trained PSOFT adapters to production: exact, fast, verified.

    Every command reads PEFT PSOFT adapters, paper-repository checkpoints and
    psoft-deploy's own materialized adapters alike (the format is detected).
    """
    from .core import progress

    warnings.showwarning = _show_warning
    # serve keeps every library's output as it was: vLLM's log (a file) stays as vLLM writes it
    progress.quiet_third_party(verbose or ctx.invoked_subcommand == "serve")


@cli.command()
@base_and_adapter
@output_option("the materialized adapter")
@write_options()
@read_options
def materialize(base, adapter, output, write_options, read_options):
    """Write a self-contained adapter: exact A, B, R per module plus base fingerprints.

    Loading it needs no SVD, and using it on a different base fails loudly. The written
    adapter is read back and checked bit for bit before it appears at OUTPUT.

    \b
    Example:
      psoft-deploy materialize --base meta-llama/Llama-3.2-1B --adapter ./psoft-adapter --output ./materialized
    """
    check_output(output, write_options.overwrite, {"base": base, "adapter": adapter})
    from psoft_deploy.converters import pipeline

    checkpoint, factors = _load(base, adapter, read_options)
    published = pipeline.materialize(factors, output, base_name=checkpoint.reference,
                                     overwrite=write_options.overwrite)
    svd = factors.svd or {}
    _echo_verdicts(published)
    click.echo(
        f"materialized {len(factors.modules)} modules (r={factors.adapter.rank}, from {factors.adapter.format}"
        f"{', SVD ' + svd['backend'] + ' on ' + svd['device'] + ', dtype ' + svd['dtype'] if svd else ''}) "
        f"-> {output}"
    )


@cli.command(name="inspect")
@click.argument("adapter_path", required=False, type=click.Path(), metavar="[ADAPTER]")
@click.option("--adapter", type=click.Path(), default=None, help="Adapter directory (or give it as the argument).")
@click.option("--base", default=None, help="Base model (directory or hub id) for ‖ΔW‖/‖W‖ and singular gaps.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@read_options
def inspect_command(adapter_path, adapter, base, as_json, read_options):
    """Describe an adapter: format, versions, rank, targets, sizes, orthogonality, fragility.

    \b
    Example:
      psoft-deploy inspect --adapter ./psoft-adapter --base meta-llama/Llama-3.2-1B --json
    """
    from .core.base import BaseCheckpoint
    from .core.factors import derive_factors
    from .core.formats import read_adapter
    from .core.report import format_report, inspect_adapter

    if (adapter_path is None) == (adapter is None):
        raise UserError("give the adapter once: --adapter DIR (or as the argument)")
    source = read_adapter(adapter or adapter_path, read_options)
    checkpoint = BaseCheckpoint(base) if base else None
    factors = None if source.format == "peft" and checkpoint is None else derive_factors(source, checkpoint,
                                                                                           read_options)
    report = inspect_adapter(source, factors, checkpoint)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@cli.command()
@base_and_adapter
@output_option("the merged model")
@click.option("--max-shard-size", type=ShardSize(), default="5GB", show_default=True,
              help="Largest output shard, e.g. 2GB, 500MB.")
@PROMPTS
@write_options("dtype", "to", "quant", "verify_mode")
@read_options
def merge(base, adapter, output, max_shard_size, prompts, write_options, read_options):
    """Fold the adapter into the base: one dense model directory for any runtime, or one GGUF file.

    Streams the base shard by shard (float32 accumulation), keeps every other tensor
    unchanged, copies config and tokenizer files, writes a model card, and verifies the
    result against the reference forward before it appears at OUTPUT. With --to gguf:
    OUTPUT/model.gguf for llama.cpp (Llama, Mistral, Qwen2), quantized by llama.cpp with
    --quant, verified in llama.cpp, and an Ollama Modelfile.

    \b
    Examples:
      psoft-deploy merge --base meta-llama/Llama-3.2-1B --adapter ./psoft-adapter --output ./merged
      psoft-deploy merge --base ./smollm2 --adapter ./psoft-adapter --output ./gguf --to gguf --quant Q4_K_M
    """
    check_output(output, write_options.overwrite, {"base": base, "adapter": adapter})
    from psoft_deploy.converters import pipeline

    checkpoint, factors = _load(base, adapter, read_options)
    published = pipeline.merge(checkpoint, factors, output, adapter_name=adapter, options=write_options,
                               max_shard_size=max_shard_size, prompts=_prompts(prompts))
    _echo_verdicts(published)
    plan = published.written
    if write_options.to == "gguf":
        size = (Path(output) / "model.gguf").stat().st_size
        click.echo(f"merged {len(factors.modules)} modules into {output}/model.gguf ({plan}, {size / 2**20:.1f} MiB); "
                   f"Ollama: ollama create NAME -f {output}/Modelfile")
        return
    click.echo(f"merged {len(factors.modules)} modules into {output} "
               f"({len(plan.shards)} shard(s), {plan.total_size / 2**20:.1f} MiB)")


@cli.command(name="export-lora")
@base_and_adapter
@output_option("the LoRA adapter")
@PROMPTS
@write_options("rank", "energy", "dtype", "target", "with_base", "quant", "verify_mode")
@read_options
def export_lora_command(base, adapter, output, prompts, write_options, read_options):
    """Write the adapter as a PEFT LoRA adapter: exact (lora_B = s·B(R−I), lora_A = A), or truncated.

    The result loads with PeftModel.from_pretrained and serves with vLLM, LoRAX, SGLang or
    TensorRT-LLM. Truncation uses the SVD of a small r×r core per layer, never a dense SVD.
    --target mlx writes an mlx-lm adapter; --target gguf a llama.cpp LoRA (adapter.gguf,
    verified in llama.cpp on the base written as GGUF) and an Ollama Modelfile; --with-base
    also writes that base beside it (base.gguf), which the Modelfile reads.

    \b
    Examples:
      psoft-deploy export-lora --base meta-llama/Llama-3.2-1B --adapter ./psoft-adapter --output ./lora
      psoft-deploy export-lora --base ... --adapter ... --output ./lora-99 --energy 0.99 --target vllm
      psoft-deploy export-lora --base ./smollm2 --adapter ./psoft-adapter --output ./gguf --target gguf --with-base
    """
    check_output(output, write_options.overwrite, {"base": base, "adapter": adapter})
    from psoft_deploy.converters import pipeline

    checkpoint, factors = _load(base, adapter, read_options)
    rank = write_options.rank
    if rank is not None and rank > factors.adapter.rank:
        warnings.warn(f"--rank {rank} is above the adapter's rank r={factors.adapter.rank}: writing the exact "
                      f"export at r={factors.adapter.rank}")
        write_options = replace(write_options, rank=None)
    published = pipeline.export_lora(checkpoint, factors, output, options=write_options, prompts=_prompts(prompts))
    _echo_verdicts(published)
    result = published.written
    ranks = sorted(set(result.ranks.values()))
    worst = max(result.errors, key=result.errors.get)
    click.echo(f"exported {len(result.ranks)} modules to {output} as LoRA, rank "
               f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]}'}"
               + ("" if result.exact else f", largest relative error {result.errors[worst]:.2e} ({worst})"))
    if result.max_lora_rank is not None:
        click.echo(f"serve with vLLM: --enable-lora --max-lora-rank {result.max_lora_rank}")
    if write_options.target == "sglang":
        click.echo(f"serve with SGLang: --lora-paths NAME={output}")
    if write_options.target == "gguf" and write_options.with_base:
        click.echo(f"llama.cpp: llama-cli -m {output}/base.gguf --lora {output}/adapter.gguf; Ollama: ollama create "
                   f"NAME -f {output}/Modelfile")
    elif write_options.target == "gguf":
        click.echo(f"llama.cpp: --lora {output}/adapter.gguf on a GGUF of the base, which export-lora --target gguf "
                   f"--with-base writes beside it ({output}/base.gguf, read by {output}/Modelfile for Ollama)")


@cli.command(name="export-onnx")
@BASE
@click.option("--adapter", "adapters", multiple=True,
              help="Adapter to build in (any format). With --adapters-as-inputs: NAME=PATH, repeatable.")
@click.option("--adapters-as-inputs", is_flag=True,
              help="Export the base once with LoRA inputs (rank-0 defaults: the base) and one "
                   "adapters/NAME.onnx_adapter per adapter, switchable per request.")
@output_option("the ONNX model")
@click.option("--exporter", type=click.Choice(["auto", "genai", "torch"]), default="auto", show_default=True,
              help="genai: onnxruntime-genai's model builder (decoder LLMs it converts: Llama, Mistral, Qwen, Gemma, "
                   "Phi…); torch: torch.onnx (any causal LM, encoders, classifiers, ViT); auto: genai where it "
                   "applies.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int4"]), default="fp32", show_default=True,
              help="Weights and activations; int4: weight-only block quantization (MatMulNBits) of the base, "
                   "the adapter kept in floating point (genai only).")
@click.option("--execution-provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the model will run (genai only; verification runs on CPU exports).")
@click.option("--with-past", is_flag=True,
              help="torch only: one graph for prefill and decode, with past/present key-values.")
@click.option("--opset", type=click.IntRange(min=18), default=18, show_default=True,
              help="torch only: ONNX opset version of the graph.")
@click.option("--quantize-adapted-modules", is_flag=True,
              help="int4: quantize the adapted modules' base weights too (smaller; measured to break a trained "
                   "adapter on a 135M model, which verification then refuses).")
@PROMPTS
@write_options("verify_mode")
@read_options
def export_onnx_command(base, adapters, adapters_as_inputs, output, exporter, precision, execution_provider, with_past,
                        opset, quantize_adapted_modules, prompts, write_options, read_options):
    """Export a causal LM (or an encoder, classifier or ViT) to ONNX, verified against the reference.

    Decoder LLMs go through onnxruntime-genai's model builder: the output is a directory og.Model
    loads (genai_config.json, tokenizer) and `psoft-deploy generate` runs. The adapter is built in
    as its exact LoRA form, out of int4 quantization. With --adapters-as-inputs, the base is built
    once and each adapter becomes adapters/NAME.onnx_adapter for og.Adapters. Other models go
    through torch.onnx (inputs input_ids and attention_mask, with --with-past also position_ids
    and past.{i}.key/value; outputs logits and present.{i}.key/value; weights as external data).

    \b
    Examples:
      psoft-deploy export-onnx --base ./llama --adapter ./psoft-adapter --output ./onnx --precision int4
      psoft-deploy export-onnx --base ./llama --adapters-as-inputs --adapter math=./a --adapter code=./b --output ./o
      psoft-deploy export-onnx --base ./bert --adapter ./psoft-adapter --output ./onnx
    """
    from psoft_deploy.converters import pipeline

    from .core.base import BaseCheckpoint
    from .core.factors import load_factors

    if not adapters_as_inputs and len(adapters) > 1:
        raise UserError("a merged export takes one --adapter; pass --adapters-as-inputs for several")
    paths = parse_named_adapters(adapters) if adapters_as_inputs else {}
    inputs = {f"adapter {name}": path for name, path in paths.items()} or {"adapter": adapters[0] if adapters else None}
    check_output(output, write_options.overwrite, {"base": base, **inputs})
    checkpoint = BaseCheckpoint(base)
    named = {name: load_factors(path, checkpoint, read_options) for name, path in paths.items()}
    merged = load_factors(adapters[0], checkpoint, read_options) if adapters and not adapters_as_inputs else None
    published = pipeline.export_onnx(checkpoint, output, merged=merged, adapters=named, exporter=exporter,
                                     precision=precision, execution_provider=execution_provider,
                                     options=write_options, prompts=_prompts(prompts),
                                     quantize_adapted=quantize_adapted_modules, with_past=with_past, opset=opset)
    _echo_verdicts(published)
    from psoft_deploy.converters.genai_runtime import is_genai_export

    in_lora_form = "the model with its adapter in LoRA form" if is_genai_export(output) else "the merged model"
    what = in_lora_form if merged is not None else "the base" + (
        f" with LoRA inputs and {len(named)} adapter file(s)" if named else "")
    click.echo(f"exported {what} to {output} ({precision})" + (" with past key-values" if with_past else ""))


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


def _load(base: str, adapter: str, read_options):
    """The base checkpoint and the adapter's factors on it."""
    from .core.base import BaseCheckpoint
    from .core.factors import load_factors

    checkpoint = BaseCheckpoint(base)
    return checkpoint, load_factors(adapter, checkpoint, read_options)


def _prompts(file):
    """The verification prompts in ``file`` (None: verify's defaults)."""
    from psoft_deploy.converters.verify import read_prompts

    return read_prompts(file) if file else None


def _echo_verdicts(published) -> None:
    if not published.verdicts:
        click.echo("verification: not run (--no-verify)")
    for label, line in published.verdicts.items():
        click.echo(f"verification{f' ({label})' if len(published.verdicts) > 1 else ''}: {line}")


@cli.command()
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(), help="An export-onnx output directory.")
@click.option("--adapter", default=None,
              help="Run with the export's adapters/NAME.onnx_adapter (exported with --adapters-as-inputs).")
@click.option("--adapter-file", type=click.Path(), default=None, help="An .onnx_adapter file to run the graph with.")
@click.option("--prompt", required=True, help="The user's message (or, with --no-chat-template, text to continue).")
@click.option("--no-chat-template", is_flag=True,
              help="Send the prompt as raw text, not as a user turn through the tokenizer's chat template.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Stop after this many new tokens (or at an end-of-sequence token).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the k likeliest (0: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for sampling.")
def generate(onnx_dir, adapter, adapter_file, prompt, no_chat_template, max_new_tokens, temperature, top_k, seed):
    """Generate text with an exported model, without torch: onnxruntime-genai's og.Generator for
    its exports (chat template applied where the tokenizer has one), onnxruntime for torch.onnx
    graphs (raw text). Text is printed as it is produced.

    \b
    Examples:
      psoft-deploy generate --onnx ./onnx --prompt "What is 2 + 2?"
      psoft-deploy generate --onnx ./o --adapter math --prompt "What is 2 + 2?"
    """
    from .converters.genai_runtime import adapter_file as named_adapter_file
    from .converters.genai_runtime import genai_generate, has_chat_template, is_genai_export
    from .core.generate import generate as run_generation

    if adapter and adapter_file:
        raise UserError("pass --adapter NAME or --adapter-file FILE, not both")
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}
    unshown = [prompt]  # raw text: the prompt goes out with the first new text (nothing before an error)

    def show_continuation(text: str) -> None:
        click.echo("".join(unshown) + text, nl=False)
        unshown.clear()

    if is_genai_export(Path(onnx_dir)):
        if adapter_file:
            raise UserError("an onnxruntime-genai export takes its adapters by name: --adapter NAME")
        if adapter and not named_adapter_file(Path(onnx_dir), adapter).is_file():
            raise UserError(f"{onnx_dir} has no adapter {adapter!r} (adapters/{adapter}.onnx_adapter)")
        if not no_chat_template and has_chat_template(Path(onnx_dir)):
            unshown.clear()  # a chat answer is shown alone
        genai_generate(onnx_dir, prompt, adapter=adapter, chat_template=not no_chat_template,
                       on_text=show_continuation, **options)
        click.echo("".join(unshown))
        return

    if adapter:
        adapter_file = named_adapter_file(Path(onnx_dir), adapter)
    run_generation(onnx_dir, prompt, adapter_file=adapter_file, on_text=show_continuation, **options)
    click.echo("".join(unshown))


@cli.command()
@base_and_adapter
@click.option("--candidate", required=True, type=click.Path(exists=True),
              help="The artifact to check: a merged model, a LoRA adapter, an ONNX export, an .onnx_adapter, or a "
                   "GGUF file or export.")
@PROMPTS
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of one line.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Also write the JSON report to this file.")
@verify_mode_option
@read_options
def verify(base, adapter, candidate, prompts, as_json, report, verify_mode, read_options):
    """Compare a converted artifact with the reference PSOFT forward; exit 1 if it does not pass.

    \b
    Example:
      psoft-deploy verify --base meta-llama/Llama-3.2-1B --adapter ./psoft-adapter --candidate ./merged
    """
    from pathlib import Path

    from psoft_deploy.converters.verify import verify_candidate

    if report:
        check_apart(report, {"base": base, "adapter": adapter, "candidate": candidate})
        check_writable(report, "report")
    checkpoint, factors = _load(base, adapter, read_options)
    result = verify_candidate(checkpoint, factors, Path(candidate), mode=verify_mode,
                              prompts=_prompts(prompts))
    record = result.to_dict() | {"base_identity": factors.base_identity}
    if report:
        atomic_write_text(report, json.dumps(record, indent=2) + "\n")
    click.echo(json.dumps(record, indent=2) if as_json else result.line())
    if not result.passed:
        raise click.exceptions.Exit(1)


@cli.command(cls=ServeCommand)
@click.option("--base", required=True, help="Base model: a local directory or a hub id.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="Serve the adapter at PATH (any PSOFT format, or LoRA) as model NAME. Repeatable.")
@click.option("--adapter-root", type=click.Path(), default=None,
              help="Also serve any adapter later placed in DIR/NAME, on the first request for NAME.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--cache-dir", type=click.Path(), default=None,
              help="Where converted adapters are kept (default: $PSOFT_DEPLOY_CACHE or ~/.cache/psoft-deploy/lora).")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Where vLLM's log goes, replaced at each start (default: vllm-PORT.log beside the cache directory).")
@click.option("--verbose", is_flag=True, help="Also copy vLLM's own log to stderr (it always goes to a log file).")
@click.option("--adapter-form", type=click.Choice(["auto", "shared", "lora"]), default="auto", show_default=True,
              help="How vLLM holds the adapters: as r×r cores over the base's shared basis (shared), as exact "
                   "LoRA (lora), or cores for those in the basis and LoRA for the others (auto).")
@click.option("--basis-rank", type=click.IntRange(min=1), default=None,
              help="Rank of the shared basis (default: the largest rank of the PSOFT adapters named and in the root).")
@click.option("--basis-modules", default=None, metavar="q_proj,v_proj,...",
              help="Layers the shared basis covers, by name (default: those the PSOFT adapters adapt).")
@read_options
def serve(base, adapters, adapter_root, host, port, cache_dir, log_file, verbose, adapter_form, basis_rank,
          basis_modules, vllm_args, read_options):
    """Serve many PSOFT adapters at once through vLLM's OpenAI-compatible server.

    PSOFT adapters from PEFT's full SVD are served as r×r cores over the base's shared basis (one
    SVD per layer, once per base), computed from R alone; any other adapter is converted once to its
    exact LoRA form (cached by content hash), kept as cores if it lies in the basis. With only an
    --adapter-root, the basis covers the PSOFT adapters found there (or --basis-rank, --basis-modules).
    vLLM starts with --enable-lora and every adapter as a model name; the base keeps its own name.
    The base's stored dtype is served unless you pass --dtype; on CPU the KV cache and the
    context length are sized to the memory available. Arguments after -- go to vLLM unchanged
    and win over what serve chooses (a --host or --port there is where serve waits for vLLM);
    before --, only serve's own options are taken.

    \b
    Example (the demo's tiny model and its trained adapter):
      psoft-deploy demo --output ./demo
      psoft-deploy serve --base ./demo/base --adapter demo=./demo/psoft-adapter
    """
    from psoft_deploy.serve.names import check_port, check_served_names, listen_address

    named = parse_named_adapters(adapters)
    if not named and not adapter_root:
        raise UserError("nothing to serve: pass --adapter NAME=PATH and/or --adapter-root DIR")
    check_served_names(base, named, adapter_root)  # before torch and vLLM are imported
    host, port = listen_address(host, port, vllm_args)
    check_port(host, port)
    from psoft_deploy.serve.cache import default_cache_dir
    from psoft_deploy.serve.plan import plan_serve
    from psoft_deploy.serve.supervise import default_log_file, run_server

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    # A stop before vLLM starts exits at once (libraries may swallow a KeyboardInterrupt raised in them).
    handlers = {signum: signal.signal(signum, _stopped_before_vllm) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        plan = plan_serve(base, named, adapter_root=adapter_root, host=host, port=port, cache_dir=cache_dir,
                          vllm_args=vllm_args, read_options=read_options, adapter_form=adapter_form,
                          basis_rank=basis_rank, basis_modules=tuple(filter(None, (basis_modules or "").split(","))))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    log = Path(log_file) if log_file else default_log_file(cache_dir, port)
    raise SystemExit(run_server(plan, host, port, log, verbose=verbose))


def _stopped_before_vllm(signum, frame):
    click.echo("Error: stopped during start-up, before vLLM started", err=True)
    os._exit(1)


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def train(arguments):
    """Fine-tune a PSOFT adapter with TRL's SFTTrainer on psoft-deploy's own layer.

    Takes the method's quick-start command line (psoft_finetuning.py's options, e.g.
    --base_model_name_or_path, --data_path, --r, --target_modules q_proj v_proj); see
    `psoft-deploy train --help`. Writes a PEFT adapter and its materialized factors, which
    every psoft-deploy command accepts.

    Many adapters of one base in one run, each as it would train alone: --jobs JOBS.jsonl (one
    {"name": ..., "data_path": ...} a line) instead of --data_path; each goes to OUTPUT_DIR/NAME.

    \b
    Example:
      psoft-deploy train --base_model_name_or_path meta-llama/Llama-3.2-3B --data_path ./data.jsonl \\
          --output_dir ./psoft-adapter --r 128 --psoft_alpha 128 --target_modules q_proj v_proj
    """
    from .train_args import parse

    args = parse(list(arguments))  # --help and bad arguments answer before torch is imported
    if args.jobs:
        from .train_jobs import train_jobs

        output = train_jobs(args)
        click.echo(f"trained adapters (PEFT format + materialized factors) in {output}/NAME, one for each job of "
                   f"{args.jobs}")
        return
    from .train import train as run_training

    output = run_training(list(arguments))
    click.echo(f"trained adapter (PEFT format + materialized factors) in {output}")


@cli.command()
@click.option("--output", type=click.Path(), default=None, help="Work directory (default: a new temporary one).")
def demo(output):
    """Build a tiny local model, train a PSOFT adapter, then inspect, merge and export it (verified).

    Nothing is downloaded.

    \b
    Example:
      psoft-deploy demo --output ./demo
    """
    from .demo import run_demo

    run_demo(output)


def main():
    from .core.progress import log_to_stderr

    log_to_stderr()
    cli(prog_name="psoft-deploy")

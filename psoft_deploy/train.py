"""`psoft-deploy train`: PSOFT fine-tuning with TRL's SFTTrainer on `PsoftLinear`, the layer every
converter uses, saving a PEFT adapter *and* the materialized factors it was trained with.

The command line is the method's published quick start (``psoft_finetuning.py``) with
``psoft-deploy train`` in place of the script. Data-parallel runs: ``torchrun --nproc_per_node N -m
psoft_deploy -- train ...`` (without ``--``, torchrun's own parser takes ``--r`` for one of its options).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from trl import SFTTrainer

from . import train_args
from .converters.pipeline import Check, publish
from .converters.verify.candidates import reread_matches
from .converters.verify.tolerances import basis_bound
from .core import __version__
from .core.base import BaseCheckpoint
from .core.dtypes import BY_NAME
from .core.errors import UserError
from .core.factors import AdapterFactors, base_tensor_key
from .core.formats import ADAPTER_WEIGHTS, MATERIALIZED_META, PEFT_PREFIX, read_adapter, write_peft_adapter
from .core.layer import PsoftLinear, PsoftRotation, replace_module
from .core.materialize import save_materialized_files
from .core.outputs import apply_umask
from .core.psoft import ModuleFactors, RotationSpec, SubspaceSpec, principal_subspace
from .core.tensorfile import read_safetensors

SUMMARY_FILE = "training_summary.json"
DATA_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
BITS = {name: BY_NAME[dtype].torch for name, dtype in train_args.BITS.items()}


def psoft_config(args):
    """PEFT's `PsoftConfig` for these options, checked before anything is trained: PEFT's own rules (its errors,
    and its warnings about options that would be ignored) and the ranges PEFT leaves unchecked."""
    from peft import PsoftConfig

    checks = [
        (args.r >= 1, f"--r must be at least 1 (got {args.r})"),
        (math.isfinite(args.psoft_alpha) and args.psoft_alpha > 0,
         f"--psoft_alpha must be a positive number (got {args.psoft_alpha})"),
        (0 <= args.psoft_dropout < 1, f"--psoft_dropout must be in [0, 1) (got {args.psoft_dropout})"),
        (args.psoft_svd_lowrank_niter >= 0,
         f"--psoft_svd_lowrank_niter must be at least 0 (got {args.psoft_svd_lowrank_niter})"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            return PsoftConfig(
                r=args.r, psoft_alpha=args.psoft_alpha, target_modules=list(args.target_modules),
                psoft_dropout=args.psoft_dropout, ab_svd_init=args.ab_svd_init, psoft_svd=args.psoft_svd,
                psoft_svd_lowrank_niter=args.psoft_svd_lowrank_niter, psoft_orth=args.psoft_orth,
                psoft_mag_a=args.psoft_mag_a, psoft_mag_b=args.psoft_mag_b,
                use_cayley_neumann=args.use_cayley_neumann, num_cayley_neumann_terms=args.num_cayley_neumann_terms,
                cayley_neumann_eps=args.cayley_neumann_eps, base_model_name_or_path=args.base_model_name_or_path,
                task_type="CAUSAL_LM",
            )
    except (ValueError, UserWarning) as error:
        raise UserError(f"PSOFT options (PEFT's rules): {error}") from None


def load_data(path: str, split: str):
    """A datasets.Dataset from a hub name or a local file."""
    import datasets

    local = Path(path).expanduser()
    if not local.exists() and (local.suffix.lower() in DATA_BUILDERS or path.startswith(("/", ".", "~"))):
        raise UserError(f"--data_path {path}: no such file (and it is not a datasets name)")
    try:
        if local.exists():
            builder = DATA_BUILDERS.get(local.suffix.lower())
            if builder is None or not local.is_file():
                raise UserError(f"--data_path {local} must be a {', '.join(DATA_BUILDERS)} file or a datasets name")
            return datasets.load_dataset(builder, data_files={"train": str(local)}, split=split)
        return datasets.load_dataset(path, split=split)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"cannot read data {path!r} (split {split!r}): {type(error).__name__}: {error}") from error


def check_data(data, args, tokenizer):
    """The data in a form TRL trains on ('messages' chat data, 'prompt'/'completion', or a text column; empty texts
    dropped), checked against the loss options and the tokenizer's chat template; returns (data, format)."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        is_chat_template_stop_token_trained,
    )
    from trl.data_utils import is_conversational, is_conversational_from_value

    if len(data) == 0:
        raise UserError(f"data {args.data_path!r} (split {args.dataset_split!r}) holds no examples")
    first = data[0]
    if is_conversational(first) or is_conversational_from_value(first):
        kind = "messages"
        if tokenizer.chat_template is None:
            raise UserError(f"data {args.data_path!r} is chat data, but the tokenizer of "
                            f"{args.base_model_name_or_path} has no chat template")
    elif {"prompt", "completion"} <= set(data.column_names):
        kind = "prompt-completion"
    elif args.dataset_text_field in data.column_names:
        kind = "text"
        field = args.dataset_text_field
        data = data.filter(lambda row: isinstance(row[field], str) and row[field].strip() != "")
        if len(data) == 0:
            raise UserError(f"data {args.data_path!r} (split {args.dataset_split!r}) holds no non-empty "
                            f"{field!r} examples")
    else:
        raise UserError(f"data {args.data_path!r} has no column {args.dataset_text_field!r}, no 'messages' and no "
                        f"'prompt'/'completion' (columns: {', '.join(data.column_names)}); pass --dataset_text_field")
    if args.assistant_only_loss:
        if not is_conversational(first):
            raise UserError("--assistant_only_loss needs chat data ('messages' with roles)")
        try:
            template = get_training_chat_template(tokenizer)
        except ValueError:
            raise UserError("--assistant_only_loss needs a chat template that marks the assistant's turns with "
                            "{% generation %} ... {% endgeneration %}; the tokenizer's has no such marks") from None
        if not is_chat_template_stop_token_trained(tokenizer, chat_template=template):
            raise UserError("--assistant_only_loss: the chat template leaves the assistant's end-of-turn token out "
                            "of its {% generation %} marks, so the model would never learn to stop")
    if args.completion_only_loss and kind != "prompt-completion":
        raise UserError("--completion_only_loss needs 'prompt'/'completion' data")
    return data, kind


def adapt(model: nn.Module, args) -> dict[str, PsoftLinear]:
    """Wrap every targeted nn.Linear in a trainable `PsoftLinear`; the base stays frozen."""
    chosen = targeted_linears(model, args)
    check_rank(chosen, args.r)
    model.requires_grad_(False)
    scale = args.psoft_alpha / args.r
    subspace = subspace_spec(args)
    spec = rotation_spec(args)
    layers = {}
    for name, module in chosen.items():
        A, B = principal_subspace(module.weight.detach(), args.r, scale, subspace)
        factors = ModuleFactors(A=A, B=B, R=torch.eye(args.r), scale=scale)
        rotation = PsoftRotation(args.r, spec, mag_a=args.psoft_mag_a, mag_b=args.psoft_mag_b)
        layer = PsoftLinear(module, factors, rotation=rotation, dropout=args.psoft_dropout)
        replace_module(model, name, layer)
        layers[name] = layer
    return layers


def targeted_linears(model: nn.Module, args) -> dict[str, nn.Linear]:
    """The nn.Linear layers --target_modules names, checked to exist."""
    targets = list(args.target_modules)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    chosen = {name: module for name, module in linears.items()
              if any(name == target or name.endswith("." + target) for target in targets)}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in chosen)]
    if missing:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise UserError(f"--target_modules {', '.join(missing)} match no linear layer of the model "
                        f"(its linear layers: {', '.join(leaves)})")
    return chosen


def check_rank(layers: dict[str, nn.Linear], r: int) -> None:
    """Refuse a rank ``r`` that one of ``layers`` cannot hold."""
    for name, module in layers.items():
        if r > min(module.in_features, module.out_features):
            raise UserError(f"--r {r} exceeds the size of {name} ({module.out_features}×{module.in_features})")


def checkpoint_to_resume(requested: str | None, checkpoints: Path) -> str | None:
    """The checkpoint directory that --resume_from_checkpoint names ('latest': the newest in
    ``checkpoints``), checked to hold an adapter before anything is loaded."""
    if requested is None:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    directory = requested
    if requested == "latest":
        directory = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        if directory is None:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint in {checkpoints}")
    if not (Path(directory) / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"--resume_from_checkpoint {directory} holds no {ADAPTER_WEIGHTS}; pass a checkpoint "
                        "directory written by psoft-deploy train, or 'latest'")
    return directory


def subspace_spec(args) -> SubspaceSpec:
    return SubspaceSpec(svd=args.psoft_svd, niter=args.psoft_svd_lowrank_niter, seed=0, init=args.ab_svd_init)


def rotation_spec(args) -> RotationSpec:
    return RotationSpec(convention="peft", orth=args.psoft_orth, cayley_neumann=args.use_cayley_neumann,
                        neumann_terms=args.num_cayley_neumann_terms, neumann_eps=args.cayley_neumann_eps)


def check_ranks_agree(layers: dict[str, PsoftLinear]) -> None:
    """In a distributed run every process derives A and B by its own SVD: refuse to train unless all derived the
    same ones (checksums: per-row sums of each A, per-column sums of each B, their minimum and maximum over ranks),
    within a float32 SVD's backward error (`basis_bound`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    checksum = torch.cat([torch.cat([layer.A.double().sum(1), layer.B.double().sum(0)]) for layer in layers.values()])
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    widest = max(max(layer.A.shape[1], layer.B.shape[0]) for layer in layers.values())
    if (high - low).abs().max() > basis_bound(widest) * checksum.abs().max():
        raise UserError("the processes of this run derived different A, B (each takes the SVD of the base on its "
                        "own device, and these differ); run every process on the same kind of device")


def sft_config(args):
    """TRL's SFTConfig for these options: its data handling (chat templates, EOS kept in the loss, packing), no
    mixed precision (the base is trained in --bits), checkpoints in OUTPUT_DIR/checkpoints."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(Path(args.output_dir) / "checkpoints"), num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        save_steps=args.save_steps, logging_steps=args.logging_steps, seed=args.seed, report_to="none",
        max_length=args.max_length, packing=args.packing, dataset_text_field=args.dataset_text_field,
        assistant_only_loss=args.assistant_only_loss, completion_only_loss=args.completion_only_loss,
        gradient_checkpointing=False, bf16=False, fp16=False, ddp_broadcast_buffers=False,
        use_cpu=not torch.cuda.is_available(),  # without it, torchrun on CPUs starts N separate runs (accelerate)
    )


def train(argv: list[str]) -> Path:
    """Run `psoft-deploy train` with the quick-start script's arguments; returns the output directory."""
    args = train_args.parse(argv)
    if args.jobs is not None:
        raise UserError("train() trains one adapter: pass --jobs to psoft_deploy.train_jobs.train_jobs")
    from transformers import AutoTokenizer

    from .core.model import load_base_model

    output = Path(args.output_dir)
    if (output / ADAPTER_WEIGHTS).exists() and not args.overwrite_output_dir:
        raise UserError(f"{output} already holds an adapter; pass --overwrite_output_dir to replace it")
    psoft_config(args)
    resume = checkpoint_to_resume(args.resume_from_checkpoint, output / "checkpoints")
    config = sft_config(args)
    with config.main_process_first(desc="loading the data and the base"):
        data = load_data(args.data_path, args.dataset_split)
        base = BaseCheckpoint(args.base_model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(base.path)
    data, data_format = check_data(data, args, tokenizer)
    if config.process_index == 0:
        warn_if_pad_is_eos(tokenizer)
    model = load_base_model(base.path, BITS[args.bits]).to(config.device)
    layers = adapt(model, args)
    check_ranks_agree(layers)
    rotations = {name: layer.psoft_R for name, layer in layers.items()}
    trainer = AdapterCheckpointTrainer(model=model, psoft_args=args, rotations=rotations, base=base, args=config,
                                       train_dataset=data, processing_class=tokenizer)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = training_summary(args, trainer, data_format, len(data), losses, result.training_loss, start)
    if not math.isfinite(summary["final_loss"]):
        raise UserError("training diverged (the loss is not finite); lower --learning_rate")
    if trainer.is_world_process_zero():
        save_outputs(output, args, base, layers, tokenizer, summary,
                     svd_dtype=str(BITS[args.bits]).removeprefix("torch."), svd_device=config.device.type)
    trainer.accelerator.wait_for_everyone()
    return output


def warn_if_pad_is_eos(tokenizer) -> None:
    """One warning when the pad token is the EOS token (a common reason for a model never learning to stop)."""
    if tokenizer.eos_token and tokenizer.pad_token in (None, tokenizer.eos_token):
        warnings.warn(f"the pad token is the EOS token {tokenizer.eos_token!r}; it is still trained (padding is "
                      "left out of the loss by position, not by token)", stacklevel=3)


def training_summary(args, trainer, data_format: str, examples: int, losses: list[float], mean_loss: float,
                     start: float) -> dict:
    """What ``training_summary.json`` records of a run: ``losses`` logged every --logging_steps, their mean."""
    return {
        "tool": {"name": "psoft-deploy", "version": __version__},
        "arguments": vars(args),
        "device": trainer.args.device.type,
        "processes": trainer.args.world_size,
        "data_format": data_format,
        "steps": trainer.state.global_step,
        "examples": examples,
        "sequences": len(trainer.train_dataset),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else mean_loss,
        "mean_loss": mean_loss,
        "loss_history": losses,
        "seconds": time.perf_counter() - start,
    }


def save_outputs(output: Path, args, base: BaseCheckpoint, layers: dict[str, PsoftLinear], tokenizer, summary: dict,
                 *, svd_dtype: str, svd_device: str) -> None:
    """The PEFT adapter, the materialized factors (verified by reading them back, and moved into
    ``output`` last: their presence marks a complete output), the tokenizer and the training
    summary, published through `pipeline.publish` beside the checkpoints ``output`` holds."""
    with torch.no_grad():
        modules = {name: ModuleFactors(A=layer.A.cpu(), B=layer.B.cpu(), R=layer.rotation().cpu(),
                                       scale=layer.scale) for name, layer in layers.items()}
    fingerprints = {name: base.fingerprint(base_tensor_key(name)) for name in layers}
    svd = {"backend": args.psoft_svd, "device": svd_device, "dtype": svd_dtype, "torch": torch.__version__}

    def factors(staging: Path) -> AdapterFactors:
        """The trained factors, with the PEFT adapter staged in ``staging`` as PEFT and the converters read it."""
        return AdapterFactors(read_adapter(staging, format="peft"), modules, fingerprints, svd)

    def write(staging: Path) -> None:
        write_trained_adapter(staging, args, {name: layer.psoft_R for name, layer in layers.items()}, base)
        save_materialized_files(factors(staging), staging, base.reference)
        tokenizer.save_pretrained(staging)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")

    publish(output, "trained adapter", write,
            [Check("materialized factors", lambda staging: reread_matches(factors(staging), staging))],
            last_file=MATERIALIZED_META)


def write_trained_adapter(directory: Path, args, rotations: dict[str, PsoftRotation], base: BaseCheckpoint) -> None:
    """The trained R of each module as PEFT saves a PSOFT adapter (adapter_config.json and R's parameters),
    with the record of ``base`` (see `write_peft_adapter`)."""
    write_peft_adapter(directory, psoft_config(args),
                       {name: rotation.state_dict() for name, rotation in rotations.items()}, base)


class AdapterCheckpointTrainer(SFTTrainer):
    """TRL's SFTTrainer whose checkpoints hold the adapter alone, in PEFT's format (as PEFT's own
    training writes them), instead of a full copy of the base; resuming loads R's parameters."""

    def __init__(self, *args, psoft_args, rotations: dict[str, PsoftRotation], base: BaseCheckpoint, **kwargs):
        super().__init__(*args, **kwargs)
        self.psoft_args, self.psoft_rotations, self.psoft_base = psoft_args, rotations, base

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:  # other ranks of a distributed run write nothing
            return
        directory = Path(output_dir or self.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        write_trained_adapter(directory, self.psoft_args, self.psoft_rotations, self.psoft_base)
        apply_umask(directory)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        tensors = read_safetensors(Path(resume_from_checkpoint) / ADAPTER_WEIGHTS)
        mismatch = UserError(f"checkpoint {resume_from_checkpoint} holds another adapter than this run's: resume "
                             "with the --r, --target_modules and PSOFT switches it was trained with")
        prefixes = {name: f"{PEFT_PREFIX}{name}.psoft_R." for name in self.psoft_rotations}
        if tensors.keys() != {prefixes[name] + key for name, rotation in self.psoft_rotations.items()
                              for key in rotation.state_dict()}:
            raise mismatch
        for name, rotation in self.psoft_rotations.items():
            try:
                rotation.load_state_dict({key: tensors[prefixes[name] + key] for key in rotation.state_dict()})
            except RuntimeError:  # a shape differs
                raise mismatch from None

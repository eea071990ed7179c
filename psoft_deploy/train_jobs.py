"""`psoft-deploy train --jobs JOBS.jsonl`: many PSOFT adapters of one base trained in one run, each as its run
alone trains it.

The base is loaded once and each adapted weight has one SVD, at the jobs' largest rank (`PsoftJobsLinear`).
Each job keeps what makes its run alone: TRL's `SFTTrainer` on its own options draws its batches (tokenization,
collation, seeded order), builds its optimizer and schedule, and counts its tokens. A step pads every unfinished
job's batch to one length on the right (attention mask 0, labels -100: no real token's result changes), runs one
forward per --jobs_per_forward jobs (default 4), takes each job's loss on its own rows as TRL computes it alone,
and backpropagates their sum: each job's R gets gradients from its own rows only. Then each job clips and steps
as its trainer would. A job is written by `save_outputs` when it ends; one whose loss is not finite stops alone.

Under torchrun each process draws its shard of every job's batches from the job's trainer (accelerate), as that
job's run alone under torchrun does, and each job's gradients are averaged over the processes as DDP averages them
(the loss scaled as TRL scales it for DDP); the processes stop a job together, and only the first writes.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from torch import nn
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from . import train_args
from .core import internals
from .core.base import BaseCheckpoint
from .core.errors import UserError
from .core.formats import ADAPTER_WEIGHTS
from .core.layer import PsoftJobsLinear, PsoftRotation, replace_module
from .core.progress import track, warning
from .core.psoft import singular_triplets
from .train import (
    BITS,
    AdapterCheckpointTrainer,
    check_data,
    check_rank,
    check_ranks_agree,
    load_data,
    psoft_config,
    rotation_spec,
    save_outputs,
    sft_config,
    subspace_spec,
    targeted_linears,
    training_summary,
    warn_if_pad_is_eos,
)

# The options a job may set for itself; the others (base, targets, PSOFT switches, batch) all jobs share.
JOB_OPTIONS = ("r", "psoft_alpha", "learning_rate", "max_steps", "num_train_epochs", "seed", "dataset_split",
               "dataset_text_field", "max_length", "assistant_only_loss", "completion_only_loss")
# Jobs a forward by default. The memory a forward holds grows with its jobs (their activations), its speed does
# not beyond a few: 8 small jobs ran as fast 4 a forward as all 8 in one, at 1.29x one run alone's peak memory
# against 1.63x (docs/benchmarks.md), within the 1.5x a run of jobs is meant to stay under.
JOBS_PER_FORWARD = 4
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def relied_on() -> tuple[dict, dict]:
    """The internals of transformers' Trainer, TRL and argparse that --jobs drives each job's trainer through
    (checked on transformers 5.19, TRL 1.16): whole signatures, and the attributes it reads."""
    from transformers import Trainer
    from trl.trainer import utils as trl_utils

    signatures = {
        (Trainer, "_init_training_state"): ("(self, max_steps, num_update_steps_per_epoch, num_train_epochs, "
                                            "resume_from_checkpoint, trial)"),
        (Trainer, "_get_learning_rate"): "(self)",
        (Trainer, "_save_checkpoint"): "(self, model, trial)",
        (Trainer, "set_initial_training_values"): "(self, args, dataloader)",
        (Trainer, "get_batch_samples"): "(self, epoch_iterator, num_batches, device)",
        (Trainer, "create_optimizer"): "(self, model)",
        (Trainer, "create_scheduler"): "(self, num_training_steps, optimizer)",
        # SFTTrainer wraps the model's forward in place (``model.forward``); each job's trainer would wrap it again
        (trl_utils, "add_fused_lm_head"): "(model, temperature, cast_lm_head_to_fp32, outputs)",
    }
    attributes = {Trainer: ("loss_is_scaled_for_ga", "model_accepts_loss_kwargs", "compute_loss_func", "accelerator",
                            "state", "optimizer", "lr_scheduler"),
                  argparse.ArgumentParser: ("_actions",)}
    return signatures, attributes


def check_internals() -> None:
    """Refuse --jobs in one line where transformers or TRL changed what it relies on (`relied_on`)."""
    changed = internals.missing("transformers/TRL", *relied_on())
    if changed:
        raise UserError(f"train --jobs drives each job's trainer through internals that changed: {changed}; train the "
                        "jobs one by one, or install the transformers and TRL versions of docs/install.md")


def train_jobs(args: argparse.Namespace) -> Path:
    """Train every job of ``args.jobs`` into ``OUTPUT_DIR/NAME``; returns OUTPUT_DIR. Everything a job could
    be refused for is checked before training starts, so nothing is written for any job when one is bad."""
    refuse_unsupported(args)
    check_internals()
    jobs = [Job(index, job_args) for index, job_args in enumerate(read_jobs(args))]
    from transformers import AutoTokenizer

    from .core.model import load_base_model

    config = sft_config(args)
    with config.main_process_first(desc="loading the data and the base"):
        base = BaseCheckpoint(args.base_model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(base.path)
        for job in jobs:
            with job.errors():
                job.data, job.data_format = check_data(load_data(job.args.data_path, job.args.dataset_split),
                                                       job.args, tokenizer)
    if config.process_index == 0:
        warn_if_pad_is_eos(tokenizer)
    model = load_base_model(base.path, BITS[args.bits]).to(config.device)
    layers = adapt_jobs(model, args, jobs)
    check_ranks_agree(layers)
    for job in jobs:
        job.prepare(model, layers, base, tokenizer)
    start = time.perf_counter()
    failed = train_together(model, jobs, tokenizer.pad_token_id or 0, args.jobs_per_forward or JOBS_PER_FORWARD,
                            lambda job: job.save(base, layers, tokenizer, start))
    jobs[0].trainer.accelerator.wait_for_everyone()  # the first process may still be writing
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} jobs stopped (loss not finite: {', '.join(failed)}); the "
                        f"others are written in {args.output_dir}")
    return Path(args.output_dir)


def refuse_unsupported(args: argparse.Namespace) -> None:
    """What --jobs cannot train as each job's run alone would, refused in one line."""
    refusals = [
        (args.psoft_svd != "full", "--jobs needs --psoft_svd full: the jobs share one basis, and only the full "
                                   "SVD's singular vectors are the same (nested) for every rank"),
        (args.packing, "--packing with --jobs: packed batches carry no padding to share a forward with other "
                       "jobs; train packed jobs one by one"),
        (args.resume_from_checkpoint is not None, "--resume_from_checkpoint with --jobs: a run of jobs writes no "
                                                  "checkpoints to resume from"),
    ]
    for refused, message in refusals:
        if refused:
            raise UserError(message)


def read_jobs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """Each line of --jobs as the arguments of the job's run alone (``--output_dir OUTPUT_DIR/NAME``), checked."""
    path = Path(args.jobs).expanduser()
    if not path.is_file():
        raise UserError(f"--jobs {args.jobs}: no such file")
    actions = {action.dest: action for action in train_args.parser()._actions}
    jobs: dict[str, argparse.Namespace] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"--jobs {args.jobs} line {number}"
        try:
            job = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(job, dict):
            raise UserError(f"{where}: a job is a JSON object with 'name' and 'data_path'")
        name = job.pop("name", None)
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UserError(f"{where}: 'name' must be a directory name of letters, digits, '.', '_' and '-', not "
                            f"starting with '.' or '-' (got {name!r})")
        if name in jobs:
            raise UserError(f"{where}: the job name {name!r} is taken by an earlier line")
        where = f"{where}: job {name!r}"
        if not isinstance(job.get("data_path"), str):
            raise UserError(f"{where} needs a 'data_path' (a string)")
        shared = sorted(set(job) - {"data_path", *JOB_OPTIONS})
        if shared:
            raise UserError(f"{where} may not set {', '.join(shared)}: all jobs of a run share it (a job may set "
                            f"{', '.join(JOB_OPTIONS)}); train jobs that differ in it in separate runs")
        values = vars(args) | {"output_dir": str(Path(args.output_dir) / name), "jobs": None, "jobs_per_forward": None}
        values |= {key: option_value(actions[key], value, where) for key, value in job.items()}
        try:
            job_args = train_args.check(argparse.Namespace(**values))
            psoft_config(job_args)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        if (Path(job_args.output_dir) / ADAPTER_WEIGHTS).exists() and not args.overwrite_output_dir:
            raise UserError(f"{where}: {job_args.output_dir} already holds an adapter; pass --overwrite_output_dir "
                            "to replace it")
        jobs[name] = job_args
    if not jobs:
        raise UserError(f"--jobs {args.jobs} holds no job")
    return list(jobs.values())


def option_value(action: argparse.Action, value, where: str):
    """A job's JSON ``value`` for the option of ``action``, as the same option on the command line parses."""
    switch = action.nargs == 0
    if isinstance(value, bool) != switch or not isinstance(value, (bool, int, float, str)):
        raise UserError(f"{where}: {action.dest} must be {'true or false' if switch else 'a number or a string'} "
                        f"(got {json.dumps(value)})")
    try:
        return value if switch or action.type is None else action.type(str(value))
    except ValueError:
        raise UserError(f"{where}: {action.dest} {json.dumps(value)} is not a valid value") from None


def adapt_jobs(model: nn.Module, args: argparse.Namespace, jobs: list[Job]) -> dict[str, PsoftJobsLinear]:
    """Wrap every targeted nn.Linear in a `PsoftJobsLinear` holding one trainable R per job over the basis at
    the largest rank; the base stays frozen."""
    chosen = targeted_linears(model, args)
    widest = max(jobs, key=lambda job: job.args.r)
    with widest.errors():
        check_rank(chosen, widest.args.r)
    model.requires_grad_(False)
    rows = [0] * len(jobs)
    layers = {}
    for name, module in chosen.items():
        triplets = singular_triplets(module.weight.detach().to(torch.float32), widest.args.r, subspace_spec(args))
        basis = tuple(part.clone() for part in triplets)  # not views that keep the full SVD's U and Vh alive
        rotations = [PsoftRotation(job.args.r, rotation_spec(job.args), job.args.psoft_mag_a, job.args.psoft_mag_b)
                     for job in jobs]
        layers[name] = PsoftJobsLinear(module, basis, args.ab_svd_init, rotations, rows, args.psoft_dropout)
        replace_module(model, name, layers[name])
    return layers


class Job:
    """One adapter of the run: its arguments, its data and the trainer of its run alone
    (`AdapterCheckpointTrainer`), whose data pipeline, optimizer, schedule, logs and checkpoints it uses step by
    step."""

    def __init__(self, index: int, args: argparse.Namespace):
        self.index, self.args, self.name = index, args, Path(args.output_dir).name
        self.window, self.total = torch.tensor(0.0), 0.0  # loss summed since the last log (as Trainer), over the logs
        self.failed = False

    @contextmanager
    def errors(self):
        """A context in which a `UserError` names this job."""
        try:
            yield
        except UserError as error:
            raise UserError(f"job {self.name!r}: {error}") from None

    def prepare(self, model: nn.Module, layers: dict[str, PsoftJobsLinear], base: BaseCheckpoint, tokenizer) -> None:
        """This job's trainer, dataloader, optimizer over its own R, schedule and state, as its run alone sets
        them up."""
        rotations = {name: layer.jobs[self.index] for name, layer in layers.items()}
        model.__dict__.pop("forward", None)  # each SFTTrainer wraps the forward in its fused LM head: wrap it once
        self.trainer = trainer = AdapterCheckpointTrainer(
            model=model, psoft_args=self.args, rotations=rotations, base=base, args=sft_config(self.args),
            train_dataset=self.data, processing_class=tokenizer)
        for printer in (ProgressCallback, PrinterCallback):  # the run has one bar; the losses go to the summaries
            trainer.remove_callback(printer)
        dataloader = trainer.get_train_dataloader()  # seeded, as alone, by the trainer's set_seed(--seed)
        epochs, updates_per_epoch, _, _, _, steps_in_epoch, max_steps = trainer.set_initial_training_values(
            trainer.args, dataloader)
        trainer._init_training_state(max_steps, updates_per_epoch, epochs, None, None)
        own = nn.ModuleList(rotations.values())
        self.parameters = list(own.parameters())
        trainer.create_optimizer(own)
        trainer.create_scheduler(max_steps)
        self.batches = self.updates(dataloader, epochs, updates_per_epoch, steps_in_epoch)

    def updates(self, dataloader, epochs: int, updates_per_epoch: int, steps_in_epoch: int):
        """Each optimizer step's micro-batches, token count and epoch reached, as `Trainer._run_epoch` draws them."""
        accumulation = self.trainer.args.gradient_accumulation_steps
        remainder = steps_in_epoch % accumulation or accumulation
        for epoch in range(epochs):
            dataloader.set_epoch(epoch)
            iterator, drawn = iter(dataloader), 0
            for update in range(updates_per_epoch):
                count = accumulation if update != updates_per_epoch - 1 else remainder
                batches, num_items = self.trainer.get_batch_samples(iterator, count, self.trainer.args.device)
                drawn += len(batches)
                yield batches, num_items, epoch + drawn / steps_in_epoch

    def loss(self, log_probs: torch.Tensor, mask: torch.Tensor, micro_batches: int, num_items) -> torch.Tensor:
        """SFTTrainer's loss of this job's rows (its ``compute_loss`` and ``training_step``): under torchrun
        ``num_items`` counts every process's tokens, and the loss is scaled by the processes that DDP averages."""
        trainer = self.trainer
        tokens = mask.sum() if num_items is None else num_items
        loss = -log_probs.sum() / torch.as_tensor(tokens).clamp(min=1)
        if trainer.args.average_tokens_across_devices and num_items is not None:
            loss = loss * trainer.accelerator.num_processes
        scaled = trainer.loss_is_scaled_for_ga
        if scaled is None:
            counted = trainer.model_accepts_loss_kwargs and num_items is not None
            scaled = counted or trainer.compute_loss_func is not None
        return loss if scaled else loss / micro_batches

    def update(self, step_loss: torch.Tensor, epoch: float) -> None:
        """The optimizer step of the trainer's loop: clip, step, schedule; its logs and checkpoints."""
        trainer, state = self.trainer, self.trainer.state
        grad_norm = trainer.accelerator.clip_grad_norm_(self.parameters, trainer.args.max_grad_norm or float("inf"))
        trainer.optimizer.step()
        learning_rate = trainer._get_learning_rate()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad()
        state.global_step, state.epoch = state.global_step + 1, epoch
        self.window = self.window + step_loss
        if state.global_step % state.logging_steps == 0:  # the processes' mean, as Trainer logs it
            window, self.window = trainer.accelerator.reduce(self.window, "mean").item(), torch.tensor(0.0)
            trainer.log({"loss": window / state.logging_steps, "grad_norm": grad_norm.item(),
                         "learning_rate": learning_rate})
            self.total += window
        if state.global_step % state.save_steps == 0 or self.done:
            trainer._save_checkpoint(trainer.model, trial=None)

    def stop(self) -> None:
        """Stop this job (its loss is not finite); the directories its trainer made and left empty go."""
        self.failed = True
        for directory in (Path(self.trainer.args.output_dir), Path(self.args.output_dir)):
            with suppress(OSError):
                directory.rmdir()

    @property
    def done(self) -> bool:
        return self.failed or self.trainer.state.global_step == self.trainer.state.max_steps

    def save(self, base: BaseCheckpoint, layers: dict[str, PsoftJobsLinear], tokenizer, start: float) -> None:
        """This job's outputs, exactly what its run alone writes (`save_outputs`), by the first process only."""
        if not self.trainer.is_world_process_zero():
            return
        state, scale = self.trainer.state, self.args.psoft_alpha / self.args.r
        own = {name: layer.job(self.index, scale) for name, layer in layers.items()}
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        mean_loss = (self.total + self.window.item()) / state.global_step
        summary = training_summary(self.args, self.trainer, self.data_format, len(self.data), losses, mean_loss, start)
        save_outputs(Path(self.args.output_dir), self.args, base, own, tokenizer, summary,
                     svd_dtype=str(BITS[self.args.bits]).removeprefix("torch."),
                     svd_device=self.trainer.args.device.type)


def train_together(model: nn.Module, jobs: list[Job], pad_id: int, per_forward: int, finished) -> list[str]:
    """Step every unfinished job at once, one forward per micro-batch for up to ``per_forward`` of them;
    ``finished(job)`` as each ends. Returns the names of the jobs stopped by a loss that is not finite."""
    model.train()
    active, failed = list(jobs), []
    accelerator = jobs[0].trainer.accelerator
    main = accelerator.is_main_process
    if main:
        progress = track(total=max(job.trainer.state.max_steps for job in jobs),
                         desc=f"training {len(jobs)} adapters", unit="step")
    while active:
        drawn = {job: next(job.batches) for job in active}
        step_loss = dict.fromkeys(active, 0.0)
        for micro in range(max(len(batches) for batches, _, _ in drawn.values())):
            present = [job for job in active if micro < len(drawn[job][0]) and not job.failed]
            for group in (present[i:i + per_forward] for i in range(0, len(present), per_forward)):
                for job, loss in forward_backward(model, group, drawn, micro, pad_id).items():
                    if loss is None:
                        job.stop()
                        failed.append(job.name)
                        if main:
                            warning(f"job {job.name!r} stopped at step {job.trainer.state.global_step + 1}: its loss "
                                    "is not finite (lower its learning_rate); its adapter is not written")
                    else:
                        step_loss[job] = step_loss[job] + loss
        stepping = [job for job in active if not job.failed]
        average_gradients(accelerator, [parameter for job in stepping for parameter in job.parameters])
        for job in stepping:
            job.update(step_loss[job], drawn[job][2])
        if main:
            progress.update()
        for job in active:
            if job.done and not job.failed:
                finished(job)
        active = [job for job in active if not job.done]
    if main:
        progress.close()
    return failed


def forward_backward(model: nn.Module, jobs: list[Job], drawn: dict, micro: int, pad_id: int) -> dict:
    """One forward of these jobs' micro-batch ``micro`` together, and the backward of their losses' sum; returns
    each job's loss (None where it is not finite, in any process: left out of the backward)."""
    rows = next(module for module in model.modules() if isinstance(module, PsoftJobsLinear)).rows
    batches = [drawn[job][0][micro] for job in jobs]
    rows[:] = [0] * len(rows)
    for job, batch in zip(jobs, batches):
        rows[job.index] = len(batch["input_ids"])
    outputs = model(**concatenated(batches, pad_id, model.device), use_cache=False, fused_lm_head=True)
    counts = [rows[job.index] for job in jobs]
    losses = {}
    for job, log_probs, mask in zip(jobs, outputs.log_probs.split(counts), outputs.label_mask.split(counts)):
        batches_drawn, num_items, _ = drawn[job]
        losses[job] = job.loss(log_probs, mask, len(batches_drawn), num_items)
    # Under torchrun a job stops where its loss is not finite in any process: all decide alike (their maximum).
    not_finite = torch.stack([~loss.isfinite() for loss in losses.values()]).float()
    stops = jobs[0].trainer.accelerator.reduce(not_finite, "max").tolist()
    kept = {job: loss for (job, loss), stop in zip(losses.items(), stops) if not stop}
    if kept:
        sum(kept.values()).backward()
    return {job: kept[job].detach() if job in kept else None for job in losses}


def average_gradients(accelerator, parameters: list[nn.Parameter]) -> None:
    """Under torchrun, each gradient averaged over the processes in one all-reduce, as DDP averages a run alone's."""
    if accelerator.num_processes == 1 or not parameters:
        return
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in parameters])
    flat = accelerator.reduce(flat, "mean")
    for parameter, gradient in zip(parameters, flat.split([p.numel() for p in parameters])):
        parameter.grad = gradient.view_as(parameter)


def concatenated(batches: list[dict], pad_id: int, device: torch.device) -> dict:
    """The jobs' batches as one, each padded on the right to the longest: padding is masked out of attention
    (0) and of the loss (-100), and real tokens keep their positions."""
    length = max(batch["input_ids"].shape[1] for batch in batches)
    fill = {"input_ids": pad_id, "labels": -100}
    return {key: torch.cat([nn.functional.pad(batch[key], (0, length - batch[key].shape[1]), value=fill.get(key, 0))
                            for batch in batches]).to(device) for key in batches[0]}

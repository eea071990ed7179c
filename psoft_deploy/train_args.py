"""The command line of `psoft-deploy train`, parsed and checked before torch is imported (so
``--help`` and a bad argument answer at once)."""

from __future__ import annotations

import argparse

from .core.errors import UserError
from .core.outputs import check_apart

DESCRIPTION = ("`psoft-deploy train`: PSOFT fine-tuning with TRL's SFTTrainer on `PsoftLinear`, the layer every "
               "converter uses, saving a PEFT adapter *and* the materialized factors it was trained with.")
BITS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "32": "float32"}  # --bits -> torch dtype name
# The least value of each count; --max_steps is -1 (train for --num_train_epochs) or at least 1.
LEAST = {"max_length": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "save_steps": 1,
         "logging_steps": 1}


def number(text: str) -> int | float:
    """A number as the user wrote it: an int when it is integral (so ``--psoft_alpha 32`` is saved as 32)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def parser() -> argparse.ArgumentParser:
    """The quick-start script's options plus PSOFT's own and TRL's data options, with their names."""
    p = argparse.ArgumentParser(
        prog="psoft-deploy train", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  psoft-deploy train --base_model_name_or_path meta-llama/Llama-3.2-3B "
               "--data_path ./chat.jsonl \\\n      --output_dir ./psoft-adapter --r 128 --psoft_alpha 128 "
               "--target_modules q_proj v_proj")
    add = p.add_argument
    add("--base_model_name_or_path", required=True, help="Base model: local directory or hub id.")
    add("--output_dir", required=True, help="Where the adapter, materialized factors and checkpoints go.")
    add("--data_path", help="datasets hub name, or a local .txt/.json/.jsonl/.csv/.parquet file: a text column, "
                            "chat 'messages', or 'prompt' and 'completion' (required unless --jobs).")
    add("--jobs", help="A .jsonl file, one job a line: {\"name\": ..., \"data_path\": ...} and optionally the "
                       "options a job may set (r, psoft_alpha, learning_rate, max_steps, num_train_epochs, seed, data "
                       "options); trains them together over one load of the base, each into OUTPUT_DIR/NAME as it "
                       "would alone.")
    add("--jobs_per_forward", type=int, default=None,
        help="With --jobs: at most this many jobs share one forward (default 4: a forward holds the activations of "
             "its jobs at once, while more than a few jobs a forward run no faster; 8 small jobs 4 a forward took "
             "1.3x one run's peak memory, all 8 in one 1.6x, at the same speed).")
    add("--dataset_split", default="train", help="e.g. 'train[:1%%]'.")
    add("--dataset_text_field", default="text", help="Column holding the text (plain-text data).")
    add("--max_length", type=int, default=512, help="Truncate examples (with --packing: the packed length) to this "
                                                    "many tokens.")
    add("--packing", action="store_true", help="Pack several examples into each sequence of --max_length tokens.")
    add("--assistant_only_loss", action="store_true",
        help="Train on the assistant turns only ('messages' data; the chat template needs {%% generation %%} marks).")
    add("--completion_only_loss", action=argparse.BooleanOptionalAction, default=None,
        help="Train on the completion only ('prompt'/'completion' data, where it is the default).")
    add("--num_train_epochs", type=float, default=1.0, help="Passes over the data (unless --max_steps).")
    add("--max_steps", type=int, default=-1, help="Stop after this many optimizer steps (overrides epochs).")
    add("--per_device_train_batch_size", type=int, default=1, help="Sequences per step and process.")
    add("--gradient_accumulation_steps", type=int, default=1, help="Steps whose gradients add up to one update.")
    add("--learning_rate", type=float, default=5e-4, help="AdamW learning rate.")
    add("--bits", default="fp32", choices=sorted(BITS), help="dtype the base is loaded (and trained) in.")
    add("--seed", type=int, default=42, help="Seed for data order, dropout and initialisation.")
    add("--save_steps", type=int, default=500, help="Checkpoint every N steps (in OUTPUT_DIR/checkpoints).")
    add("--logging_steps", type=int, default=10, help="Log the loss every N steps.")
    add("--resume_from_checkpoint", default=None, help="A checkpoint directory, or 'latest'.")
    add("--overwrite_output_dir", action="store_true", help="Replace an adapter already in OUTPUT_DIR.")
    add("--r", type=int, default=32, help="PSOFT rank.")
    add("--psoft_alpha", type=number, default=32, help="Scale s = psoft_alpha / r.")
    add("--target_modules", nargs="+", default=["q_proj", "v_proj"], help="Module names (or name suffixes).")
    add("--psoft_dropout", type=float, default=0.0, help="Dropout on the adapter path's input.")
    add("--psoft_svd", choices=["full", "lowrank"], default="full", help="SVD that builds the principal subspace.")
    add("--psoft_svd_lowrank_niter", type=int, default=10, help="Power iterations of the low-rank SVD.")
    add("--ab_svd_init", choices=["psoft_init", "pissa_init"], default="psoft_init", help="How A and B take S.")
    add("--use_cayley_neumann", action="store_true", help="R by a Cayley–Neumann series instead of an inverse.")
    add("--num_cayley_neumann_terms", type=int, default=5, help="Terms of that series.")
    add("--cayley_neumann_eps", type=float, default=None, help="Scale Q down to this Frobenius norm first.")
    for name, help_text in (("psoft_orth", "orthogonal R (Cayley)"), ("psoft_mag_a", "input-side magnitude vector"),
                            ("psoft_mag_b", "output-side magnitude vector")):
        add(f"--{name}", action=argparse.BooleanOptionalAction, default=True, help=help_text)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments of ``argv``, checked (see `check`); data from --data_path or --jobs (a usage error
    otherwise, as a missing option is)."""
    options = parser()
    args = options.parse_args(argv)
    if (args.data_path is None) == (args.jobs is None):
        options.error("one of --data_path and --jobs is required (not both: each job names its data_path)")
    if args.jobs_per_forward is not None and (args.jobs is None or args.jobs_per_forward < 1):
        options.error("--jobs_per_forward takes a count of at least 1, with --jobs")
    return check(args)


def check(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` checked: counts in range (some training, not none), and an output directory apart from the base."""
    for name, least in LEAST.items():
        if getattr(args, name) < least:
            raise UserError(f"--{name} must be at least {least}")
    if args.max_steps < 1 and args.max_steps != -1:
        raise UserError(f"--max_steps must be at least 1, or -1 to train for --num_train_epochs (got {args.max_steps})")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise UserError(f"--num_train_epochs must be positive (got {args.num_train_epochs})")
    check_apart(args.output_dir, {"base": args.base_model_name_or_path})
    return args

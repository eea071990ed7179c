"""Training speed and memory: `psoft-deploy train` (PsoftLinear) vs PEFT's own PSOFT layer trained by TRL's
SFTTrainer, one run.

Same model (Llama 768×12, ~100M parameters, random weights, fp32), data, batch (4 × 128 tokens),
optimizer and SFTConfig (psoft-deploy's own), PSOFT r = 32 on q_proj and v_proj; each side trains in
its own process, which reports its median optimizer-step time after two warm-up steps (model loading,
data preparation and the SVDs excluded), its peak RSS when training ends and its final loss.

With ``--jobs``: 8 small jobs (48 examples each, 24 steps) on a ~10M-parameter Llama (320×8, fp32), r = 16
on q_proj and v_proj, as one `train --jobs` process (by default, 4 jobs a forward, and all 8 in one), as 8 `train`
processes, and as 8 processes of PEFT + TRL (the anchor), interleaved; wall time from process start to
written outputs, and peak RSS of each process.

    python benchmarks/train.py [--steps 20] [--rounds 3]
    python benchmarks/train.py --jobs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB = 768, 12, 12, 2048, 256
COMMON = ["--max_length", "128", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--r", "32",
          "--psoft_alpha", "32", "--target_modules", "q_proj", "v_proj", "--logging_steps", "5", "--save_steps",
          "100000", "--seed", "0"]


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def record_training(steps_skipped: int = 2) -> dict:
    """Install, on every Trainer this process creates, a callback that records the duration of each
    optimizer step after the first ``steps_skipped`` (warm-up) and the peak RSS when training ends
    (before psoft-deploy writes its outputs); the same for either side."""
    import time

    import transformers

    record = {"step_seconds": [], "peak_rss": 0}

    class Recorder(transformers.TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step > steps_skipped:
                record["step_seconds"].append(now - self.last)
            self.last = now

        def on_train_end(self, *args, **kwargs):
            record["peak_rss"] = peak_rss()

    original = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Recorder())

    transformers.Trainer.__init__ = init
    return record


def run_ours(base: Path, data: Path, output: Path, steps: int) -> dict:
    from psoft_deploy.train import train

    train(["--base_model_name_or_path", str(base), "--output_dir", str(output), "--data_path", str(data),
           "--max_steps", str(steps), *COMMON])
    return {"final_loss": json.loads((output / "training_summary.json").read_text())["final_loss"]}


def run_peft(base: Path, data: Path, output: Path, steps: int, options: list[str] = COMMON) -> dict:
    """PEFT's PSOFT layer (get_peft_model) trained by TRL's SFTTrainer with the SFTConfig psoft-deploy uses;
    the adapter saved by PEFT."""
    from datasets import load_dataset
    from peft import PsoftConfig, get_peft_model
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from psoft_deploy.core.model import load_base_model
    from psoft_deploy.train import sft_config
    from psoft_deploy.train_args import parser

    args = parser().parse_args(["--base_model_name_or_path", str(base), "--output_dir", str(output),
                                "--data_path", str(data), "--max_steps", str(steps), *options])
    model = get_peft_model(load_base_model(base), PsoftConfig(r=args.r, psoft_alpha=args.psoft_alpha,
                                                              target_modules=args.target_modules))
    trainer = SFTTrainer(model=model, args=sft_config(args), processing_class=AutoTokenizer.from_pretrained(base),
                         train_dataset=load_dataset("text", data_files=str(data), split="train"))
    trainer.train()
    model.save_pretrained(output)
    return {"final_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]}


JOBS, JOB_EXAMPLES, JOB_STEPS = 8, 48, 24
JOB_MODEL = {"hidden_size": 320, "num_hidden_layers": 8, "num_attention_heads": 5, "intermediate_size": 864}
JOB_OPTIONS = ["--max_length", "128", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--r", "16",
               "--psoft_alpha", "16", "--target_modules", "q_proj", "v_proj", "--logging_steps", "4", "--seed", "0",
               "--max_steps", str(JOB_STEPS)]


def job_side(side: str, work: Path) -> None:
    """One process of the --jobs comparison: all jobs at once ('together:N', N jobs a forward; 'together:default',
    --jobs_per_forward left out), one job alone ('alone:I') or one job by PEFT + TRL ('peft:I'); prints its peak
    RSS."""
    from psoft_deploy.train import train
    from psoft_deploy.train_args import parse
    from psoft_deploy.train_jobs import train_jobs

    kind, number = side.split(":")
    common = ["--base_model_name_or_path", str(work / "base"), *JOB_OPTIONS]
    data, output = work / f"job{number}.txt", work / kind / f"job{number}"
    if kind == "together":
        per_forward = [] if number == "default" else ["--jobs_per_forward", number]
        train_jobs(parse([*common, "--jobs", str(work / "jobs.jsonl"), *per_forward, "--output_dir",
                          str(work / f"together-{number}")]))
    elif kind == "alone":
        train([*common, "--data_path", str(data), "--output_dir", str(output)])
    else:
        run_peft(work / "base", data, output, JOB_STEPS, JOB_OPTIONS)
    print("RESULT " + json.dumps({"peak_rss": peak_rss()}))


def compare_jobs() -> None:
    """8 jobs: `train --jobs` (by default, and all in one forward) against the 8 runs alone and against PEFT +
    TRL 8 times, in one run; wall time of each process from its start to its outputs, summed per side."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from psoft_deploy.testing import build_tokenizer, bundled_text
    from psoft_deploy.train_jobs import JOBS_PER_FORWARD

    def run(side: str) -> dict:
        start = time.perf_counter()
        process = subprocess.run([sys.executable, __file__, "--side", side, "--work", str(work)], capture_output=True,
                                 text=True)
        if process.returncode != 0:
            raise SystemExit(process.stderr[-4000:])
        line = next(l for l in process.stdout.splitlines() if l.startswith("RESULT "))
        return json.loads(line.removeprefix("RESULT ")) | {"seconds": time.perf_counter() - start}

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**JOB_MODEL, vocab_size=VOCAB, pad_token_id=3, tie_word_embeddings=False))
        model.save_pretrained(work / "base")
        parameters = sum(parameter.numel() for parameter in model.parameters())
        build_tokenizer(work / "base", bundled_text(), vocab_size=VOCAB)
        text = " ".join(bundled_text())
        windows = [text[i:i + 200] for i in range(0, len(text) - 200, 20)]
        jobs = []
        for index in range(JOBS):  # each job its own examples, in its own order
            data = work / f"job{index}.txt"
            data.write_text("\n".join(windows[(index * 37 + 5 * k) % len(windows)] for k in range(JOB_EXAMPLES)) + "\n")
            jobs.append(json.dumps({"name": f"job{index}", "data_path": str(data)}) + "\n")
        (work / "jobs.jsonl").write_text("".join(jobs))
        # Interleaved (PEFT and alone in pairs of alternating order, the --jobs runs between them), so that a
        # machine whose speed drifts (shared here) weighs on every side alike.
        peft, alone, together = [], [], {}
        for index in range(JOBS):
            pair = [(peft, f"peft:{index}"), (alone, f"alone:{index}")]
            for runs, side in pair if index % 2 == 0 else pair[::-1]:
                runs.append(run(side))
            if index in (2, 5):
                label, side = ((f"train --jobs (default: {JOBS_PER_FORWARD} a forward)", "together:default")
                               if index == 2 else (f"train --jobs, {JOBS} jobs a forward", f"together:{JOBS}"))
                together[label] = [run(side)]
    print(f"{JOBS} jobs × {JOB_EXAMPLES} examples, {JOB_STEPS} steps (batch 2, ≤128 tokens), Llama 320×8 "
          f"({parameters / 1e6:.1f}M parameters, fp32), PSOFT r=16 on q_proj, v_proj, "
          f"torch threads={torch.get_num_threads()}")
    rows = [(f"PEFT + TRL, {JOBS} processes (anchor)", peft), (f"psoft-deploy train, {JOBS} processes", alone),
            *together.items()]
    seconds = {label: sum(r["seconds"] for r in runs) for label, runs in rows}
    rss = {label: max(r["peak_rss"] for r in runs) for label, runs in rows}
    (anchor, _), (single, _) = rows[:2]
    for label, runs in rows[:2]:
        print(f"  {label}: runs of {min(r['seconds'] for r in runs):.1f}–{max(r['seconds'] for r in runs):.1f} s")
    for label, _ in rows:
        print(f"  {label:<38} {seconds[label]:6.1f} s ({seconds[anchor] / seconds[label]:4.2f}x PEFT's speed, "
              f"{seconds[single] / seconds[label]:4.2f}x the runs alone's)   peak RSS {rss[label] / 2**30:5.2f} GiB "
              f"({rss[label] / rss[single]:4.2f}x one run alone's)")


def compare_one_layer(reps: int = 30) -> dict:
    """One adapted q_proj (768×768, r = 32) on 4 × 128 tokens, PEFT's layer and ours with the same
    weights, timed forward + backward alternately; also the bytes autograd keeps for the backward
    (every distinct tensor saved, weights included, the input excluded)."""
    import time

    import torch
    from peft import PsoftConfig, get_peft_model
    from torch import nn

    from psoft_deploy.train import adapt
    from psoft_deploy.train_args import parser

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

        def forward(self, x):
            return self.q_proj(x)

    torch.manual_seed(0)
    peft_block, our_block = Block(), Block()
    our_block.load_state_dict(peft_block.state_dict())
    peft_block = get_peft_model(peft_block, PsoftConfig(r=32, psoft_alpha=32, target_modules=["q_proj"]))
    adapt(our_block, parser().parse_args(["--base_model_name_or_path", "-", "--output_dir", "-", "--data_path", "-",
                                          *COMMON, "--target_modules", "q_proj"]))
    x = torch.randn(4, 128, HIDDEN, requires_grad=True)
    upstream = torch.randn(4, 128, HIDDEN)

    def saved_bytes(block) -> int:
        kept = {}

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
                kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            block(x).backward(upstream)
        return sum(kept.values())

    def seconds(block) -> float:
        start = time.perf_counter()
        block(x).backward(upstream)
        return time.perf_counter() - start

    times = {"peft": [], "ours": []}
    for _ in range(reps):
        times["peft"].append(seconds(peft_block))
        times["ours"].append(seconds(our_block))
    return {side: {"seconds": statistics.median(times[side]), "saved_bytes": saved_bytes(block)}
            for side, block in (("peft", peft_block), ("ours", our_block))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="ABBA rounds (each runs both sides twice).")
    parser.add_argument("--jobs", action="store_true", help=f"Compare {JOBS} jobs trained by `train --jobs`, alone "
                                                             "and by PEFT + TRL instead.")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.jobs:
        compare_jobs()
        return
    if args.side and args.side not in ("ours", "peft"):
        job_side(args.side, args.work)
        return
    if args.side:
        record = record_training()
        runner = run_ours if args.side == "ours" else run_peft
        output = Path(tempfile.mkdtemp(dir=args.work, prefix=args.side))
        result = runner(args.work / "base", args.work / "data.txt", output, args.steps)
        print("RESULT " + json.dumps(result | {"seconds_per_step": statistics.median(record["step_seconds"]),
                                               "peak_rss": record["peak_rss"]}))
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from psoft_deploy.testing import build_tokenizer, bundled_text

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                     intermediate_size=INTERMEDIATE, vocab_size=VOCAB, pad_token_id=3,
                                     tie_word_embeddings=False)).save_pretrained(work / "base")
        build_tokenizer(work / "base", bundled_text(), vocab_size=VOCAB)
        text = " ".join(bundled_text())
        (work / "data.txt").write_text("\n".join(text[i:i + 400] for i in range(0, len(text) - 400, 40)) + "\n")
        runs: dict[str, list[dict]] = {"peft": [], "ours": []}
        for side in ("peft", "ours", "ours", "peft") * args.rounds:  # ABBA: run order alone shifts times here
            process = subprocess.run([sys.executable, __file__, "--side", side, "--work", str(work), "--steps",
                                      str(args.steps)], capture_output=True, text=True)
            if process.returncode != 0:
                raise SystemExit(process.stderr[-4000:])
            line = next(l for l in process.stdout.splitlines() if l.startswith("RESULT "))
            runs[side].append(json.loads(line.removeprefix("RESULT ")))
    # Each ABBA block gives one paired ratio, its two sides run back to back under the same conditions.
    paired = [statistics.mean(r["seconds_per_step"] for r in runs["ours"][2 * i:2 * i + 2])
              / statistics.mean(r["seconds_per_step"] for r in runs["peft"][2 * i:2 * i + 2])
              for i in range(args.rounds)]
    print(f"Llama {HIDDEN}×{LAYERS} (~100M), PSOFT r=32 on q_proj, v_proj, batch 4×128 tokens, {args.steps} steps, "
          f"fp32, torch threads={torch.get_num_threads()}, {2 * args.rounds} runs per side (ABBA)")
    for label, side in (("PEFT + SFTTrainer (anchor)", runs["peft"]), ("psoft-deploy train", runs["ours"])):
        times = sorted(r["seconds_per_step"] for r in side)
        print(f"  {label:<27} {statistics.median(times):6.3f} s/step (median run; runs {times[0]:.3f}–{times[-1]:.3f})"
              f"   peak RSS {max(r['peak_rss'] for r in side) / 2**30:5.2f} GiB   final loss {side[0]['final_loss']:.4f}")
    print(f"  ratio psoft-deploy / PEFT: {statistics.median(paired):.3f}x time per step (median of {args.rounds} ABBA "
          f"blocks: {', '.join(f'{r:.3f}' for r in paired)}), "
          f"{max(r['peak_rss'] for r in runs['ours']) / max(r['peak_rss'] for r in runs['peft']):.2f}x peak RSS")
    layer = compare_one_layer()
    print(f"one adapted q_proj ({HIDDEN}×{HIDDEN}, r=32), forward+backward on 4×128 tokens, median of 30 alternating:")
    for label, side in (("PEFT PSOFT layer (anchor)", layer["peft"]), ("psoft-deploy PsoftLinear", layer["ours"])):
        print(f"  {label:<27} {side['seconds'] * 1e3:6.2f} ms   kept for backward {side['saved_bytes'] / 2**20:6.3f} MiB")
    print(f"  ratio psoft-deploy / PEFT: {layer['ours']['seconds'] / layer['peft']['seconds']:.3f}x time, "
          f"{layer['ours']['saved_bytes'] / layer['peft']['saved_bytes']:.3f}x memory kept for backward")


if __name__ == "__main__":
    main()

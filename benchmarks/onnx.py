"""export-onnx through onnxruntime-genai at real LLM shapes, one run.

A Llama with random bf16 weights (TinyLlama's 1.1B shape by default; ``--shape llama-3.2-3b``:
hidden 3072, 28 layers, 24 heads, 8 KV heads, vocab 128256; ``--shape llama-0.55b``: hidden 1536, 18
layers, just above verify's full-mode limit, so the same layerwise checks in a few minutes) and a
PEFT PSOFT adapter (r = 32 on q_proj, v_proj, down_proj), materialized once. For each precision, in its own process with the
peaks of its whole process tree's RSS and anonymous RSS sampled (memory-mapped weights are file pages
the kernel can drop and read back; anonymous memory it cannot): `psoft-deploy export-onnx` with the adapter, and, as
the anchor, onnxruntime-genai's model builder on the base alone. Then prefill (128 tokens) and
decode ms/token of the exports through og.Generator against PyTorch eager fp32; each export's own
verification (auto: layerwise at these sizes) and `psoft-deploy verify` of the int4 export in full
mode (float64 logits).

    python benchmarks/onnx.py [--shape tinyllama-1.1b] [--precisions fp32,int4] [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named onnx.py: keep its folder off the import path so that `import onnx` finds
# the onnx package, not this script.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

SHAPES = {
    # just above verify's 0.5B full-mode limit: auto runs the layerwise checks, in minutes on 2 cores
    "llama-0.55b": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 18,
                    "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000},
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "llama-3.2-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256},
}
TARGETS, RANK, PROMPT, NEW_TOKENS = ["q_proj", "v_proj", "down_proj"], 32, 128, 32


def anonymous_bytes(process: psutil.Process) -> int:
    """``process``'s anonymous resident memory (RssAnon): what the kernel cannot drop and read back, unlike
    the file pages of memory-mapped weights."""
    with open(f"/proc/{process.pid}/status") as status:
        return next((int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:")), 0)  # 0: exited


def run_measured(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds and the peaks of the summed RSS and of the summed anonymous RSS of ``command``'s
    process tree (sampled every 50 ms)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the child
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
        root, peak, anonymous_peak = psutil.Process(process.pid), 0, 0
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                anonymous_peak = max(anonymous_peak, sum(anonymous_bytes(p) for p in tree))
            except (psutil.Error, OSError):
                pass
            time.sleep(0.05)
        if process.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(command[:4])} … failed:\n{log.read()[-3000:]}")
    return time.perf_counter() - start, peak, anonymous_peak


CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


def run_limited(command: list[str], limit: int) -> tuple[float, int, int] | str:
    """Run ``command`` in a memory cgroup (v1) limited to ``limit`` bytes, which the kernel enforces on
    anonymous memory and page cache together (it reclaims clean file pages to stay under it): wall
    seconds, exit status and the group's peak charge; or why it cannot run here."""
    group = CGROUP_V1_MEMORY / f"psoft-bench-{time.time_ns()}"
    try:
        group.mkdir()
    except OSError as error:
        return f"not run: no writable memory cgroup here ({error.strerror})"
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        start = time.perf_counter()
        process = subprocess.run(command, capture_output=True, text=True, check=False,
                                 preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        return time.perf_counter() - start, process.returncode, peak
    finally:
        group.rmdir()


def build_base(directory: Path, shape: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from psoft_deploy.testing import build_tokenizer, bundled_text

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never hold the model in fp32
    try:
        model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                                             bos_token_id=1, eos_token_id=2))
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory)
    del model
    build_tokenizer(directory, bundled_text(), vocab_size=2000)


def og_timings(export_dir: Path, repeats: int) -> tuple[float, float]:
    """Median prefill seconds (PROMPT tokens) and decode seconds per token through og.Generator."""
    from psoft_deploy.converters.genai_runtime import GenaiModel

    model = GenaiModel(export_dir)
    tokens = np.random.default_rng(0).integers(4, 2000, PROMPT).tolist()
    prefill, decode = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        generator = model.generator(tokens, max_new_tokens=NEW_TOKENS + 1)
        prefill.append(time.perf_counter() - start)
        steps = []
        for _ in range(NEW_TOKENS):
            start = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - start)
        decode.append(statistics.median(steps))
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def eager_timings(base_dir: Path, repeats: int) -> tuple[float, float]:
    """The same for PyTorch eager in fp32 (the base's weights: a merged adapter costs the same)."""
    from psoft_deploy.core.model import load_base_model

    model = load_base_model(base_dir, torch.float32)
    ids = torch.randint(4, 2000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    prefill, decode = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            prefill.append(time.perf_counter() - start)
            cache, token, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
            for _ in range(NEW_TOKENS):
                start = time.perf_counter()
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                steps.append(time.perf_counter() - start)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode.append(statistics.median(steps))
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--precisions", default="fp32,int4", help="comma-separated: fp32, fp16, int4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-timings", action="store_true", help="exports (and their memory) only")
    parser.add_argument("--no-full-verify", action="store_true", help="skip verify --verify-mode full of the int4 export")
    parser.add_argument("--limit-ratio", type=float, default=1.25,
                        help="then run the export again under a memory cgroup of this × the builder's peak RSS")
    parser.add_argument("--models", type=Path, help="keep the base and the materialized adapter here, and reuse them "
                        "in a later run (default: a temporary directory)")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    shape = SHAPES[args.shape]

    from psoft_deploy.converters.pipeline import read_report
    from psoft_deploy.converters.verify import Report
    from psoft_deploy.testing import llama_modules, write_psoft_adapter

    with tempfile.TemporaryDirectory(dir=".") as scratch:
        work = Path(scratch)
        models = args.models or work
        materialize = "reused"
        if not (models / "adapter").is_dir():
            build_base(models / "base", shape)
            write_psoft_adapter(models / "peft-adapter", llama_modules(shape["num_hidden_layers"], TARGETS), RANK,
                                std=0.1, base=models / "base")
            # PEFT saves R only: its A and B come from an SVD of every adapted weight. Materialize once
            # (as a deployment does), so that no export below repeats those SVDs.
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "psoft_deploy", "materialize", "--base", str(models / "base"),
                            "--adapter", str(models / "peft-adapter"), "--output", str(models / "adapter")],
                           check=True, capture_output=True)
            materialize = f"{time.perf_counter() - start:.0f} s"
        lines = [f"{args.shape} (random bf16 weights), PSOFT r={RANK} on {', '.join(TARGETS)}, "
                 f"CPU threads={psutil.cpu_count()}; materialize (SVDs of the adapted weights, once): {materialize}"]
        exports, verdicts = {}, {}
        for precision in precisions:
            anchor_s, anchor_rss, anchor_anon = run_measured(
                [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(models / "base"),
                 "-o", str(work / f"builder-{precision}"), "-p", precision, "-e", "cpu", "-c", str(work / "cache")])
            ours_s, ours_rss, ours_anon = run_measured(
                [sys.executable, "-m", "psoft_deploy", "export-onnx", "--base", str(models / "base"), "--adapter",
                 str(models / "adapter"), "--output", str(work / f"ours-{precision}"), "--precision", precision])
            exports[precision] = work / f"ours-{precision}"
            verdicts[precision] = Report.from_dict(read_report(exports[precision])["checks"][0]).line()
            lines.append(f"  export {precision}: psoft-deploy (adapter, verify auto) {ours_s:6.1f} s, peak RSS "
                         f"{ours_rss / 2**30:5.2f} GiB (anonymous {ours_anon / 2**30:5.2f}) | builder, base alone "
                         f"{anchor_s:6.1f} s, {anchor_rss / 2**30:5.2f} GiB (anonymous {anchor_anon / 2**30:5.2f}) "
                         f"-> {ours_rss / anchor_rss:.2f}x RSS, {ours_anon / anchor_anon:.2f}x anonymous, "
                         f"{ours_s / anchor_s:.2f}x time")
            subprocess.run(["rm", "-rf", str(work / f"builder-{precision}"), str(work / "cache")], check=True)
            print(lines[-1], flush=True)
            limit = int(args.limit_ratio * anchor_rss)
            limited = run_limited(
                [sys.executable, "-m", "psoft_deploy", "export-onnx", "--base", str(models / "base"), "--adapter",
                 str(models / "adapter"), "--output", str(work / f"limited-{precision}"), "--precision", precision],
                limit)
            if isinstance(limited, str):
                lines.append(f"  export {precision} under a memory limit: {limited}")
            else:
                seconds, status, charged = limited
                outcome = (f"completed, {Report.from_dict(read_report(work / f'limited-{precision}')['checks'][0]).line()}"
                           if status == 0 else f"failed (exit status {status})")
                lines.append(f"  export {precision} again in a memory cgroup limited to {args.limit_ratio:g}x the "
                             f"builder's peak RSS ({limit / 2**30:.2f} GiB, page cache included): {outcome}; "
                             f"{seconds:.1f} s, peak charge {charged / 2**30:.2f} GiB")
            print(lines[-1], flush=True)
        if not args.no_timings:
            eager_prefill, eager_decode = eager_timings(models / "base", args.repeats)
            lines.append(f"  PyTorch eager fp32: prefill {PROMPT} tokens {eager_prefill * 1e3:8.1f} ms, decode "
                         f"{eager_decode * 1e3:6.1f} ms/token")
            for precision, directory in exports.items():
                prefill, decode = og_timings(directory, args.repeats)
                lines.append(f"  og.Generator {precision:>4}: prefill {PROMPT} tokens {prefill * 1e3:8.1f} ms "
                             f"({prefill / eager_prefill:.2f}x eager), decode {decode * 1e3:6.1f} ms/token "
                             f"({decode / eager_decode:.2f}x eager)")
                print(lines[-1], flush=True)
        lines += [f"  export-onnx's own verification, {precision}: {verdict}" for precision, verdict in verdicts.items()]
        if "int4" in exports and not args.no_full_verify:
            verdict = subprocess.run(
                [sys.executable, "-m", "psoft_deploy", "verify", "--base", str(models / "base"), "--adapter",
                 str(models / "adapter"), "--candidate", str(exports["int4"]), "--verify-mode", "full"],
                capture_output=True, text=True, check=False)
            lines.append(f"  verify int4 (full): {verdict.stdout.strip() or verdict.stderr.strip()[-600:]}")
        print("\n".join(lines))


if __name__ == "__main__":
    main()

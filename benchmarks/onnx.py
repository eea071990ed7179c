"""onnxruntime vs PyTorch eager on an exported merged model, one run.

An OPT-125m-shaped model (768 wide, 12 layers, vocab 50272, random weights, fp32) with a PSOFT
adapter (r = 32 on q_proj and v_proj) is exported with ``psoft-deploy export-onnx --with-past``
in its own process (export time and peak RSS measured there). Then, in this process, the
median latency of onnxruntime and of the merged model in PyTorch eager for a 1×128 and a 4×128
prompt, and per-token decode with past key-values.

    python benchmarks/onnx.py [--repeats 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named onnx.py, as the issue asks: keep its folder off the import path so that
# `import onnx` finds the onnx package, not this script.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HIDDEN, LAYERS, HEADS, FFN, VOCAB = 768, 12, 12, 3072, 50272


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def export_step(work: Path) -> None:
    start = time.perf_counter()
    from psoft_deploy.cli import cli

    cli.main(["export-onnx", "--base", str(work / "base"), "--adapter", str(work / "adapter"), "--output",
              str(work / "onnx"), "--with-past"], standalone_mode=False)
    seconds = time.perf_counter() - start
    peak = next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith("VmHWM:"))
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--export-step", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_step:
        return export_step(args.export_step)

    from transformers import OPTConfig, OPTForCausalLM

    from psoft_deploy.generate import OnnxModel
    from psoft_deploy.model import load_base_model
    from psoft_deploy.tiny import write_psoft_adapter

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        torch.manual_seed(0)
        OPTForCausalLM(OPTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
                                 vocab_size=VOCAB, word_embed_proj_dim=HIDDEN)).save_pretrained(work / "base")
        modules = [f"model.decoder.layers.{i}.self_attn.{t}" for i in range(LAYERS) for t in ("q_proj", "v_proj")]
        write_psoft_adapter(work / "adapter", modules, 32)
        process = subprocess.run([sys.executable, __file__, "--export-step", str(work)], capture_output=True, text=True)
        if process.returncode != 0:
            raise SystemExit(process.stderr[-4000:])
        export = json.loads(next(l for l in process.stdout.splitlines() if l.startswith("RESULT ")).split(" ", 1)[1])

        from psoft_deploy.cli import cli

        cli.main(["merge", "--base", str(work / "base"), "--adapter", str(work / "adapter"), "--output",
                  str(work / "merged"), "--no-verify"], standalone_mode=False)
        eager = load_base_model(work / "merged")
        onnx = OnnxModel(work / "onnx")
        rows = []
        for batch in (1, 4):
            ids = torch.randint(4, VOCAB, (batch, 128), generator=torch.Generator().manual_seed(batch))
            mask = torch.ones_like(ids)
            feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                     "position_ids": np.broadcast_to(np.arange(128), (batch, 128)).copy(), **onnx.empty_past(batch)}
            with torch.no_grad():
                torch_s = median_seconds(lambda: eager(input_ids=ids, attention_mask=mask), args.repeats)
            ort_s = median_seconds(lambda: onnx.run(["logits"], feeds), args.repeats)
            rows.append((f"prompt {batch}×128", torch_s, ort_s))

        ids = torch.randint(4, VOCAB, (1, 128), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            prefill = eager(input_ids=ids, use_cache=True)
            next_id = prefill.logits[:, -1:].argmax(-1)
            decode_mask = torch.ones(1, 129, dtype=torch.int64)
            torch_s = median_seconds(lambda: eager(input_ids=next_id, attention_mask=decode_mask, use_cache=True,
                                                   past_key_values=_copy_cache(prefill.past_key_values)),
                                     args.repeats)
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 128), dtype=np.int64),
                 "position_ids": np.arange(128)[None, :], **onnx.empty_past(1)}
        outputs = onnx.run(["logits", *onnx.present_names], feeds)
        step = {"input_ids": np.array([[int(outputs[0][0, -1].argmax())]]), "attention_mask": np.ones((1, 129),
                dtype=np.int64), "position_ids": np.array([[128]]), **dict(zip(onnx.past_names, outputs[1:]))}
        ort_s = median_seconds(lambda: onnx.run(["logits", *onnx.present_names], step), args.repeats)
        rows.append(("decode 1 token, past 128", torch_s, ort_s))

    print(f"OPT-125m shape ({HIDDEN}×{LAYERS}, vocab {VOCAB}), merged PSOFT r=32 on q_proj, v_proj, fp32, "
          f"torch threads={torch.get_num_threads()}, median of {args.repeats}")
    print(f"  export-onnx --with-past (merge + export + verify): {export['seconds']:.1f} s, "
          f"peak RSS {export['peak_rss'] / 2**30:.2f} GiB")
    for label, torch_s, ort_s in rows:
        print(f"  {label:<26} PyTorch eager {torch_s * 1e3:8.1f} ms   onnxruntime {ort_s * 1e3:8.1f} ms   "
              f"-> {ort_s / torch_s:.2f}x eager latency")


def _copy_cache(cache):
    """A fresh DynamicCache with the same contents (a decode step appends to the one it gets; the
    copy, ~2 MB here, is timed with the eager decode step)."""
    from transformers import DynamicCache

    copy = DynamicCache()
    for index, layer in enumerate(cache.layers):
        copy.update(layer.keys.clone(), layer.values.clone(), index)
    return copy


if __name__ == "__main__":
    main()

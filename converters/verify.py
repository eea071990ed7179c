"""`psoft-deploy verify`: compare a converted artifact (merged model, LoRA adapter) with the
reference PSOFT forward.

The reference is the base with the adapter applied through `PsoftLinear` (for PEFT
adapters this equals PEFT's own forward; the tests pin it). Two modes:

* ``full``: both models run the verification prompts; max and mean |Δlogits|, top-1
  agreement and KL divergence are checked against per-dtype tolerances.
* ``layerwise``: for a model too large to hold twice, each merged weight is checked
  against ``W + ΔW`` on random inputs while streaming, and every other tensor against
  the base (or the adapter's ``modules_to_save``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from psoft_deploy.base import BaseCheckpoint, open_safetensors
from psoft_deploy.converters.lora import read_export_metadata
from psoft_deploy.errors import UserError
from psoft_deploy.factors import AdapterFactors, base_tensor_key
from psoft_deploy.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_json
from psoft_deploy.model import load_base_model, reference_model
from psoft_deploy.streaming import torch_dtype

DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning the river carried water from the hills",
    "def fibonacci(n):\n    return n if n < 2 else",
    "Question: what is the capital of France? Answer:",
]
FULL_MODE_MAX_BYTES = 2 * 2**30  # auto mode: larger models are verified layer by layer


# fp32: the merged model must equal the reference forward.
FP32_MAX_ABS_LOGITS = 1e-4
# Half precision: the candidate may differ from the fp32 reference by at most this many times
# the dtype's own effect (the unmerged adapter run in that dtype vs fp32, measured in the same
# run), and must agree on the top-1 token wherever that effect cannot flip it.
HALF_NOISE_FACTOR = 4.0
DECISIVE_MARGIN_FACTOR = 2.0
# Truncated LoRA exports: measured vs recorded optimal rank-k error, per layer.
TRUNCATION_GAP = 1e-4
# Layerwise mode: ‖W'x − (W + ΔW)x‖ / ‖(W + ΔW)x‖ on random x, per candidate dtype.
LAYER_RELATIVE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def verification_inputs(model_dirs: list[Path], prompts: list[str] | None, vocab_size: int) -> dict:
    """Tokenized prompts (tokenizer of the first directory that has one), else fixed token ids."""
    for directory in model_dirs:
        if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            return dict(tokenizer(prompts or DEFAULT_PROMPTS, padding=True, return_tensors="pt"))
    if prompts:
        raise UserError("--prompts needs a tokenizer in the base or candidate directory")
    ids = torch.randint(0, vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def real_positions(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits as (positions, classes) in float32, padding dropped."""
    if logits.dim() == 3 and mask is not None:
        logits = logits[mask.bool()]
    return logits.float().reshape(-1, logits.shape[-1])


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """max/mean |Δ|, top-1 agreement and mean KL(reference ‖ candidate) of (positions, classes) logits."""
    diff = (reference - candidate).abs()
    kl = F.kl_div(F.log_softmax(candidate, -1), F.log_softmax(reference, -1), log_target=True, reduction="batchmean")
    return {
        "max_abs_logits": diff.max().item(),
        "mean_abs_logits": diff.mean().item(),
        "top1_agreement": (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item(),
        "kl_divergence": kl.item(),
        "positions": reference.shape[0],
    }


def candidate_dtype(candidate: BaseCheckpoint, factors: AdapterFactors) -> torch.dtype:
    """The dtype the candidate stores its adapted weights in."""
    first = base_tensor_key(next(iter(factors.modules)))
    return candidate.tensor(first).dtype


def verify_full(
    base: BaseCheckpoint, factors: AdapterFactors | None, candidate_dir: Path, prompts=None, *, kind: str = "merged",
    adapter_file: Path | None = None,
) -> dict:
    """Run the fp32 reference and the candidate on the verification prompts.

    ``kind`` is ``merged`` (a model directory, run by transformers), ``lora`` (an adapter loaded
    onto the base by PEFT's own LoRA code, independent of ours) or ``onnx`` (an exported graph,
    run by onnxruntime, with ``adapter_file`` active when given). fp32 candidates must match
    within max |Δlogits| ≤ 1e-4 with 100 % top-1 agreement. A half-precision candidate is
    held to the dtype's own effect: the reference is also run in the candidate's dtype (the
    adapter unmerged, as PEFT would run it), and the candidate may deviate from fp32 by at
    most 4× that, with 100 % top-1 agreement at every position whose fp32 top-1 margin
    exceeds 2× that."""
    if kind == "lora":
        dtype = lora_dtype(candidate_dir)
    elif kind == "onnx":
        dtype = onnx_dtype(candidate_dir)
    else:
        dtype = candidate_dtype(BaseCheckpoint(str(candidate_dir)), factors)
    reference = reference_model(base.path, factors, torch.float32)
    inputs = verification_inputs([candidate_dir, base.path], prompts, reference.config.vocab_size)
    mask = inputs.get("attention_mask")

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return real_positions(model(**inputs).logits, mask)

    truth = logits(reference)
    del reference
    if kind == "onnx":
        from psoft_deploy.converters.onnx import onnx_logits

        raw = onnx_logits(candidate_dir, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), adapter_file)
        actual = real_positions(torch.from_numpy(raw), mask)
    elif kind == "lora":
        actual = logits(load_lora_candidate(base.path, candidate_dir, dtype))
    else:
        actual = logits(load_base_model(candidate_dir, dtype))
    metrics = compare_logits(truth, actual)
    if dtype == torch.float32:
        tolerance = f"max |Δlogits| ≤ {FP32_MAX_ABS_LOGITS:g}, top-1 agreement 100%"
        passed = metrics["max_abs_logits"] <= FP32_MAX_ABS_LOGITS and metrics["top1_agreement"] == 1.0
        return _report("full", dtype, tolerance, passed, metrics)
    noise = compare_logits(truth, logits(reference_model(base.path, factors, dtype)))["max_abs_logits"]
    top2 = truth.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > DECISIVE_MARGIN_FACTOR * noise
    agree = truth.argmax(-1) == actual.argmax(-1)
    metrics |= {
        "dtype_noise": noise,
        "decisive_positions": int(decisive.sum()),
        "decisive_top1_agreement": agree[decisive].float().mean().item() if decisive.any() else 1.0,
    }
    tolerance = (f"max |Δlogits| ≤ {HALF_NOISE_FACTOR:g} × {noise:.2e} (the unmerged adapter in "
                 f"{str(dtype).removeprefix('torch.')} vs fp32), top-1 agreement 100% where the fp32 margin "
                 f"> {DECISIVE_MARGIN_FACTOR:g} × that")
    passed = (metrics["max_abs_logits"] <= HALF_NOISE_FACTOR * noise + 1e-6
              and metrics["decisive_top1_agreement"] == 1.0)
    return _report("full", dtype, tolerance, passed, metrics)


def lora_dtype(candidate_dir: Path) -> torch.dtype:
    """The dtype of a LoRA adapter's weights."""
    with open_safetensors(candidate_dir / ADAPTER_WEIGHTS) as handle:
        return torch_dtype(handle.get_slice(next(iter(handle.keys()))).get_dtype())


def onnx_dtype(candidate_dir: Path) -> torch.dtype:
    """The floating dtype of an exported graph's logits."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(candidate_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = next(output for output in session.get_outputs() if output.name == "logits")
    return {"tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16}.get(logits.type, torch.float32)


def load_lora_candidate(base_dir: Path, candidate_dir: Path, dtype: torch.dtype):
    """The base in ``dtype`` with a LoRA adapter, loaded by PEFT's own LoRA code."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base_model(base_dir, dtype), candidate_dir).eval()


def verify_truncated_lora(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path) -> dict:
    """A rank-truncated LoRA export is approximate by design: check that each layer PEFT loads
    is as far from the exact ΔW as the export recorded (the optimal rank-k error), no further."""
    recorded = read_export_metadata(candidate_dir)["modules"]
    model = load_lora_candidate(base.path, candidate_dir, torch.float32)
    worst_gap, worst_layer, errors = 0.0, None, {}
    for name, exact in factors.modules.items():
        layer = model.base_model.model.get_submodule(name)
        delta = exact.delta_weight()
        error = (torch.linalg.norm(layer.get_delta_weight("default") - delta) / torch.linalg.norm(delta)).item()
        errors[name] = error
        gap = abs(error - recorded[name]["relative_error"])
        if gap >= worst_gap:
            worst_gap, worst_layer = gap, name
    metrics = {
        "max_layer_relative_error": max(errors.values()),
        "max_gap_to_recorded_error": worst_gap,
        "worst_layer": worst_layer,
        "layers_checked": len(errors),
    }
    tolerance = f"each layer's relative error within {TRUNCATION_GAP:g} of the optimal rank-k error recorded at export"
    return _report("truncated-lora", torch.float32, tolerance, worst_gap <= TRUNCATION_GAP, metrics)


def verify_layerwise(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path) -> dict:
    """Check every candidate tensor while streaming: adapted weights on random inputs, the rest exactly."""
    candidate = BaseCheckpoint(str(candidate_dir))
    dtype = candidate_dtype(candidate, factors)
    bound = LAYER_RELATIVE.get(dtype, LAYER_RELATIVE[torch.float32])
    deltas = {base_tensor_key(name): module for name, module in factors.modules.items()}
    generator = torch.Generator().manual_seed(0)
    worst, worst_key, mismatched = 0.0, None, []
    missing = sorted(set(base.files) - set(candidate.files))
    for key in candidate.files:
        actual = candidate.tensor(key)
        if key in deltas:
            expected = base.tensor(key).float() + deltas[key].delta_weight().float()
            probe = torch.randn(expected.shape[1], 8, generator=generator)
            reference_out = expected @ probe
            error = (torch.linalg.norm(actual.float() @ probe - reference_out) / torch.linalg.norm(reference_out)).item()
            if error > worst:
                worst, worst_key = error, key
        else:
            source = factors.replaced_tensors[key] if key in factors.replaced_tensors else base.tensor(key)
            if not torch.equal(actual, source.to(actual.dtype)):
                mismatched.append(key)
    metrics = {
        "max_layer_relative_error": worst,
        "worst_layer": worst_key,
        "layers_checked": len(deltas),
        "tensors_differing_from_base": mismatched[:10],
        "tensors_missing": missing[:10],
    }
    passed = worst <= bound and not mismatched and not missing
    tolerance = f"relative error ≤ {bound:g} per adapted layer, every other tensor exactly the base's"
    return _report("layerwise", dtype, tolerance, passed, metrics)


def verify_candidate(
    base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path, *, mode: str = "auto", prompts=None
) -> dict:
    """Verify a merged model directory (``mode``: full, layerwise, or auto by size), a LoRA
    adapter directory (export-lora's or any PEFT LoRA), an exported ONNX directory, or an
    ``.onnx_adapter`` file (run on the graph beside it)."""
    candidate_dir = Path(candidate_dir)
    if candidate_dir.suffix == ".onnx_adapter":
        graph_dir = next((d for d in (candidate_dir.parent, candidate_dir.parent.parent) if (d / "model.onnx").is_file()),
                         None)
        if graph_dir is None:
            raise UserError(f"found no model.onnx next to {candidate_dir} or one directory up")
        return verify_full(base, factors, graph_dir, prompts, kind="onnx", adapter_file=candidate_dir)
    if (candidate_dir / ADAPTER_CONFIG).is_file():
        config = read_json(candidate_dir / ADAPTER_CONFIG)
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise UserError(f"candidate {candidate_dir} is a {config.get('peft_type')} adapter; verify checks "
                            "conversions (a merged model or a LoRA adapter)")
        if read_export_metadata(candidate_dir).get("exact") is False:
            return verify_truncated_lora(base, factors, candidate_dir)
        return verify_full(base, factors, candidate_dir, prompts, kind="lora")
    if (candidate_dir / "model.onnx").is_file():
        return verify_full(base, factors, candidate_dir, prompts, kind="onnx")
    if not (candidate_dir / "config.json").is_file():
        raise UserError(f"candidate {candidate_dir} is not a model directory (config.json), a LoRA adapter "
                        f"({ADAPTER_CONFIG}) or an ONNX export (model.onnx)")
    if mode == "auto":
        size = sum(file.stat().st_size for file in set(BaseCheckpoint(str(candidate_dir)).files.values()))
        mode = "full" if size <= FULL_MODE_MAX_BYTES else "layerwise"
    if mode == "full":
        return verify_full(base, factors, candidate_dir, prompts)
    return verify_layerwise(base, factors, candidate_dir)


def _report(mode: str, dtype: torch.dtype, tolerance: str, passed: bool, metrics: dict) -> dict:
    return {
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        "tolerance": tolerance,
        "passed": passed,
        **metrics,
    }


def format_verification(report: dict) -> str:
    """One line: PASS/FAIL, the key numbers, and the tolerance they were held to."""
    if report["mode"] == "truncated-lora":
        numbers = (f"max layer relative error {report['max_layer_relative_error']:.2e} (optimal rank-k), "
                   f"largest gap to the recorded error {report['max_gap_to_recorded_error']:.1e} over "
                   f"{report['layers_checked']} layers")
    elif report["mode"] == "full":
        numbers = (f"max |Δlogits| {report['max_abs_logits']:.2e}, mean {report['mean_abs_logits']:.2e}, "
                   f"top-1 {report['top1_agreement']:.1%}, KL {report['kl_divergence']:.2e} "
                   f"over {report['positions']} positions")
        if "decisive_positions" in report:
            numbers += (f", top-1 {report['decisive_top1_agreement']:.1%} on the {report['decisive_positions']} "
                        "decisive ones")
    else:
        numbers = (f"max layer relative error {report['max_layer_relative_error']:.2e} over "
                   f"{report['layers_checked']} layers, {len(report['tensors_differing_from_base'])} other tensors "
                   f"differing, {len(report['tensors_missing'])} missing")
    verdict = "PASS" if report["passed"] else "FAIL"
    return f"{verdict} ({report['mode']}, {report['dtype']}): {numbers}; tolerance: {report['tolerance']}"


def record_verification(staging: Path, artifact: str, report: dict) -> str:
    """Save ``report`` beside the artifact being written; unless it passed, fail so that nothing
    is written. Returns the one-line verdict."""
    line = format_verification(report)
    (staging / "psoft_verification.json").write_text(json.dumps(report, indent=2) + "\n")
    if not report["passed"]:
        raise UserError(f"the {artifact} failed verification, nothing written: {line}")
    return line

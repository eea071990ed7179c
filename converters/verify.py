"""`psoft-deploy verify`: compare a converted artifact with the reference PSOFT forward.

The reference is the base with the adapter applied through `PsoftLinear` (for PEFT
adapters this equals PEFT's own forward; the tests pin it). Two modes:

* ``full``: both models run the verification prompts; max and mean |Δlogits|, top-1
  agreement and KL divergence are checked against per-dtype tolerances.
* ``layerwise``: for a model too large to hold twice, each merged weight is checked
  against ``W + ΔW`` on random inputs while streaming, and every other tensor against
  the base (or the adapter's ``modules_to_save``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from psoft_deploy.base import BaseCheckpoint
from psoft_deploy.errors import UserError
from psoft_deploy.factors import AdapterFactors, base_tensor_key
from psoft_deploy.model import load_base_model, reference_model

DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning the river carried water from the hills",
    "def fibonacci(n):\n    return n if n < 2 else",
    "Question: what is the capital of France? Answer:",
]
FULL_MODE_MAX_BYTES = 2 * 2**30  # auto mode: larger models are verified layer by layer


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria for one candidate dtype (printed with every report)."""

    max_abs_logits: float | None  # full mode: max |Δlogits|
    min_top1: float  # full mode: fraction of positions whose argmax agrees
    layer_relative: float  # layerwise mode: ‖W'x − (W + ΔW)x‖ / ‖(W + ΔW)x‖

    def describe(self) -> str:
        bound = f"max |Δlogits| ≤ {self.max_abs_logits:g}, " if self.max_abs_logits is not None else ""
        return f"{bound}top-1 agreement ≥ {self.min_top1:.0%}; layerwise relative error ≤ {self.layer_relative:g}"


TOLERANCES = {
    torch.float32: Tolerance(max_abs_logits=1e-4, min_top1=1.0, layer_relative=1e-5),
    torch.bfloat16: Tolerance(max_abs_logits=None, min_top1=1.0, layer_relative=1e-2),
    torch.float16: Tolerance(max_abs_logits=None, min_top1=1.0, layer_relative=2e-3),
}


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


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor | None) -> dict:
    """max/mean |Δ|, top-1 agreement and mean KL(reference ‖ candidate) over the real positions."""
    reference, candidate = reference.float(), candidate.float()
    if reference.dim() == 3 and mask is not None:  # (batch, sequence, vocab): drop padding
        keep = mask.bool()
        reference, candidate = reference[keep], candidate[keep]
    reference = reference.reshape(-1, reference.shape[-1])
    candidate = candidate.reshape(-1, candidate.shape[-1])
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


def verify_full(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path, prompts=None) -> dict:
    """Run the reference and the candidate (a merged model directory) on the verification prompts.

    The reference runs in the candidate's dtype (a bf16 merge is compared with the bf16 base
    plus the PSOFT adapter, as PEFT would run it), with the adapter path in float32."""
    candidate = BaseCheckpoint(str(candidate_dir))
    dtype = candidate_dtype(candidate, factors)
    tolerance = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    reference = reference_model(base.path, factors, dtype)
    candidate_model = load_base_model(candidate_dir, dtype)
    inputs = verification_inputs([candidate_dir, base.path], prompts, reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = candidate_model(**inputs).logits
    metrics = compare_logits(expected, actual, inputs.get("attention_mask"))
    passed = metrics["top1_agreement"] >= tolerance.min_top1 and (
        tolerance.max_abs_logits is None or metrics["max_abs_logits"] <= tolerance.max_abs_logits
    )
    return _report("full", dtype, tolerance, passed, metrics)


def verify_layerwise(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path) -> dict:
    """Check every candidate tensor while streaming: adapted weights on random inputs, the rest exactly."""
    candidate = BaseCheckpoint(str(candidate_dir))
    dtype = candidate_dtype(candidate, factors)
    tolerance = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
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
    passed = worst <= tolerance.layer_relative and not mismatched and not missing
    return _report("layerwise", dtype, tolerance, passed, metrics)


def verify_candidate(
    base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path, *, mode: str = "auto", prompts=None
) -> dict:
    """Verify a merged model directory; ``mode`` is full, layerwise, or auto (by model size)."""
    candidate_dir = Path(candidate_dir)
    if not (candidate_dir / "config.json").is_file():
        raise UserError(f"candidate {candidate_dir} is not a model directory (no config.json)")
    if mode == "auto":
        size = sum(file.stat().st_size for file in set(BaseCheckpoint(str(candidate_dir)).files.values()))
        mode = "full" if size <= FULL_MODE_MAX_BYTES else "layerwise"
    if mode == "full":
        return verify_full(base, factors, candidate_dir, prompts)
    return verify_layerwise(base, factors, candidate_dir)


def _report(mode: str, dtype: torch.dtype, tolerance: Tolerance, passed: bool, metrics: dict) -> dict:
    return {
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        "tolerance": tolerance.describe(),
        "passed": passed,
        **metrics,
    }


def format_verification(report: dict) -> str:
    """One line: PASS/FAIL, the key numbers, and the tolerance they were held to."""
    if report["mode"] == "full":
        numbers = (f"max |Δlogits| {report['max_abs_logits']:.2e}, mean {report['mean_abs_logits']:.2e}, "
                   f"top-1 {report['top1_agreement']:.1%}, KL {report['kl_divergence']:.2e} "
                   f"over {report['positions']} positions")
    else:
        numbers = (f"max layer relative error {report['max_layer_relative_error']:.2e} over "
                   f"{report['layers_checked']} layers, {len(report['tensors_differing_from_base'])} other tensors "
                   f"differing, {len(report['tensors_missing'])} missing")
    verdict = "PASS" if report["passed"] else "FAIL"
    return f"{verdict} ({report['mode']}, {report['dtype']}): {numbers}; tolerance: {report['tolerance']}"

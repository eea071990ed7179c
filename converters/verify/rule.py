"""The rule every verdict follows: a candidate may deviate from the float64 truth by multiples of
the noise measured in the same run (its precision's own effect plus the rounding of the converted
weights), must agree on top-1 where that noise cannot close the margin, and the bare base must
fail the same bounds (else the check cannot tell the adapter apart: inconclusive). Lossy exports
(fp16, int4) are also judged by what a user sees: top-1 decisions and greedy continuations."""

from __future__ import annotations

import torch

from psoft_deploy.core.architectures import FAMILIES, Family

from .report import Report
from .tolerances import (
    BEHAVIOUR_LOSS,
    BEHAVIOUR_SLACK,
    DECISIVE_MARGIN,
    GENERATED_TOKENS,
    MAX_LOGIT_NOISE,
    MEAN_LOGIT_NOISE,
    ROUNDING_NOISE,
    STABLE_AVERAGE_VALUES,
)

# Top-1 agreement is judged where the truth's margin is decisive (`DECISIVE_MARGIN`), if there are this many.
MIN_DECISIVE_POSITIONS = 8
# Lossy exports (fp16, int4) are also judged by what a user sees (`judge_behaviour`): top-1 decisions
# and greedy continuations of GENERATED_TOKENS tokens per prompt.
LOSSY_PRECISIONS = ("fp16", "int4")
STATISTICS = ("max_abs_logits", "mean_abs_logits", "kl_divergence")


def bound_factors(values: int) -> dict[str, float]:
    """The multiple of the measured noise each statistic may reach, over ``values`` compared values."""
    mean = MEAN_LOGIT_NOISE if values >= STABLE_AVERAGE_VALUES else MAX_LOGIT_NOISE
    return {"max_abs_logits": MAX_LOGIT_NOISE, "mean_abs_logits": mean, "kl_divergence": mean ** 2}


def compare_logits(truth: torch.Tensor, other: torch.Tensor) -> dict:
    """Deviation of (positions, classes) logits from the truth: max/mean |Δ|, mean KL(truth ‖ other)
    (computed in float64 from log-softmaxes, never negative), top-1 agreement; per position (tensors,
    under ``per_position`` and ``agrees``) the max |Δ| and whether the top-1 tokens agree."""
    truth, other = truth.double(), other.double()
    diff = (truth - other).abs()
    log_p, log_q = torch.log_softmax(truth, -1), torch.log_softmax(other, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
    return {
        "max_abs_logits": diff.max().item(),
        "mean_abs_logits": diff.mean().item(),
        "kl_divergence": kl.mean().item(),
        "top1_agreement": (truth.argmax(-1) == other.argmax(-1)).double().mean().item(),
        "per_position": diff.amax(-1),
        "agrees": truth.argmax(-1) == other.argmax(-1),
    }


def judge(runs: dict, candidate: dict, dtype: torch.dtype | str, prompt_source: str,
          family: Family = FAMILIES["causal-lm"], noise_source: str | None = None) -> Report:
    """The verdict on a candidate's deviation from the truth, given the reference runs (KL and
    top-1 only where ``family`` compares logits; ``noise_source`` says what the noise run was, if
    not the reference in ``dtype`` plus the rounding of the converted weights)."""
    statistics = STATISTICS if family.distribution else STATISTICS[:2]
    precision, rounding, bare = runs["precision"], runs["rounding"], runs["bare_base"]
    noise = {stat: precision[stat] + (rounding[stat] if rounding else 0.0) for stat in statistics}
    factors = bound_factors(runs["truth"].numel())
    bounds = {stat: factors[stat] * noise[stat] for stat in statistics}
    failed = [f"{stat} {candidate[stat]:.2e} > bound {bounds[stat]:.2e}" for stat in statistics
              if candidate[stat] > bounds[stat]]
    truth = runs["truth"]
    position_noise = precision["per_position"] + (rounding["per_position"] if rounding else 0.0)
    decisive = torch.zeros_like(position_noise, dtype=torch.bool)
    if family.distribution and truth.shape[-1] > 1:
        top2 = truth.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) > DECISIVE_MARGIN * position_noise
    decisive_count = int(decisive.sum())
    decisive_agreement = None
    if decisive_count >= MIN_DECISIVE_POSITIONS:
        decisive_agreement = candidate["agrees"][decisive].double().mean().item()
        if decisive_agreement < 1.0:
            failed.append(f"top-1 {decisive_agreement:.1%} on the {decisive_count} decisive positions")
    control = None
    if bare is not None:
        control = {stat: bare[stat] for stat in (*STATISTICS, "top1_agreement")}
        control["passes_bounds"] = all(bare[stat] <= bounds[stat] for stat in statistics)
        if control["passes_bounds"]:
            failed.append("inconclusive: the bare base is within these bounds too (the adapter's effect is below "
                          f"{dtype_name(dtype)}'s own noise on these prompts); verify a float32 artifact, with "
                          "--verify-mode layerwise, or with prompts where the adapter matters (--prompts)")
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    noise_source = noise_source or (f"{name} alone: the reference in {name} vs float64, plus the rounding of the "
                                    f"converted weights to {name}")
    kl = f" and KL ≤ {factors['kl_divergence']:g}×" if family.distribution else ""
    top1 = (f"; top-1 agreement where the float64 margin exceeds {DECISIVE_MARGIN:g}× that noise (if ≥ "
            f"{MIN_DECISIVE_POSITIONS} such positions)" if family.distribution else "")
    tolerance = (f"max |Δ| ≤ {MAX_LOGIT_NOISE:g}×, mean |Δ| ≤ {factors['mean_abs_logits']:g}×{kl} the noise measured in this "
                 f"run ({noise_source}){top1}; the bare base must fail these bounds")
    return Report("full", name, tolerance, failed, {
        "family": family.name,
        "compared": list(family.outputs),
        "prompts": prompt_source,
        "positions": truth.shape[0],
        **{stat: candidate[stat] for stat in (*STATISTICS, "top1_agreement")},
        "bounds": bounds,
        "noise": {"precision": public(precision), "rounding": public(rounding) if rounding else None},
        "decisive_positions": decisive_count,
        "decisive_top1_agreement": decisive_agreement,
        "bare_base": control,
    })


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def public(stats: dict) -> dict:
    """The JSON-ready statistics of `compare_logits` (per-position tensors left out)."""
    return {key: value for key, value in stats.items() if not isinstance(value, torch.Tensor)}


def margin(logits: torch.Tensor) -> torch.Tensor:
    """The top-1 margin at each position."""
    top2 = logits.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def kept_prefix(actual: list[int], expected: list[int]) -> int:
    """Tokens of a greedy continuation ``actual`` that follow ``expected`` before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))


def judge_behaviour(logits: dict[str, torch.Tensor], continuations: dict[str, list[list[int]]],
                    precision: str) -> dict:
    """What a user of a lossy export sees, against what the precision costs the base alone. Two
    kinds of agreement with the float64 truth: teacher-forced top-1 decisions where its margin
    exceeds `DECISIVE_MARGIN`× the precision's noise at that position (|Δ| of the graph at rank 0
    from the base in float64; a near-tie is no evidence), and tokens of greedy continuations
    before they part. The graph at rank 0 (the base at ``precision``) against the
    base in float64 measures what the precision loses and keeps; the candidate against the truth
    may lose at most `BEHAVIOUR_LOSS`× as much (plus `BEHAVIOUR_SLACK`: a few decisions, one
    prompt's continuation) and must keep at least 1/`BEHAVIOUR_LOSS` as much: a gentle precision
    (fp16) is held by the first bound, a destructive one (int4 on a small model) by the second. The
    bare base is held to the same bounds against the truth; where it passes too, that kind of
    agreement cannot tell the adapter apart (inconclusive). A kind that asks nothing of the
    candidate (no decisive position, or the precision keeps none of it on the base) is not judged:
    reported so, never failed, never conclusive. ``logits``: truth, base_truth,
    candidate, graph_base (positions × vocabulary); ``continuations``: the same four, one token
    list per prompt."""
    top1 = {name: values.argmax(-1) for name, values in logits.items()}
    noise = (logits["graph_base"] - logits["base_truth"]).abs().amax(-1)
    decisive = {name: margin(logits[name]) > DECISIVE_MARGIN * noise for name in ("truth", "base_truth")}

    def agreement(actual: str, expected: str) -> dict:
        return {"top-1 decisions": int((top1[actual] == top1[expected])[decisive[expected]].sum()),
                "continuation tokens": sum(kept_prefix(a, e) for a, e in zip(continuations[actual],
                                                                                continuations[expected]))}

    kept = {"candidate": agreement("candidate", "truth"), "precision": agreement("graph_base", "base_truth"),
            "bare_base": agreement("graph_base", "truth")}
    totals = {"top-1 decisions": int(decisive["truth"].sum()),
              "continuation tokens": len(continuations["truth"]) * GENERATED_TOKENS}
    base_totals = {"top-1 decisions": max(int(decisive["base_truth"].sum()), 1),
                   "continuation tokens": totals["continuation tokens"]}
    failed, conclusive, checks = [], [], {}
    for kind, total in totals.items():
        precision_kept = kept["precision"][kind] / base_totals[kind] * total  # as a share of the truth's decisions
        least = max(precision_kept / BEHAVIOUR_LOSS,
                    total - BEHAVIOUR_LOSS * (total - precision_kept) - BEHAVIOUR_SLACK[kind])
        checks[kind] = {"of": total, "judged": least > 0, "least": least,
                        **{who: counts[kind] for who, counts in kept.items()}}
        if least <= 0:  # nothing to decide, or nothing any candidate must keep: not judged, never conclusive
            continue
        if kept["candidate"][kind] < least:
            failed.append(f"{kind} kept {kept['candidate'][kind]}/{total} < {least:.3g} ({precision} keeps "
                          f"{kept['precision'][kind]}/{base_totals[kind]} on the base)")
        if kept["bare_base"][kind] < least:
            conclusive.append(kind)
    return {"kept": checks, "failed_checks": failed, "conclusive": conclusive,
            "tolerance": f"behaviour: of the top-1 decisions and {GENERATED_TOKENS}-token greedy continuations of "
                         f"the float64 truth, the candidate keeps ≥ 1/{BEHAVIOUR_LOSS:g} of and loses ≤ "
                         f"{BEHAVIOUR_LOSS:g}× (+{BEHAVIOUR_SLACK['top-1 decisions']} decisions, +1 continuation) "
                         "what this graph at rank 0 keeps and loses of the base in float64; the bare base must fall "
                         "short"}


def with_behaviour(report: Report, behaviour: dict, judged_logits: bool | None = None) -> Report:
    """A lossy export's verdict. int4 (and ``judged_logits`` False: other 4-bit weights): the
    behaviour rule alone (`judge_behaviour`); the logits statistics are reported, not judged: at
    int4 the bounds scale with a noise as large as the adapter's effect, and on a trained adapter
    they passed a collapsed export and failed a working one (docs/int4.md). fp16: both rules, every
    conclusive check passing and at least one conclusive. Where nothing can tell the bare base from
    the adapter: FAIL, inconclusive."""
    judged_logits = report.dtype != "int4" if judged_logits is None else judged_logits
    logits_conclusive = judged_logits and not report.numbers["bare_base"]["passes_bounds"]
    failed = [check for check in report.failed_checks if judged_logits and not check.startswith("inconclusive")]
    failed += behaviour["failed_checks"]
    if not (logits_conclusive or behaviour["conclusive"]):
        failed.append(f"inconclusive: the bare base is within every bound too (on these prompts the adapter's effect "
                      f"is below {report.dtype}'s own loss); verify with prompts where the adapter changes the "
                      "answers (--prompts)")
    tolerance = behaviour["tolerance"] + (f"; {report.tolerance}" if judged_logits else
                                          f" (the logits' deviation is reported, not judged, at {report.dtype})")
    return Report(report.mode, report.dtype, tolerance, failed,
                  {**report.numbers, "behaviour": {key: behaviour[key] for key in ("kept", "conclusive")}})


def lora_factor_errors(factors, stored: dict, dtype=None) -> tuple[list[str], dict[str, float], dict[str, float],
                                                              dict[str, float]]:
    """Each module's LoRA factors as an export stores them, ``stored[module] = (lora_A, lora_B)`` in
    PEFT's layout (r×in, out×r, any scaling folded into lora_B; None: absent), against the exact ΔW
    of ``factors`` (an `AdapterFactors`), within `ROUNDING_NOISE` times the error of rounding the exact
    factors to ``dtype`` (None: the stored type): the failed checks, and per module the relative
    error, its ratio to the bound and the bound (a zero update, whose relative error is 1, passes
    where the bound reaches 1)."""
    failed, errors, ratios, bounds = [], {}, {}, {}
    for module, module_factors in factors.modules.items():
        if stored.get(module) is None:
            failed.append(f"{module}: no LoRA factors in the export")
            continue
        stored_A, stored_B = stored[module]
        lora_A, lora_B = (factor.double() for factor in module_factors.lora())
        rounded_to = dtype or stored_A.dtype
        exact = lora_B @ lora_A
        scale = torch.linalg.norm(exact).clamp_min(torch.finfo(torch.float64).tiny)
        rounded = lora_B.to(rounded_to).double() @ lora_A.to(rounded_to).double()
        bound = ROUNDING_NOISE * max((torch.linalg.norm(rounded - exact) / scale).item(), torch.finfo(rounded_to).eps)
        errors[module] = (torch.linalg.norm(stored_B.double() @ stored_A.double() - exact) / scale).item()
        ratios[module], bounds[module] = errors[module] / bound, bound
        if errors[module] > bound:
            failed.append(f"{module}: relative error {errors[module]:.2e} > bound {bound:.2e}")
    return failed, errors, ratios, bounds

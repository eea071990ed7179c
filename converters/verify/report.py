"""What a verification found: a `Report` (the check, the rule it applied, the verdict and the
numbers behind it) and `VerificationFailed`, the error that carries a failing one."""

from __future__ import annotations

from dataclasses import dataclass, field

from psoft_deploy.core.errors import UserError


@dataclass
class Report:
    """One check of one artifact. ``mode``: full (outputs compared with the float64 reference),
    layerwise (weights or LoRA factors checked one module at a time), truncated-lora or reread;
    ``dtype``: the candidate's precision; ``tolerance``: the rule, in words; ``failed_checks``: what
    failed (none: PASS); ``numbers``: the statistics behind the verdict, by name (JSON-ready);
    ``label``: which artifact or adapter was checked, set by the pipeline."""

    mode: str
    dtype: str
    tolerance: str
    failed_checks: list[str]
    numbers: dict = field(default_factory=dict)
    label: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failed_checks

    def to_dict(self) -> dict:
        """The report as written to ``psoft_verification.json`` and by ``verify --json``."""
        head = {"label": self.label} if self.label is not None else {}
        return {**head, "mode": self.mode, "dtype": self.dtype, "tolerance": self.tolerance, "passed": self.passed,
                "failed_checks": self.failed_checks, **self.numbers}

    @classmethod
    def from_dict(cls, record: dict) -> Report:
        """A report `to_dict` wrote."""
        fixed = ("label", "mode", "dtype", "tolerance", "passed", "failed_checks")
        return cls(record["mode"], record["dtype"], record["tolerance"], list(record["failed_checks"]),
                   {key: value for key, value in record.items() if key not in fixed}, record.get("label"))

    def line(self) -> str:
        """One short line: PASS/FAIL, the key numbers and what failed (the rule and every number are
        in the full report: ``--json``, ``--report``, ``psoft_verification.json``)."""
        numbers = self.numbers
        if self.mode == "truncated-lora":
            summary = (f"max layer relative error {numbers['max_layer_relative_error']:.2e} "
                       f"({numbers['worst_ratio_to_bound']:.4g}× the optimal rank-k error plus rounding) over "
                       f"{numbers['layers_checked']} layers")
        elif self.mode == "full":
            bounds = numbers["bounds"]
            summary = f"mean |Δ| {numbers['mean_abs_logits']:.2e} (≤ {bounds['mean_abs_logits']:.2e})"
            if "kl_divergence" in bounds:
                summary += f", KL {numbers['kl_divergence']:.2e} (≤ {bounds['kl_divergence']:.2e})"
            summary += f" over {numbers['positions']} positions"
            if numbers.get("bare_base") is not None:
                ratio = numbers["bare_base"]["mean_abs_logits"] / bounds["mean_abs_logits"]
                summary += f"; bare base {ratio:.3g}× the bound"
            for kind, kept in numbers.get("behaviour", {}).get("kept", {}).items():
                summary += (f"; {kind} kept {kept['candidate']}/{kept['of']} (≥ {kept['least']:g})" if kept["judged"]
                            else f"; {kind} not judged ({kept['candidate']}/{kept['of']} kept, none required)")
        elif self.mode == "layerwise":
            summary = (f"max layer relative error {numbers['max_layer_relative_error']:.2e} "
                       f"({numbers['worst_ratio_to_bound']:.2g}× its bound) over {numbers['layers_checked']} layers")
        else:
            summary = f"{numbers['modules_checked']} modules"
        failed = f"; failed: {', '.join(self.failed_checks)}" if self.failed_checks else ""
        return f"{'PASS' if self.passed else 'FAIL'} ({self.mode}, {self.dtype}): {summary}{failed}"


class VerificationFailed(UserError):
    """An artifact failed verification (nothing was published); ``report`` says why."""

    def __init__(self, message: str, report: Report):
        super().__init__(message)
        self.report = report

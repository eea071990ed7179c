"""`psoft-deploy inspect`: what an adapter holds and how fragile its re-derivation would be."""

from __future__ import annotations

from dataclasses import asdict

import torch

from .base import BaseCheckpoint
from .factors import AdapterFactors, base_tensor_key, module_rotation
from .formats import PsoftAdapter


def inspect_adapter(adapter: PsoftAdapter, factors: AdapterFactors | None, base: BaseCheckpoint | None) -> dict:
    """A JSON-ready report. ``factors`` (when derivable) add ‖ΔW‖; ``base`` adds ‖ΔW‖/‖W‖ and
    the smallest relative singular-value gap of W within its top r+1 values."""
    layers = {}
    for name, params in adapter.modules.items():
        R = module_rotation(adapter, name, with_magnitudes=False)
        eye = torch.eye(adapter.rank, dtype=R.dtype)
        layer = {
            "orthogonality_error": float(torch.linalg.norm(R.T @ R - eye)),
            "vector_a_range": _range(params.vector_a),
            "vector_b_range": _range(params.vector_b),
        }
        if factors is not None:
            layer["delta_norm"] = float(torch.linalg.norm(factors.modules[name].delta_weight()))
        if base is not None:
            W = base.tensor(base_tensor_key(name)).float()
            if factors is not None:
                layer["delta_relative_norm"] = layer["delta_norm"] / float(torch.linalg.norm(W))
            S = torch.linalg.svdvals(W)
            top = S[: adapter.rank + 1]
            gaps = (top[:-1] - top[1:]) / top[:-1].clamp_min(torch.finfo(S.dtype).tiny)
            layer["min_relative_singular_gap"] = float(gaps.min()) if len(gaps) else None
        layers[name] = layer
    report = {
        "path": str(adapter.path),
        "format": adapter.format,
        "source_format": adapter.source.get("format"),
        "peft_version": adapter.source.get("peft_version"),
        "materialized_by": adapter.metadata.get("tool"),
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "rank": adapter.rank,
        "scale": adapter.scale,
        "targets": sorted({name.rsplit(".", 1)[-1] for name in adapter.modules}),
        "num_modules": len(adapter.modules),
        "trainable_parameters": adapter.trainable_parameter_count,
        "replaced_tensors": sorted(adapter.replaced_tensors),
        "file_size_bytes": adapter.file_size,
        "rotation": asdict(adapter.rotation_spec),
        "subspace": asdict(adapter.subspace_spec) if adapter.subspace_spec else None,
        "svd": factors.svd if factors is not None else adapter.metadata.get("svd"),
        "layers": layers,
    }
    report["summary"] = {
        key: _extreme(layers, key, pick)
        for key, pick in (
            ("orthogonality_error", max),
            ("delta_relative_norm", max),
            ("min_relative_singular_gap", min),
        )
    }
    return report


def format_report(report: dict) -> str:
    """The report as a few human-readable lines."""
    lines = [
        f"adapter      {report['path']}",
        f"format       {report['format']}"
        + (f" (from {report['source_format']})" if report["source_format"] != report["format"] else "")
        + (f", PEFT {report['peft_version']}" if report["peft_version"] else ""),
        f"rank         r={report['rank']}, scale s={report['scale']:g}",
        f"targets      {', '.join(report['targets'])} ({report['num_modules']} modules)",
        f"parameters   {report['trainable_parameters']:,} trained, files {report['file_size_bytes']:,} bytes",
        f"rotation     {_describe_rotation(report['rotation'])}",
    ]
    if report["subspace"]:
        sub = report["subspace"]
        lines.append(f"subspace     {sub['init']}, {sub['svd']} SVD" + (
            f" (niter={sub['niter']}, seed={sub['seed']})" if sub["svd"] == "lowrank" else ""))
    if report["svd"]:
        lines.append(f"svd          {report['svd']}")
    if report["replaced_tensors"]:
        lines.append(f"replaces     {', '.join(report['replaced_tensors'])}")
    summary = report["summary"]
    lines.append(f"max ‖RᵀR−I‖  {summary['orthogonality_error']:.3g}")
    if summary["delta_relative_norm"] is not None:
        lines.append(f"max ‖ΔW‖/‖W‖ {summary['delta_relative_norm']:.3g}")
    if summary["min_relative_singular_gap"] is not None:
        lines.append(f"min σ gap    {summary['min_relative_singular_gap']:.3g} (relative, within the top r+1; "
                     "small means a re-derived subspace is fragile)")
    header = f"{'module':<48} {'‖RᵀR−I‖':>9} {'vector_a':>15} {'vector_b':>15} {'‖ΔW‖/‖W‖':>9} {'σ gap':>9}"
    lines += ["", header]
    for name, layer in report["layers"].items():
        lines.append(
            f"{name:<48} {layer['orthogonality_error']:>9.2e} {_fmt_range(layer['vector_a_range']):>15} "
            f"{_fmt_range(layer['vector_b_range']):>15} {_fmt(layer.get('delta_relative_norm')):>9} "
            f"{_fmt(layer.get('min_relative_singular_gap')):>9}"
        )
    return "\n".join(lines)


def _describe_rotation(spec: dict) -> str:
    if not spec["orth"]:
        return f"free R ({spec['convention']} convention)"
    if spec["cayley_neumann"]:
        eps = f", eps={spec['neumann_eps']}" if spec["neumann_eps"] is not None else ""
        return f"Cayley–Neumann, t={spec['neumann_terms']}{eps} ({spec['convention']} convention)"
    return f"exact Cayley ({spec['convention']} convention)"


def _range(vector: torch.Tensor | None) -> list[float] | None:
    return None if vector is None else [float(vector.min()), float(vector.max())]


def _extreme(layers: dict, key: str, pick) -> float | None:
    values = [layer[key] for layer in layers.values() if layer.get(key) is not None]
    return pick(values) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _fmt_range(bounds: list[float] | None) -> str:
    return "-" if bounds is None else f"{bounds[0]:.3f}..{bounds[1]:.3f}"

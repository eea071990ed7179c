"""The candidates verification checks, each against the reference: a merged model directory, a
LoRA adapter (exact or rank-truncated), a torch.onnx export, in ``full`` mode (the model run on
the verification inputs and judged by `rule.judge`) or ``layerwise`` (each adapted weight or LoRA
pair checked on random inputs by `LayerChecks`, for models too large for a float64 forward or
bases without a transformers config). onnxruntime-genai exports: `genai_exports`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from psoft_deploy.converters.lora_format import LoraAdapter, lora_keys
from psoft_deploy.converters.merge import stored_deltas, stored_replacements
from psoft_deploy.core.architectures import model_family
from psoft_deploy.core.base import BaseCheckpoint, meta_model
from psoft_deploy.core.dtypes import BY_NAME, BY_ONNX, from_safetensors
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import AdapterFactors, base_tensor_key, derive_factors
from psoft_deploy.core.formats import ADAPTER_WEIGHTS, PEFT_PREFIX, read_materialized
from psoft_deploy.core.layer import PsoftLinear
from psoft_deploy.core.model import load_base_model
from psoft_deploy.core.psoft import lora_spectrum, truncation_error
from psoft_deploy.core.tensorfile import open_safetensors

from .inputs import family_outputs, verification_inputs
from .reference import reference_merged_weight, reference_runs
from .report import Report
from .rule import compare_logits, dtype_name, judge, lora_factor_errors
from .tolerances import ROUNDING_NOISE

FULL_MODE_MAX_PARAMETERS = 500_000_000


def verify_full(
    base: BaseCheckpoint, factors: AdapterFactors | None, candidate_dir: Path, prompts=None, *, kind: str = "merged",
    adapter_file: Path | None = None,
) -> Report:
    """Run the candidate and the reference on the verification prompts and judge the candidate
    by the noise measured in the same run (see the module docstring).

    ``kind`` is ``merged`` (a model directory, run by transformers), ``lora`` (an adapter loaded
    onto the base by PEFT's own LoRA code, independent of ours) or ``onnx`` (an exported graph,
    run by onnxruntime, with ``adapter_file`` active when given). ``factors`` None means the
    candidate should be the bare base."""
    if kind == "lora":
        dtype = lora_dtype(LoraAdapter.read(candidate_dir))
    elif kind == "onnx":
        dtype = onnx_dtype(candidate_dir)
    else:
        dtype = candidate_dtype(BaseCheckpoint(str(candidate_dir)), factors)
    family = model_family(base.config)
    inputs, prompt_source = verification_inputs([candidate_dir, base.path], prompts, base.config)

    def forward(model) -> torch.Tensor:
        with torch.no_grad():
            return family_outputs(model(**inputs), family, inputs)

    runs = reference_runs(base, factors, dtype, forward)
    if kind == "onnx":
        from psoft_deploy.converters.onnx import onnx_outputs

        raw = onnx_outputs(candidate_dir, {key: value.numpy() for key, value in inputs.items()}, family.outputs,
                           adapter_file)
        actual = family_outputs({name: torch.from_numpy(value) for name, value in raw.items()}, family, inputs)
    elif kind == "lora":
        actual = forward(load_lora_candidate(base.path, candidate_dir, dtype))
    else:
        actual = forward(load_base_model(candidate_dir, dtype))
    return judge(runs, compare_logits(runs["truth"], actual), dtype, prompt_source, family)


def candidate_dtype(candidate: BaseCheckpoint, factors: AdapterFactors) -> torch.dtype:
    """The dtype the candidate stores its adapted weights in."""
    first = candidate.stored_key(base_tensor_key(next(iter(factors.modules))))
    return from_safetensors(candidate.index[first].dtype).torch


def lora_dtype(lora: LoraAdapter) -> torch.dtype:
    """The dtype of a LoRA adapter's weights."""
    return from_safetensors(next(iter(lora.tensors.values())).dtype).torch


def onnx_dtype(candidate_dir: Path) -> torch.dtype:
    """The floating dtype of an exported graph's (first) output."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(candidate_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return BY_ONNX.get(session.get_outputs()[0].type, BY_NAME["float32"]).torch


# LoraConfig options under which PEFT's forward is more than ``W x + scaling · B A x`` on each
# targeted layer (or replaces what modules_to_save names): only the full forward decides those.
FORWARD_CHANGING_OPTIONS = ("use_dora", "lora_bias", "alora_invocation_tokens", "layer_replication",
                            "target_parameters", "trainable_token_indices", "use_qalora", "arrow_config",
                            "megatron_config")


def peft_lora_skeleton(base: BaseCheckpoint, candidate_dir: Path):
    """The LoRA adapter in ``candidate_dir`` as PEFT itself loads it (its config reading, module
    matching, scaling and weights), onto the base's architecture without reading the base's weights (built
    on the meta device, then given uninitialized storage): the adapter's own tensors are real, the base's are not
    and are never read."""
    from peft import PeftModel

    skeleton = meta_model(base.path).to_empty(device="cpu")
    return PeftModel.from_pretrained(skeleton, candidate_dir).eval()


def verify_lora_in_peft(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path) -> Report | None:
    """An exact LoRA adapter layer by layer, as PEFT loads it (`peft_lora_skeleton`): each adapted
    module's ``scaling · lora_B lora_A`` against the exact ΔW by `lora_factor_errors`, no other module
    adapted, and each ``modules_to_save`` tensor equal to the adapter's. On a plain LoRA that is what
    PEFT's forward computes, layer by layer, at any size, with no forward run. None where the adapter's
    config sets an option in `FORWARD_CHANGING_OPTIONS` (then the full forward decides)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    config = LoraConfig.from_pretrained(candidate_dir)
    if config.bias != "none" or any(getattr(config, option, None) for option in FORWARD_CHANGING_OPTIONS):
        return None
    dtype = lora_dtype(LoraAdapter.read(candidate_dir))
    model = peft_lora_skeleton(base, candidate_dir)
    layers = {name.removeprefix(PEFT_PREFIX): module for name, module in model.named_modules()
              if isinstance(module, LoraLayer) and "default" in module.lora_A}
    stored = {name: (layers[name].lora_A["default"].weight.detach().double(),
                     layers[name].lora_B["default"].weight.detach().double() * layers[name].scaling["default"])
              for name in factors.modules if name in layers}
    failed, errors, ratios, bounds = lora_factor_errors(factors, stored, dtype)
    bare_base_passes = sum(bound >= 1 for bound in bounds.values())  # the control: a zero update's error is 1
    if stored and bare_base_passes == len(stored):
        failed.append(f"inconclusive: in {dtype_name(dtype)} a zero update is within every layer's bound too")
    extra = sorted(set(layers) - set(factors.modules))
    if extra:
        failed.append(f"{len(extra)} modules the PSOFT adapter does not adapt carry LoRA factors ({extra[0]}, ...)")
    saved = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in model.state_dict().items()
             if ".modules_to_save.default." in key}
    saved = {key.replace(".modules_to_save.default.", "."): tensor for key, tensor in saved.items()}
    differing = [key for key, tensor in factors.replaced_tensors.items()
                 if key not in saved or not torch.equal(saved[key].to(tensor.dtype), tensor)]
    if differing:
        failed.append(f"{len(differing)} modules_to_save tensors differ from the adapter's ({differing[0]}, ...)")
    return Report("layerwise", dtype_name(dtype),
                  f"each adapted module's scaling · lora_B lora_A, as PEFT loads the LoRA, reproduces the exact ΔW "
                  f"within {ROUNDING_NOISE:g}× what rounding the exact factors to {dtype_name(dtype)} costs; no "
                  "other module adapted, modules_to_save equal to the adapter's (a plain LoRA: PEFT's forward is "
                  "W x + scaling · B A x per layer); a zero update (the bare base) must fail", failed, {
                      "candidate": "lora", "loaded_by": "peft",
                      "layers_checked": len(errors),
                      "layers_where_the_bare_base_passes": bare_base_passes,
                      "max_layer_relative_error": max(errors.values(), default=0.0),
                      "worst_ratio_to_bound": max(ratios.values(), default=0.0),
                      "modules_extra": extra[:10],
                  })


def load_lora_candidate(base_dir: Path, candidate_dir: Path, dtype: torch.dtype):
    """The base in ``dtype`` with a LoRA adapter, loaded by PEFT's own LoRA code."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base_model(base_dir, dtype), candidate_dir).eval()


def verify_truncated_lora(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path) -> Report:
    """A rank-truncated LoRA export is approximate by design: each layer, as PEFT loads it, may be
    no further from the exact ΔW than the optimal rank-k truncation, computed here from the exact
    factors (the SVD of their r×r core, `lora_spectrum`), k being the rank of the layer's stored
    factors, plus `ROUNDING_NOISE` × what rounding the optimal factors to the candidate's dtype costs
    (measured per layer in this run); all in float64. The export's record of its errors is not
    read. A layer of rank 0 (the bare base) fails."""
    dtype = lora_dtype(LoraAdapter.read(candidate_dir))
    model = load_lora_candidate(base.path, candidate_dir, torch.float32)
    failed, errors, ratios, ranks = [], {}, {}, {}
    for name, exact in factors.modules.items():
        layer = model.base_model.model.get_submodule(name)
        if "default" not in getattr(layer, "lora_A", {}):
            failed.append(f"{name}: no LoRA factors in the candidate")
            continue
        stored_A = layer.lora_A["default"].weight.detach().double()
        stored_B = layer.lora_B["default"].weight.detach().double() * layer.scaling["default"]
        singular_values = lora_spectrum(stored_A, stored_B)[1]
        floor = singular_values.max() * max(*stored_A.shape, *stored_B.shape) * torch.finfo(torch.float32).eps
        ranks[name] = rank = int((singular_values > floor).sum()) if singular_values.max() > 0 else 0
        if rank == 0:
            failed.append(f"{name}: the candidate's update is zero (rank 0)")
            continue
        lora_A, lora_B = (factor.double() for factor in exact.lora())
        U, S, Vh = lora_spectrum(lora_A, lora_B)
        optimal_A, optimal_B, optimal_error = Vh[:rank], U[:, :rank] * S[:rank], truncation_error(S, rank)
        delta = lora_B @ lora_A
        scale = torch.linalg.norm(delta).clamp_min(torch.finfo(torch.float64).tiny)
        rounding = optimal_B.to(dtype).double() @ optimal_A.to(dtype).double() - optimal_B @ optimal_A
        bound = optimal_error + ROUNDING_NOISE * max((torch.linalg.norm(rounding) / scale).item(), torch.finfo(dtype).eps)
        errors[name] = (torch.linalg.norm(stored_B @ stored_A - delta) / scale).item()
        ratios[name] = errors[name] / bound
        if errors[name] > bound:
            failed.append(f"{name}: relative error {errors[name]:.4e} > {bound:.4e} (the optimal at rank {rank} "
                          f"{optimal_error:.4e})")
    worst = max(ratios, key=ratios.get, default=None)
    return Report("truncated-lora", dtype_name(dtype), "each layer's relative error ≤ the optimal error at the rank "
                  "of its stored factors (from the SVD of the exact factors' r×r core) + "
                  f"{ROUNDING_NOISE:g}× what rounding the optimal factors to {dtype_name(dtype)} costs (measured per "
                  "layer in this run); a layer of rank 0 fails", failed, {
                      "max_layer_relative_error": max(errors.values(), default=0.0),
                      "worst_layer": worst,
                      "worst_ratio_to_bound": ratios.get(worst, 0.0),
                      "ranks": ranks,
                      "layers_checked": len(errors),
                  })


class LayerChecks:
    """Adapted weights checked one layer at a time (the layerwise modes). A candidate weight W'
    is run on random inputs x against the float64 ``(W + ΔW) x`` from the reference layer; its
    relative error may be at most `ROUNDING_NOISE` × that of ``W + ΔW`` rounded to the candidate's
    dtype (at least the dtype's unit roundoff), measured per layer. The bare W is the control:
    if it passed in every layer, the check is inconclusive."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(0)
        self.layers = self.indistinct = 0
        self.worst_ratio, self.worst_layer, self.worst_error = 0.0, None, 0.0

    def check(self, name: str, weight: torch.Tensor, factors, candidate: torch.Tensor) -> None:
        """Check ``candidate`` (W' as stored, (out, in)) for the module with base ``weight``."""
        base_layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
        base_layer.weight.data = weight.double()
        merged = reference_merged_weight(PsoftLinear(base_layer, factors))
        probe = torch.randn(weight.shape[1], 8, generator=self.generator, dtype=torch.float64)
        exact = merged @ probe

        def error(candidate_weight: torch.Tensor) -> float:
            return (torch.linalg.norm(candidate_weight.double() @ probe - exact) / torch.linalg.norm(exact)).item()

        bound = ROUNDING_NOISE * max(error(merged.to(self.dtype)), torch.finfo(self.dtype).eps / 2)
        actual = error(candidate)
        self.layers += 1
        self.indistinct += error(weight) <= bound
        if actual / bound >= self.worst_ratio:
            self.worst_ratio, self.worst_layer, self.worst_error = actual / bound, name, actual

    def report(self, failed: list[str], **metrics) -> Report:
        """The layerwise report, with ``failed`` checks of the caller's own added."""
        name = dtype_name(self.dtype)
        if self.worst_ratio > 1:
            failed.insert(0, f"{self.worst_layer} is {self.worst_ratio:.3g}× its bound")
        if self.layers and self.indistinct == self.layers:
            failed.append(f"inconclusive: in {name} every adapted layer of the bare base is within its bound too")
        tolerance = (f"per adapted layer, relative error on random inputs ≤ {ROUNDING_NOISE:g}× that of W + ΔW "
                     f"rounded to {name} (measured per layer in this run); the bare base must fail")
        return Report("layerwise", name, tolerance, failed, {
            "max_layer_relative_error": self.worst_error,
            "worst_layer": self.worst_layer,
            "worst_ratio_to_bound": self.worst_ratio,
            "layers_checked": self.layers,
            "layers_where_the_bare_base_passes": self.indistinct,
            **metrics,
        })


def verify_layerwise(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path) -> Report:
    """Check a merged model while streaming: each adapted weight by `LayerChecks`, every other
    tensor equal to the base's (or the adapter's ``modules_to_save`` replacement)."""
    candidate = BaseCheckpoint(str(candidate_dir))
    checks = LayerChecks(candidate_dtype(candidate, factors))
    deltas, replaced = stored_deltas(base, factors), stored_replacements(base, factors)
    mismatched = []
    missing = sorted(set(base.files) - set(candidate.files))
    for key in candidate.files:
        actual = candidate.tensor(key)
        if key in deltas:
            checks.check(key, base.tensor(key), deltas[key], actual)
        else:
            source = replaced[key] if key in replaced else base.tensor(key)
            if not torch.equal(actual, source.to(actual.dtype)):
                mismatched.append(key)
    failed = [f"{len(mismatched)} other tensors differ from the base, {len(missing)} are missing"] if (
        mismatched or missing) else []
    return checks.report(failed, tensors_differing_from_base=mismatched[:10], tensors_missing=missing[:10])


def verify_lora_layerwise(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path) -> Report:
    """Check a LoRA adapter layer by layer: ``W + scaling · lora_B lora_A`` (PEFT's scaling,
    ``rank_pattern`` and ``alpha_pattern`` included) by `LayerChecks`, for every module the PSOFT
    adapter adapts; a LoRA module the adapter does not adapt, or one it lacks, fails."""
    lora = LoraAdapter.read(candidate_dir)
    if lora.use_dora:
        raise UserError(f"{candidate_dir} is a DoRA adapter; its layers are not W + scaling·BA: verify it with "
                        "--verify-mode full")
    with open_safetensors(candidate_dir / ADAPTER_WEIGHTS) as handle:
        tensors = {key.removeprefix(PEFT_PREFIX): handle.get_tensor(key) for key in handle.keys()}
    lora_modules = set(lora.modules)
    checks = LayerChecks(lora_dtype(lora))
    for name, module in factors.modules.items():
        if name not in lora_modules:
            continue
        lora_A, lora_B = (tensors[key].double() for key in lora_keys(name))
        delta = lora.scaling(name) * (lora_B @ lora_A)
        weight = base.tensor(base_tensor_key(name))
        checks.check(name, weight, module, weight.double() + (delta.T if lora.fan_in_fan_out else delta))
    missing, extra = sorted(set(factors.modules) - lora_modules), sorted(lora_modules - set(factors.modules))
    failed = [f"{len(missing)} adapted modules missing from the LoRA, {len(extra)} extra"] if missing or extra else []
    return checks.report(failed, candidate="lora", modules_missing=missing[:10], modules_extra=extra[:10])


def verify_mlx_files(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path) -> Report:
    """An mlx-lm adapter's files read back (`read_mlx_adapter`: the modules its config's keys and
    num_layers reach, scale applied) and each module checked against the exact ΔW by
    `lora_factor_errors` (whether they hold the exact factors); mlx-lm runs it in `mlx_exports`."""
    from psoft_deploy.converters.mlx import read_mlx_adapter

    if not base.config.get("num_hidden_layers"):
        raise UserError(f"an mlx-lm adapter applies to the last num_layers layers; base {base.name} has no "
                        "num_hidden_layers in its config.json to place them")
    stored = read_mlx_adapter(candidate_dir, base.config["num_hidden_layers"])
    failed, errors, ratios, _ = lora_factor_errors(factors, stored)
    extra = sorted(set(stored) - set(factors.modules))
    if extra:
        failed.append(f"{len(extra)} modules the PSOFT adapter does not adapt ({extra[0]}, ...)")
    dtypes = {pair[0].dtype for pair in stored.values() if pair is not None}
    return Report("layerwise", dtype_name(min(dtypes, key=str) if dtypes else torch.float32),
                  f"each module's lora_a/lora_b, as mlx-lm's config reaches them, reproduce the exact ΔW within "
                  f"{ROUNDING_NOISE:g}× what rounding them to their dtype costs (read back)", failed, {
                      "candidate": "mlx",
                      "layers_checked": len(errors),
                      "max_layer_relative_error": max(errors.values(), default=0.0),
                      "worst_ratio_to_bound": max(ratios.values(), default=0.0),
                  })


def parameter_count(checkpoint: BaseCheckpoint) -> int:
    """Number of stored parameters, from the safetensors headers alone."""
    return sum(math.prod(info.shape) for info in checkpoint.index.values())


def resolve_mode(mode: str, model: BaseCheckpoint) -> str:
    """``auto``: full up to `FULL_MODE_MAX_PARAMETERS`, layerwise above."""
    if mode != "auto":
        return mode
    return "full" if parameter_count(model) <= FULL_MODE_MAX_PARAMETERS else "layerwise"


def reread_matches(factors: AdapterFactors, directory: Path) -> Report:
    """A verification report: the materialized adapter in ``directory``, read back, holds
    exactly ``factors`` (A, B, R and replaced tensors bit-identical)."""
    reread = derive_factors(read_materialized(directory), None)
    failed = []
    if reread.modules.keys() != factors.modules.keys() or reread.replaced_tensors.keys() != factors.replaced_tensors.keys():
        failed.append("the modules or replaced tensors read back are not those written")
    else:
        differing = [name for name, module in factors.modules.items()
                     if not all(torch.equal(getattr(module, part), getattr(reread.modules[name], part))
                                for part in ("A", "B", "R"))]
        differing += [key for key, tensor in factors.replaced_tensors.items()
                      if not torch.equal(tensor, reread.replaced_tensors[key])]
        failed += [f"{len(differing)} modules or tensors differ"] if differing else []
    return Report("reread", str(next(iter(factors.modules.values())).A.dtype).removeprefix("torch."),
                  "every factor and replaced tensor read back bit-identical", failed,
                  {"modules_checked": len(factors.modules)})

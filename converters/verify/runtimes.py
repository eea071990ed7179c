"""Exports that run in a runtime of their own (onnxruntime-genai, llama.cpp), judged in full mode
against the float64 truth: the runtime runs the candidate and the base at the export's precision,
and what the precision does to the base there, carried onto the truth, plus the reference in the
runtime's float type, is the noise (`rule.judge`). Lossy precisions are also judged by behaviour
(`rule.judge_behaviour`: top-1 decisions and greedy continuations)."""

from __future__ import annotations

import gc
from contextlib import AbstractContextManager
from typing import Callable, NamedTuple, Protocol

import numpy as np
import torch

from psoft_deploy.core.architectures import model_family
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.factors import AdapterFactors
from psoft_deploy.core.model import load_base_model, reference_model

from .inputs import family_outputs, right_padded
from .reference import greedy, outputs_freed, strip_adapter
from .report import Report
from .rule import GENERATED_TOKENS, compare_logits, dtype_name, judge, judge_behaviour, with_behaviour

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class Simulation(NamedTuple):
    """A runtime's own arithmetic, hooked onto a torch model by ``apply`` (e.g. llama.cpp's), and
    what it is (``with …``)."""

    description: str
    apply: Callable[[torch.nn.Module], None]


class Runtime(Protocol):
    """A loaded export: logits at every position of a token sequence, and greedy continuations, of a
    named configuration (the candidate, or the base at the export's precision)."""

    def logits(self, tokens: list[int], name) -> np.ndarray: ...

    def greedy(self, tokens: list[int], name, count: int) -> list[int]: ...


def judge_in_runtime(base: BaseCheckpoint, factors: AdapterFactors, sequences: list[list[int]], prompt_source: str,
                     precision: str, runtime: Callable[[], AbstractContextManager[Runtime]], *,
                     names: dict[str, object], base_run: str, stop: set[int], float_type: torch.dtype,
                     lossy: bool, judged_logits: bool | None = None,
                     stored_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                     simulate: Simulation | None = None) -> Report:
    """The verdict on the candidate ``runtime()`` runs as ``names["candidate"]`` (the base at the
    export's precision: ``names["base"]``, described by ``base_run``) on ``sequences``, each run
    alone from position 0.
    ``lossy``: also judged by behaviour; ``judged_logits`` False: by behaviour alone (the logits'
    deviation reported, not judged: 4-bit weights; None: `with_behaviour`'s rule, int4 alone). ``stored_lora``: each module's (lora_A, lora_B)
    rounded as the export stores them, when that rounding is coarser than ``float_type``'s: the
    rounding noise is then the base in ``float_type`` with ``W + lora_B·lora_A`` instead of the
    reference in ``float_type``. ``simulate``: hooks the runtime's own arithmetic onto that rounding
    run's model (llama.cpp's quantized matmul inputs and float16 KV cache) and says what it did: the
    noise it adds depends on the adapted model's own activations, which the base's run does not show."""
    family = model_family(base.config)
    inputs = right_padded(sequences)

    def forward(model) -> torch.Tensor:
        with torch.no_grad():
            return family_outputs(model(**inputs), family, inputs)

    def continuations(model) -> list[list[int]]:
        return [greedy(model, tokens, GENERATED_TOKENS, stop) for tokens in sequences] if lossy else []

    model = reference_model(base.path, factors, torch.float64)
    truth, truth_continuations = forward(model), continuations(model)
    strip_adapter(model, factors, base)
    base_truth, base_continuations = forward(model), continuations(model)
    del model
    gc.collect()  # the model's reference cycles: freed now, not beside the next model or the runtime's
    rounding = compare_logits(truth, outputs_freed(lambda: _rounded_reference(base, factors, float_type, stored_lora,
                                                                            simulate), forward))
    with runtime() as loaded:
        def outputs(which: str) -> torch.Tensor:
            return torch.cat([torch.from_numpy(np.asarray(loaded.logits(tokens, names[which]), dtype=np.float64))
                              for tokens in sequences])

        candidate, runtime_base = outputs("candidate"), outputs("base")
        runtime_continuations = {which: [loaded.greedy(tokens, names[which], GENERATED_TOKENS) for tokens in sequences]
                                 for which in ("candidate", "base")} if lossy else {}
    # The precision's deviation on the base, carried onto the adapted truth (KL depends on the
    # distribution it is measured on; |Δ| is the base's own), plus the float arithmetic of the
    # update: the reference in the runtime's float type.
    runs = {"truth": truth, "precision": compare_logits(truth, truth + (runtime_base - base_truth)),
            "rounding": rounding, "bare_base": compare_logits(truth, runtime_base)}
    simulated = f" {simulate.description}" if simulate else ""
    report = judge(runs, compare_logits(truth, candidate), precision, prompt_source, family,
                   noise_source=f"{precision} alone: {base_run} minus the base in float64, carried onto the "
                                f"float64 truth, plus the reference in {dtype_name(float_type)}{simulated} vs float64")
    if not lossy:
        return report
    return with_behaviour(report, judge_behaviour(
        {"truth": truth, "base_truth": base_truth, "candidate": candidate, "graph_base": runtime_base},
        {"truth": truth_continuations, "base_truth": base_continuations,
         "candidate": runtime_continuations["candidate"], "graph_base": runtime_continuations["base"]}, precision),
        judged_logits)


def _rounded_reference(base: BaseCheckpoint, factors: AdapterFactors, float_type: torch.dtype,
                       stored_lora: dict | None, simulate: Simulation | None = None):
    """The reference in ``float_type``, or (``stored_lora``) the base in ``float_type`` with every
    adapted weight ``W + lora_B·lora_A`` from the stored factors (summed in float64), hooked by
    ``simulate``."""
    if stored_lora is None:
        model = reference_model(base.path, factors, float_type)
    else:
        model = load_base_model(base.path, float_type)
        for name, (lora_A, lora_B) in stored_lora.items():
            weight = model.get_submodule(name).weight
            weight.data = (weight.double() + lora_B.double() @ lora_A.double()).to(float_type)
    if simulate is not None:
        simulate.apply(model)
    return model


def round_attention(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round the outputs of every ``q_proj``, ``k_proj`` and ``v_proj`` of ``model`` to ``dtype``
    (as a runtime that holds attention's queries, keys and values in it computes)."""
    for name, module in model.named_modules():
        if name.endswith(ATTENTION_PROJECTIONS):
            module.register_forward_hook(lambda module, args, output: output.to(dtype).to(output.dtype))

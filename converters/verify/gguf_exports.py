"""GGUF files, verified by llama.cpp itself (llama-cpp-python): a LoRA GGUF applied to the base
GGUF beside it (or the base written as a GGUF of the same type), or a merged model file, each run
against the float64 truth (`runtimes.judge_in_runtime`); the base's GGUF, run by llama.cpp, is the
noise, once it is checked against transformers' base (`verify_base_gguf`). Also checked:
llama.cpp tokenizes the prompts' text as the base's tokenizer does."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from psoft_deploy.converters import gguf
from psoft_deploy.core.base import BaseCheckpoint
from psoft_deploy.core.dtypes import GGUF_FILE_TYPES
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import AdapterFactors
from psoft_deploy.core.generate import eos_token_ids
from psoft_deploy.core.model import load_base_model

from .inputs import prompt_sequences, verification_inputs
from .report import Report
from .rule import STATISTICS, bound_factors, compare_logits, judge
from .runtimes import Simulation, judge_in_runtime, round_attention
from .tolerances import DECISIVE_MARGIN, GENERATED_TOKENS, MAX_LOGIT_NOISE

# GGUF types judged by their logits as well as behaviour; lower types by behaviour alone (4-bit-like noise).
JUDGED_BY_LOGITS = (*gguf.FLOAT_TYPES, "Q8_0")


class LlamaCpp:
    """GGUF files loaded in llama.cpp, by name: ``files[name] = (model file, LoRA file or None)``;
    each run starts from an empty context, logits at every position, greedy until ``stop``."""

    def __init__(self, files: dict[str, tuple[Path, Path | None]], context: int, stop: set[int]):
        self.stop = stop
        # half the cores: llama.cpp's threads wait by spinning, and on 2 busy cores 2 threads took 10× 1's time
        threads = max(1, len(os.sched_getaffinity(0)) // 2)
        self.models = {name: gguf.load(model, lora, n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                                       n_threads=threads, n_threads_batch=threads)
                       for name, (model, lora) in files.items()}

    def logits(self, tokens: list[int], name: str) -> np.ndarray:
        model = self.models[name]
        model.reset()
        model.eval(tokens)
        return np.array(model.scores[:len(tokens)], dtype=np.float64)

    def greedy(self, tokens: list[int], name: str, count: int) -> list[int]:
        model, new = self.models[name], []
        model.reset()
        model.eval(tokens)
        while True:
            new.append(int(np.argmax(model.scores[model.n_tokens - 1])))
            if new[-1] in self.stop or len(new) == count:
                return new
            model.eval(new[-1:])

    def tokenize(self, text: str) -> list[int]:
        return next(iter(self.models.values())).tokenize(text.encode(), add_bos=False, special=True)

    def close(self) -> None:
        for model in self.models.values():
            model.close()


def verify_gguf(base: BaseCheckpoint, factors: AdapterFactors, file: Path, prompts=None) -> Report:
    """Verify a GGUF model file, or a LoRA GGUF on the base GGUF beside it (``base.gguf``, as
    ``export-lora --with-base`` writes it) or else on the base written here in the LoRA's type, in
    llama.cpp, in full mode at any size (as torch.onnx graphs): F32, F16, BF16 and Q8_0 by the
    logits bounds and behaviour, lower types by behaviour alone (`JUDGED_BY_LOGITS`). The base
    GGUF whose run is the noise is first checked against transformers (`verify_base_gguf`)."""
    gguf.llama_cpp()
    quant, adapter = gguf.file_quant(file), gguf.is_adapter(file)
    if quant not in GGUF_FILE_TYPES:
        raise UserError(f"{file} holds {quant}; psoft-deploy verifies the GGUF types it writes "
                        f"({', '.join(GGUF_FILE_TYPES)}), running the base written in the same type beside it")
    inputs, prompt_source = verification_inputs([file.parent, base.path], prompts, base.config)
    sequences = prompt_sequences(inputs)
    context = min(max(map(len, sequences)) + GENERATED_TOKENS + 1, base.config.get("max_position_embeddings", 4096))
    stop = eos_token_ids(base.path)
    with tempfile.TemporaryDirectory(prefix="psoft-gguf-") as scratch:
        base_file, checked = _base_files(base, file.parent / gguf.BASE_FILE if adapter else None, quant, Path(scratch))
        precision = gguf.file_quant(base_file)
        files = {"candidate": (base_file, file) if adapter else (file, None), "base": (base_file, None)}
        checked_name = "base" if checked == base_file else "base as written"
        files[checked_name] = (checked, None)
        tokenization, checked_logits = [], []

        @contextmanager
        def runtime():
            loaded = LlamaCpp(files, context, stop)
            try:
                tokenization.extend(_tokenization_differences(loaded, base.path, sequences))
                checked_logits.append(torch.cat([torch.from_numpy(loaded.logits(tokens, checked_name))
                                                 for tokens in sequences]))
                yield loaded
            finally:
                loaded.close()

        report = judge_in_runtime(
            base, factors, sequences, prompt_source, precision, runtime,
            names={"candidate": "candidate", "base": "base"},
            base_run=f"the base as a {precision} GGUF, in llama.cpp", stop=stop, float_type=torch.float32,
            lossy=True, judged_logits=precision in JUDGED_BY_LOGITS, stored_lora={
                name: tuple(gguf.rounded(factor, quant) for factor in module.lora())
                for name, module in factors.modules.items()} if adapter and quant != "F32" else None,
            simulate=ggml_arithmetic(precision if precision in JUDGED_BY_LOGITS else "Q8_0"))  # ggml's Q8_K
        base_check = verify_base_gguf(base, checked_logits[0], sequences, gguf.file_quant(checked), prompt_source)
    failed = (report.failed_checks + tokenization
              + [f"the base GGUF vs transformers: {check}" for check in base_check.failed_checks])
    form = "LoRA GGUF on the base's GGUF" if adapter else "GGUF model"
    return Report(report.mode, report.dtype, f"{form}, run by llama.cpp: {report.tolerance}; {base_check.tolerance}",
                  failed, {**report.numbers, "runtime": "llama.cpp (llama-cpp-python)", "gguf": file.name,
                           "base_gguf": base_check.to_dict()})


def _base_files(base: BaseCheckpoint, shipped: Path | None, quant: str, scratch: Path) -> tuple[Path, Path]:
    """The base GGUF to run the candidate against, and the file to check against transformers:
    ``shipped`` where it exists (both; it must be of a type that check simulates); else the base
    written into ``scratch`` as ``quant``, checked as written, or where llama.cpp's quantizer makes
    that type, the F32 file psoft-deploy's writer wrote for it (the quantizer is llama.cpp's own)."""
    if shipped is not None and shipped.is_file():
        if gguf.file_quant(shipped) not in JUDGED_BY_LOGITS:
            raise UserError(f"{shipped} holds {gguf.file_quant(shipped)}; a LoRA GGUF is verified on a base GGUF "
                            f"beside it of type {', '.join(JUDGED_BY_LOGITS)} (or none: one is written here)")
        return shipped, shipped
    checked_type = quant if quant in JUDGED_BY_LOGITS else "F32"
    checked = scratch / f"base-{checked_type}.gguf"
    gguf.write_model(base.path, checked, checked_type)
    if checked_type == quant:
        return checked, checked
    gguf.quantize(checked, scratch / "base.gguf", quant)
    return scratch / "base.gguf", checked


def ggml_arithmetic(quant: str) -> Simulation:
    """llama.cpp's arithmetic on a GGUF of type ``quant``: each matmul's input rounded to that type,
    attention's queries, keys and values to float16 (its KV cache)."""

    def apply(model: torch.nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda module, args: gguf.rounded(args[0].flatten(0, -2), quant)
                                                 .reshape(args[0].shape))
        round_attention(model, torch.float16)

    return Simulation(f"with each matmul's input in {quant} and attention's q, k, v in float16", apply)


def verify_base_gguf(base: BaseCheckpoint, logits: torch.Tensor, sequences: list[list[int]], quant: str,
                     prompt_source: str) -> Report:
    """The base GGUF's ``logits`` (llama.cpp on ``sequences``, each from position 0) `judge`d against
    transformers' base in float64, the noise being transformers' base in float32 as ggml computes
    a GGUF of type ``quant``: 2-d weights and each matmul's input rounded to that type, queries,
    keys and values to F16 (llama.cpp's KV cache). A correct file measured 0.4–1.6× that noise
    (max, mean, KL; F32 to Q8_0, the tests' tiny and 24-layer models). The simulation takes nothing
    from the file or the writer's layout, so a file that computes another model (q/k rows in the
    wrong order, a tensor under the wrong name) fails."""

    def forward(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(input_ids=torch.tensor([tokens])).logits[0].double() for tokens in sequences])

    truth = forward(load_base_model(base.path, torch.float64))
    simulated = load_base_model(base.path, torch.float32)
    with torch.no_grad():
        for parameter in simulated.parameters():
            if parameter.dim() > 1:
                parameter.copy_(gguf.rounded(parameter, quant))
    ggml_arithmetic(quant).apply(simulated)
    report = judge({"truth": truth, "precision": compare_logits(truth, forward(simulated)), "rounding": None,
                    "bare_base": None}, compare_logits(truth, logits), quant, prompt_source)
    factors = bound_factors(truth.numel())
    tolerance = (f"the base GGUF ({quant}), run by llama.cpp, deviates from transformers' base in float64 by max "
                 f"|Δ| ≤ {MAX_LOGIT_NOISE:g}×, mean |Δ| ≤ {factors['mean_abs_logits']:g}× and KL ≤ "
                 f"{factors['kl_divergence']:g}× what transformers' base in float32 does with its weights and matmul "
                 f"inputs rounded to {quant}, queries, keys and values to F16 (measured in this run), with the same "
                 f"top-1 where the margin exceeds {DECISIVE_MARGIN:g}× that")
    kept = ("prompts", "positions", *STATISTICS, "top1_agreement", "bounds", "decisive_top1_agreement")
    return Report("full", quant, tolerance, report.failed_checks, {key: report.numbers[key] for key in kept})


def _tokenization_differences(runtime: LlamaCpp, base_dir: Path, sequences: list[list[int]]) -> list[str]:
    """A failed check if llama.cpp tokenizes any prompt's text otherwise than the base's tokenizer
    (the text decoded from the prompt's tokens; prompts that do not survive that round trip in the
    tokenizer itself are skipped)."""
    if not (base_dir / "tokenizer.json").is_file():
        return []
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    compared = differing = 0
    for tokens in sequences:
        text = tokenizer.decode(tokens)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != tokens:
            continue
        compared += 1
        differing += runtime.tokenize(text) != tokens
    return [f"llama.cpp tokenizes {differing} of {compared} prompts otherwise than the tokenizer"] if differing else []

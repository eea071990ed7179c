"""GGUF files, verified by llama.cpp itself (llama-cpp-python): a LoRA GGUF applied to the base
written as a GGUF of the same type, or a merged model file, each run against the float64 truth
(`runtimes.judge_in_runtime`); the base's GGUF of that type, run by llama.cpp, is the noise. Also
checked: llama.cpp tokenizes the prompts' text as the base's tokenizer does."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from psoft_deploy.base import BaseCheckpoint
from psoft_deploy.converters import gguf
from psoft_deploy.dtypes import GGUF_FILE_TYPES
from psoft_deploy.errors import UserError
from psoft_deploy.factors import AdapterFactors
from psoft_deploy.generate import eos_token_ids

from .inputs import prompt_sequences, verification_inputs
from .report import Report
from .rule import GENERATED_TOKENS
from .runtimes import judge_in_runtime


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
    """Verify a GGUF model file, or a LoRA GGUF on the base written as a GGUF of its type, in
    llama.cpp, in full mode at any size (as torch.onnx graphs): F32, F16, BF16 and Q8_0 by the
    logits bounds and behaviour, lower types by behaviour alone (`gguf.JUDGED_BY_LOGITS`)."""
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
        base_file = Path(scratch) / "base.gguf"
        gguf.write_model(base.path, base_file, quant)
        files = {"candidate": (base_file, file) if adapter else (file, None), "base": (base_file, None)}
        tokenization = []

        @contextmanager
        def runtime():
            loaded = LlamaCpp(files, context, stop)
            try:
                tokenization.extend(_tokenization_differences(loaded, base.path, sequences))
                yield loaded
            finally:
                loaded.close()

        report = judge_in_runtime(
            base, factors, sequences, prompt_source, quant, runtime, names={"candidate": "candidate", "base": "base"},
            base_run=f"the base written as a {quant} GGUF, in llama.cpp", stop=stop, float_type=torch.float32,
            lossy=True, judged_logits=quant in gguf.JUDGED_BY_LOGITS, stored_lora={
                name: tuple(gguf.rounded(factor, quant) for factor in module.lora())
                for name, module in factors.modules.items()} if adapter and quant != "F32" else None,
            attention_type=torch.float16)  # llama.cpp's KV cache, and the queries multiplied with it
    failed = report.failed_checks + tokenization
    form = "LoRA GGUF on the base's GGUF" if adapter else "GGUF model"
    return Report(report.mode, report.dtype, f"{form}, run by llama.cpp: {report.tolerance}", failed,
                  {**report.numbers, "runtime": "llama.cpp (llama-cpp-python)", "gguf": file.name})


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

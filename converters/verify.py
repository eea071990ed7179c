"""`psoft-deploy verify`: compare a converted artifact (merged model, LoRA adapter, ONNX export)
with the reference PSOFT forward, against tolerances measured in the same run.

The reference is the base with the adapter applied through `PsoftLinear` (for PEFT adapters
this equals PEFT's own forward; the tests pin it). What is compared depends on the model's
family (`model_family`): logits of causal LMs, seq2seq decoders, classifiers and image
classifiers; hidden states of encoders. Two modes:

* ``full``: the reference runs in float64 (the truth). What the candidate's precision does on
  its own is measured by running the reference again in that dtype, and what rounding the
  conversion adds by running the truth with each adapted weight replaced by ``W + ΔW`` rounded
  to that dtype. The candidate's max and mean |Δlogits| and its KL divergence from the truth
  may be at most `bound_factors` times that noise, and its top-1 token must
  agree at every position whose margin the noise cannot close. The bare base is held to the
  same bounds as a control: where it would pass too, the check cannot tell the adapter apart
  and fails as inconclusive.
* ``layerwise``: for a model too large for a float64 forward, or a base without a transformers
  config, each merged weight (or LoRA pair) is checked on random
  inputs against ``W + ΔW`` (float64), within `NOISE_FACTOR` times what rounding a correct
  merge to the candidate's dtype costs that layer; every other tensor must equal the base's
  (or the adapter's ``modules_to_save``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from psoft_deploy.base import BaseCheckpoint, open_safetensors
from psoft_deploy.converters.lora import read_export_metadata
from psoft_deploy.converters.merge import stored_deltas, stored_replacements
from psoft_deploy.errors import UserError
from psoft_deploy.factors import AdapterFactors, base_tensor_key
from psoft_deploy.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, read_json
from psoft_deploy.layer import PsoftLinear, replace_module
from psoft_deploy.model import load_base_model, reference_model
from psoft_deploy.streaming import torch_dtype

# Plain-text verification prompts, for tokenizers without a chat template.
DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning the river carried water from the hills",
    "def fibonacci(n):\n    return n if n < 2 else",
    "Question: what is the capital of France? Answer:",
]
# Conversations rendered with the tokenizer's chat template where it has one: the template's
# own tokens (turn markers, role names) are decisions a chat model makes with confidence.
DEFAULT_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And the capital of Italy?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "user", "content": "Complete the code: def fibonacci(n):\n    return n if n < 2 else"}],
    [{"role": "user", "content": "Name three colours."},
     {"role": "assistant", "content": "Red, green and blue."},
     {"role": "user", "content": "Which one is the colour of the sky?"}],
]
# The float64 truth costs 8 bytes a parameter: auto mode verifies larger models layer by layer.
FULL_MODE_MAX_PARAMETERS = 500_000_000
# A candidate may deviate from the float64 truth by these multiples of the noise measured in the
# same run (its precision's own effect plus the rounding of the converted weights): its largest
# |Δlogit| by NOISE_FACTOR (a single extreme value fluctuates), its mean |Δlogit| by
# MEAN_NOISE_FACTOR and its mean KL by the square of that (averages over every position and class
# are stable; a correct candidate measures at 0.6–1.1× the noise). Averages over fewer than
# STABLE_AVERAGE_VALUES values (a classifier's few logits) are held to NOISE_FACTOR like the max.
NOISE_FACTOR = 4.0
MEAN_NOISE_FACTOR = 2.0
STABLE_AVERAGE_VALUES = 1000
# Top-1 agreement is judged where the truth's top-1 margin exceeds 2 × NOISE_FACTOR × the noise at
# that position (more than a correct candidate's deviation can close), if there are this many.
MIN_DECISIVE_POSITIONS = 8
# Lossy exports (fp16, int4) are also judged by what a user sees (`judge_behaviour`): top-1 decisions
# and greedy continuations of GENERATED_TOKENS tokens per prompt.
GENERATED_TOKENS = 16
BEHAVIOUR_SLACK = {"top-1 decisions": 2, "continuation tokens": GENERATED_TOKENS}
LOSSY_PRECISIONS = ("fp16", "int4")
# Truncated LoRA exports: measured vs recorded optimal rank-k error, per layer.
TRUNCATION_GAP = 1e-4
STATISTICS = ("max_abs_logits", "mean_abs_logits", "kl_divergence")


def bound_factors(values: int) -> dict[str, float]:
    """The multiple of the measured noise each statistic may reach, over ``values`` compared values."""
    mean = MEAN_NOISE_FACTOR if values >= STABLE_AVERAGE_VALUES else NOISE_FACTOR
    return {"max_abs_logits": NOISE_FACTOR, "mean_abs_logits": mean, "kl_divergence": mean ** 2}


@dataclass(frozen=True)
class Family:
    """How a kind of model is run and compared: the outputs compared (``logits`` are
    distributions: KL and top-1 apply; hidden states are compared by |Δ| alone) and which mask
    marks their real positions."""

    name: str
    outputs: tuple[str, ...] = ("logits",)
    mask: str | None = "attention_mask"

    @property
    def distribution(self) -> bool:
        return self.outputs == ("logits",)


FAMILIES = {
    "causal-lm": Family("causal-lm"),
    "seq2seq": Family("seq2seq", mask="decoder_attention_mask"),
    "classifier": Family("classifier"),
    "image-classifier": Family("image-classifier", mask=None),
    "encoder": Family("encoder", outputs=("last_hidden_state", "pooler_output")),
}


def model_family(config: dict) -> Family:
    """The family of a transformers model, from its ``config.json``: causal LM, seq2seq (T5,
    BART), sequence/token classifier, image classifier (ViT) or encoder (feature extraction)."""
    architecture = (config.get("architectures") or [""])[0]
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return FAMILIES["causal-lm"]
    if config.get("is_encoder_decoder"):
        return FAMILIES["seq2seq"]
    if architecture.endswith("ForImageClassification"):
        return FAMILIES["image-classifier"]
    if architecture.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return FAMILIES["classifier"]
    return FAMILIES["encoder"]


def read_prompts(file: Path) -> list[str | list[dict]]:
    """Verification prompts from ``file``: JSON lines (``{"text": ...}`` or ``{"messages": [...]}``,
    a chat rendered with the tokenizer's template) or one plain prompt per line."""
    lines = [line for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"--prompts {file} holds no prompt")
    if not all(line.lstrip().startswith("{") for line in lines):
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"--prompts {file}: line {number} is not valid JSON") from None
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            prompts.append(record["messages"])
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            prompts.append(record["text"])
        else:
            raise UserError(f'--prompts {file}: line {number} has neither a "text" string nor a "messages" list')
    return prompts


def verification_inputs(model_dirs: list[Path], prompts, config: dict) -> tuple[dict, str]:
    """The model inputs verification runs on (``config``: the base's) and what they are:
    deterministic images for image classifiers; else tokenized prompts (tokenizer of the first
    directory that has one): the given ones, else chat conversations where the tokenizer has a
    chat template, else plain text; without a tokenizer, fixed token ids. Seq2seq models get the
    prompts shifted right as decoder inputs."""
    family = model_family(config)
    generator = torch.Generator().manual_seed(0)
    if family.name == "image-classifier":
        if prompts:
            raise UserError("--prompts does not apply to an image classifier (it is verified on fixed images)")
        size = config.get("image_size", 224)
        images = torch.randn(4, config.get("num_channels", 3), size, size, generator=generator)
        return {"pixel_values": images}, "4 fixed random images"
    inputs, source = _text_inputs(model_dirs, prompts, config.get("vocab_size", 2), generator)
    if family.name == "seq2seq":
        start = torch.full_like(inputs["input_ids"][:, :1], config.get("decoder_start_token_id") or 0)
        inputs["decoder_input_ids"] = torch.cat([start, inputs["input_ids"][:, :-1]], dim=1)
        inputs["decoder_attention_mask"] = torch.cat([torch.ones_like(start), inputs["attention_mask"][:, :-1]], 1)
    return inputs, source


def _text_inputs(model_dirs: list[Path], prompts, vocab_size: int, generator) -> tuple[dict, str]:
    directory = next((d for d in model_dirs if (d / "tokenizer.json").is_file()
                      or (d / "tokenizer_config.json").is_file()), None)
    if directory is None:
        if prompts:
            raise UserError("--prompts needs a tokenizer in the base or candidate directory")
        ids = torch.randint(0, vocab_size, (4, 16), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "fixed token ids (no tokenizer)"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if prompts:
        encoded, source = [_encode(tokenizer, prompt) for prompt in prompts], f"{len(prompts)} given prompts"
    else:
        encoded = []
        if tokenizer.chat_template:
            for conversation in DEFAULT_CONVERSATIONS:
                try:
                    encoded.append(_encode(tokenizer, conversation))
                except Exception:  # a template that refuses a role or a turn order: use the others
                    continue
        source = f"{len(encoded)} chat conversations (the tokenizer's template)"
        if not encoded:
            encoded, source = [_encode(tokenizer, text) for text in DEFAULT_PROMPTS], "plain-text prompts"
    batch = tokenizer.pad([{"input_ids": ids} for ids in encoded], padding=True, return_tensors="pt")
    return dict(batch), source


def _encode(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a plain prompt, or of a chat rendered with the tokenizer's template (a
    generation prompt added when the last turn is not the assistant's)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if not tokenizer.chat_template:
        raise UserError("a prompt is given as chat messages, but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(prompt, tokenize=False,
                                         add_generation_prompt=prompt[-1].get("role") != "assistant")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def real_positions(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Outputs as (positions, classes or features) in float64, padding dropped."""
    if logits.dim() == 3 and mask is not None:
        logits = logits[mask.bool()]
    return logits.double().reshape(-1, logits.shape[-1])


def family_outputs(outputs, family: Family, inputs: dict) -> torch.Tensor:
    """The outputs ``family`` compares, as one (positions, classes or features) float64 tensor."""
    mask = inputs.get(family.mask) if family.mask else None
    parts = [real_positions(outputs[name], mask) for name in family.outputs if outputs.get(name) is not None]
    return torch.cat(parts)


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


def candidate_dtype(candidate: BaseCheckpoint, factors: AdapterFactors) -> torch.dtype:
    """The dtype the candidate stores its adapted weights in."""
    first = base_tensor_key(next(iter(factors.modules)))
    return candidate.tensor(first).dtype


def reference_runs(base: BaseCheckpoint, factors: AdapterFactors | None, dtype: torch.dtype, forward) -> dict:
    """The float64 truth, and deviations from it: the reference forward in ``dtype`` (what the
    precision does alone), the truth with every adapted weight replaced by ``W + ΔW`` as a
    correct merge to ``dtype`` stores it (what rounding the conversion adds), and the bare base
    (``modules_to_save`` tensors included)."""
    model = reference_model(base.path, factors, torch.float64)
    truth = forward(model)
    runs = {"truth": truth}
    if factors is None:
        runs["rounding"] = None
        runs["bare_base"] = None
    else:
        weights, psoft_layers = {}, {}
        for name in factors.modules:
            psoft_layers[name] = model.get_submodule(name)
            replace_module(model, name, psoft_layers[name].base_layer)
            weights[name] = psoft_layers[name].base_layer.weight.data
        for name, layer in psoft_layers.items():
            model.get_submodule(name).weight.data = _reference_merged_weight(layer).float().to(dtype).double()
        runs["rounding"] = compare_logits(truth, forward(model))
        for name, original in weights.items():
            model.get_submodule(name).weight.data = original
        model.load_state_dict({key: base.tensor(key).double() for key in factors.replaced_tensors}, strict=False)
        runs["bare_base"] = compare_logits(truth, forward(model))
    del model
    runs["precision"] = compare_logits(truth, forward(reference_model(base.path, factors, dtype)))
    return runs


def _reference_merged_weight(layer: PsoftLinear, chunk: int = 1024) -> torch.Tensor:
    """``W + ΔW`` in float64, ΔW as the reference layer computes it (its update applied to the
    identity, ``chunk`` columns at a time), independently of the dense ΔW the converters build."""
    size = layer.base_layer.in_features
    with torch.no_grad():
        delta = torch.cat([layer.update(torch.eye(size, dtype=torch.float64)[start:start + chunk]).T
                           for start in range(0, size, chunk)], dim=1)
    return layer.base_layer.weight.double() + delta


def verify_full(
    base: BaseCheckpoint, factors: AdapterFactors | None, candidate_dir: Path, prompts=None, *, kind: str = "merged",
    adapter_file: Path | None = None,
) -> dict:
    """Run the candidate and the reference on the verification prompts and judge the candidate
    by the noise measured in the same run (see the module docstring).

    ``kind`` is ``merged`` (a model directory, run by transformers), ``lora`` (an adapter loaded
    onto the base by PEFT's own LoRA code, independent of ours) or ``onnx`` (an exported graph,
    run by onnxruntime, with ``adapter_file`` active when given). ``factors`` None means the
    candidate should be the bare base."""
    if kind == "lora":
        dtype = lora_dtype(candidate_dir)
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


def judge(runs: dict, candidate: dict, dtype: torch.dtype | str, prompt_source: str,
          family: Family = FAMILIES["causal-lm"], noise_source: str | None = None) -> dict:
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
        decisive = (top2[:, 0] - top2[:, 1]) > 2 * NOISE_FACTOR * position_noise
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
                          f"{_name(dtype)}'s own noise on these prompts); verify a float32 artifact, with "
                          "--verify-mode layerwise, or with prompts where the adapter matters (--prompts)")
    name = dtype if isinstance(dtype, str) else _name(dtype)
    noise_source = noise_source or (f"{name} alone: the reference in {name} vs float64, plus the rounding of the "
                                    f"converted weights to {name}")
    kl = f" and KL ≤ {factors['kl_divergence']:g}×" if family.distribution else ""
    top1 = (f"; top-1 agreement where the float64 margin exceeds {2 * NOISE_FACTOR:g}× that noise (if ≥ "
            f"{MIN_DECISIVE_POSITIONS} such positions)" if family.distribution else "")
    tolerance = (f"max |Δ| ≤ {NOISE_FACTOR:g}×, mean |Δ| ≤ {factors['mean_abs_logits']:g}×{kl} the noise measured in this "
                 f"run ({noise_source}){top1}; the bare base must fail these bounds")
    return {
        "mode": "full",
        "family": family.name,
        "compared": list(family.outputs),
        "dtype": name,
        "tolerance": tolerance,
        "passed": not failed,
        "failed_checks": failed,
        "prompts": prompt_source,
        "positions": truth.shape[0],
        **{stat: candidate[stat] for stat in (*STATISTICS, "top1_agreement")},
        "bounds": bounds,
        "noise": {"precision": _public(precision), "rounding": _public(rounding) if rounding else None},
        "decisive_positions": decisive_count,
        "decisive_top1_agreement": decisive_agreement,
        "bare_base": control,
    }


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _public(stats: dict) -> dict:
    """The JSON-ready statistics of `compare_logits` (per-position tensors left out)."""
    return {key: value for key, value in stats.items() if not isinstance(value, torch.Tensor)}


def verify_genai(base: BaseCheckpoint, factors: AdapterFactors, export_dir: Path, prompts=None, *,
                 adapter_file: Path | None = None, mode: str = "auto") -> dict:
    """Verify an onnxruntime-genai export with its own adapter, or with ``adapter_file`` active.

    ``full``: as `verify_full`, except that the noise is what the export's precision does to the
    base: the same graph with every LoRA input at rank 0, against the base in float64 (for int4,
    the quantized base). ``layerwise`` (auto above `FULL_MODE_MAX_PARAMETERS`, or where the
    export's execution provider is missing): each module's LoRA factors in the export against the
    exact ΔW, and the graph at rank 0 against the base (`_verify_base_graph`); a graph that cannot
    run here fails as inconclusive."""
    from psoft_deploy.converters import genai

    record = genai.export_record(export_dir)
    precision = record.get("precision", "onnxruntime-genai")
    arrays = genai.read_adapter_file(adapter_file) if adapter_file else genai.graph_lora_arrays(export_dir)
    provider = record.get("execution_provider", "cpu")
    runs_here = genai.provider_available(provider)
    if mode == "full" and not runs_here:
        raise UserError(f"{export_dir} is built for {provider}, which onnxruntime-genai cannot use on this machine; "
                        f"verify it on a machine with {provider}")
    if not runs_here or _resolve_mode(mode, base) == "layerwise":
        graph = _verify_base_graph(base, export_dir, arrays, precision, prompts) if runs_here else (
            f"inconclusive: the graph was not run ({provider} is not available here), and its LoRA factors alone do "
            f"not show that it computes the model; verify it on a machine with {provider}, or export with "
            "--no-verify to write it unverified")
        return _verify_lora_arrays(factors, arrays, precision, graph)
    family = FAMILIES["causal-lm"]
    inputs, prompt_source = verification_inputs([export_dir, base.path], prompts, base.config)
    sequences = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    inputs = _right_padded(sequences)  # the graph runs each sequence alone: positions from 0

    def forward(model) -> torch.Tensor:
        with torch.no_grad():
            return family_outputs(model(**inputs), family, inputs)

    lossy = precision in LOSSY_PRECISIONS
    stop = genai.eos_token_ids(export_dir)

    def continuations(model) -> list[list[int]]:
        return [_torch_greedy(model, tokens, GENERATED_TOKENS, stop) for tokens in sequences] if lossy else []

    model = reference_model(base.path, factors, torch.float64)
    truth, truth_continuations = forward(model), continuations(model)
    for name in factors.modules:
        replace_module(model, name, model.get_submodule(name).base_layer)
    model.load_state_dict({key: base.tensor(key).double() for key in factors.replaced_tensors}, strict=False)
    base_truth, base_continuations = forward(model), continuations(model)
    del model
    with tempfile.TemporaryDirectory() as scratch:
        files = {"base": Path(scratch) / "rank0.onnx_adapter"}
        genai.write_adapter_file({name: genai.rank_zero(name, array) for name, array in arrays.items()},
                                 files["base"])
        if adapter_file:
            files["candidate"] = adapter_file
        graph = genai.GenaiModel(export_dir, files)

        def graph_outputs(adapter: str | None) -> torch.Tensor:
            return torch.cat([torch.from_numpy(graph.logits(tokens, adapter)) for tokens in sequences])

        candidate, graph_base = graph_outputs("candidate" if adapter_file else None), graph_outputs("base")
        if lossy:
            graph_continuations = {adapter: [graph.greedy(tokens, adapter, GENERATED_TOKENS) for tokens in sequences]
                                   for adapter in ("candidate" if adapter_file else None, "base")}
    # The precision's deviation on the base, carried onto the adapted truth (KL depends on the
    # distribution it is measured on; |Δ| is the base's own), plus the float arithmetic of the
    # update: the reference in the graph's float type.
    float_type = getattr(torch, genai.logits_type(export_dir).name)
    runs = {"truth": truth, "precision": compare_logits(truth, truth + (graph_base - base_truth)),
            "rounding": compare_logits(truth, forward(reference_model(base.path, factors, float_type))),
            "bare_base": compare_logits(truth, graph_base)}
    report = judge(runs, compare_logits(truth, candidate), precision, prompt_source, family,
                   noise_source=f"{precision} alone: this graph with every LoRA input at rank 0 (the base at "
                                f"{precision}) minus the base in float64, carried onto the float64 truth, plus the "
                                f"reference in {_name(float_type)} vs float64")
    if lossy:
        report = with_behaviour(report, judge_behaviour(
            {"truth": truth, "base_truth": base_truth, "candidate": candidate, "graph_base": graph_base},
            {"truth": truth_continuations, "base_truth": base_continuations,
             "candidate": graph_continuations["candidate" if adapter_file else None],
             "graph_base": graph_continuations["base"]}, precision))
    graph_check = _verify_base_graph(base, export_dir, arrays, precision, prompts)
    failed = report["failed_checks"] + [f"the graph at rank 0 vs the base: {check}"
                                        for check in graph_check["failed_checks"]]
    return {**report, "passed": not failed, "failed_checks": failed, "graph_at_rank_zero": graph_check}


def _torch_greedy(model, tokens: list[int], count: int, stop: set[int]) -> list[int]:
    """``count`` greedy tokens after ``tokens`` (fewer if one in ``stop`` comes first, kept)."""
    new: list[int] = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), use_cache=True)
        while True:
            new.append(int(out.logits[0, -1].argmax()))
            if new[-1] in stop or len(new) == count:
                return new
            out = model(input_ids=torch.tensor([new[-1:]]), past_key_values=out.past_key_values, use_cache=True)


def _margin(logits: torch.Tensor) -> torch.Tensor:
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
    exceeds 2×`NOISE_FACTOR` the precision's noise at that position (|Δ| of the graph at rank 0
    from the base in float64; a near-tie is no evidence), and tokens of greedy continuations
    before they part. The graph at rank 0 (the base at ``precision``) against the
    base in float64 measures what the precision loses and keeps; the candidate against the truth
    may lose at most `MEAN_NOISE_FACTOR`× as much (plus `BEHAVIOUR_SLACK`: a few decisions, one
    prompt's continuation) and must keep at least 1/`MEAN_NOISE_FACTOR` as much: a gentle precision
    (fp16) is held by the first bound, a destructive one (int4 on a small model) by the second. The
    bare base is held to the same bounds against the truth; where it passes too, that kind of
    agreement cannot tell the adapter apart (inconclusive). ``logits``: truth, base_truth,
    candidate, graph_base (positions × vocabulary); ``continuations``: the same four, one token
    list per prompt."""
    top1 = {name: values.argmax(-1) for name, values in logits.items()}
    noise = (logits["graph_base"] - logits["base_truth"]).abs().amax(-1)
    decisive = {name: _margin(logits[name]) > 2 * NOISE_FACTOR * noise for name in ("truth", "base_truth")}

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
        least = max(precision_kept / MEAN_NOISE_FACTOR,
                    total - MEAN_NOISE_FACTOR * (total - precision_kept) - BEHAVIOUR_SLACK[kind])
        checks[kind] = {"of": total, "least": least, **{who: counts[kind] for who, counts in kept.items()}}
        if kept["candidate"][kind] < least:
            failed.append(f"{kind} kept {kept['candidate'][kind]}/{total} < {least:.3g} ({precision} keeps "
                          f"{kept['precision'][kind]}/{base_totals[kind]} on the base)")
        if kept["bare_base"][kind] < least:
            conclusive.append(kind)
    return {"kept": checks, "failed_checks": failed, "conclusive": conclusive,
            "tolerance": f"behaviour: of the top-1 decisions and {GENERATED_TOKENS}-token greedy continuations of "
                         f"the float64 truth, the candidate keeps ≥ 1/{MEAN_NOISE_FACTOR:g} of and loses ≤ "
                         f"{MEAN_NOISE_FACTOR:g}× (+{BEHAVIOUR_SLACK['top-1 decisions']} decisions, +1 continuation) "
                         "what this graph at rank 0 keeps and loses of the base in float64; the bare base must fall "
                         "short"}


def with_behaviour(report: dict, behaviour: dict) -> dict:
    """A lossy export's verdict. int4: the behaviour rule alone (`judge_behaviour`); the logits
    statistics are reported, not judged: at int4 the bounds scale with a noise as large as the
    adapter's effect, and on a trained adapter they passed a collapsed export and failed a working
    one (docs/int4.md). fp16: both rules, every conclusive check passing and at least one
    conclusive. Where nothing can tell the bare base from the adapter: FAIL, inconclusive."""
    judged_logits = report["dtype"] != "int4"
    logits_conclusive = judged_logits and not report["bare_base"]["passes_bounds"]
    failed = [check for check in report["failed_checks"] if judged_logits and not check.startswith("inconclusive")]
    failed += behaviour["failed_checks"]
    if not (logits_conclusive or behaviour["conclusive"]):
        failed.append(f"inconclusive: the bare base is within every bound too (on these prompts the adapter's effect "
                      f"is below {report['dtype']}'s own loss); verify with prompts where the adapter changes the "
                      "answers (--prompts)")
    tolerance = behaviour["tolerance"] + (f"; {report['tolerance']}" if judged_logits else
                                          " (the logits' deviation is reported, not judged, at int4)")
    return {**report, "passed": not failed, "failed_checks": failed, "tolerance": tolerance,
            "behaviour": {key: behaviour[key] for key in ("kept", "conclusive")}}


def _right_padded(sequences: list[list[int]]) -> dict:
    length = max(len(tokens) for tokens in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(sequences):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _verify_base_graph(base: BaseCheckpoint, export_dir: Path, arrays: dict, precision: str, prompts) -> dict:
    """Run the export's graph with every LoRA input at rank 0 (the base as the export computes it)
    on the verification prompts and `judge` it against the base in float64 (float32 above
    `FULL_MODE_MAX_PARAMETERS`), the noise being that of the base simulated in torch at the export's
    precision, measured in this run: float32 (bfloat16 against a float32 reference: looser), float16,
    or float32 with the weights rounded as the builder's int4 stores them. The simulation does not
    come from the graph, so a graph that computes something else than the base (a head wired onto a
    layer: off by the logits' own scale, top-1 mostly wrong) fails at every precision, while a
    correct one measures at most 2.5× that noise (max, mean and KL) on the tests' models."""
    from psoft_deploy.converters import genai

    inputs, prompt_source = verification_inputs([export_dir, base.path], prompts, base.config)
    sequences = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]

    def forward(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(input_ids=torch.tensor([tokens])).logits[0].double() for tokens in sequences])

    big = parameter_count(base) > FULL_MODE_MAX_PARAMETERS
    reference = torch.float32 if big else torch.float64
    simulated = {"fp16": torch.float16, "fp32": torch.bfloat16 if big else torch.float32}.get(precision, torch.float32)
    truth = forward(load_base_model(base.path, reference))
    noise = compare_logits(truth, forward(genai.round_like_builder(load_base_model(base.path, simulated), precision)))
    with tempfile.TemporaryDirectory() as scratch:
        file = Path(scratch) / "rank0.onnx_adapter"
        if arrays:
            genai.write_adapter_file({name: genai.rank_zero(name, array) for name, array in arrays.items()}, file)
        graph = genai.GenaiModel(export_dir, {"base": file} if arrays else None)
        actual = torch.cat([torch.from_numpy(graph.logits(tokens, "base" if arrays else None)) for tokens in sequences])
    report = judge({"truth": truth, "precision": noise, "rounding": None, "bare_base": None},
                   compare_logits(truth, actual), precision, prompt_source)
    if precision == "int4":  # the simulation rounds to nearest, the export k-quantizes: the sizes of their
        # errors compare, not their shapes (KL weighs the few largest logits; seen 1.5× on a tiny Qwen2)
        report["failed_checks"] = [check for check in report["failed_checks"] if not check.startswith("kl_")]
        report["passed"] = not report["failed_checks"]
    simulation = _name(simulated) + (" with int4-rounded weights and int8-rounded inputs" if precision == "int4"
                                     else "")
    factors = bound_factors(truth.numel())
    return {**{key: report[key] for key in ("passed", "failed_checks", "prompts", "positions", *STATISTICS,
                                            "top1_agreement", "bounds", "decisive_top1_agreement")},
            "reference": _name(reference), "simulation": simulation,
            "tolerance": f"this graph with every LoRA input at rank 0, run on {prompt_source}, deviates from the base "
                         f"in {_name(reference)} by max |Δ| ≤ {NOISE_FACTOR:g}×, mean |Δ| ≤ "
                         f"{factors['mean_abs_logits']:g}× and (but at int4) KL ≤ {factors['kl_divergence']:g}× what "
                         "the base in "
                         f"{simulation} does (measured in this run), with the same top-1 where the margin exceeds "
                         f"{2 * NOISE_FACTOR:g}× that"}


def verify_base_export(base: BaseCheckpoint, export_dir: Path, prompts=None) -> dict:
    """Verify an onnxruntime-genai export of the base alone: its graph against the base
    (`_verify_base_graph`), the one check there is."""
    from psoft_deploy.converters import genai

    record = genai.export_record(export_dir)
    provider, precision = record.get("execution_provider", "cpu"), record.get("precision", "fp32")
    if not genai.provider_available(provider):
        raise UserError(f"{export_dir} is built for {provider}, which onnxruntime-genai cannot use on this machine; "
                        f"verify it on a machine with {provider}, or export with --no-verify")
    report = _verify_base_graph(base, export_dir, {}, precision, prompts)
    return {**report, "mode": "full", "family": "causal-lm", "compared": ["logits"], "dtype": precision,
            "bare_base": None}


def _verify_lora_arrays(factors: AdapterFactors, arrays: dict, precision: str, graph: dict | str) -> dict:
    """Each module's LoRA factors as an export holds them (builder layout: transposed) against the
    exact ΔW, within `NOISE_FACTOR` times the error of rounding the exact factors to their type;
    with ``graph``, the run of the graph at rank 0 (`_verify_base_graph`), or why it was not run
    (then the verdict is FAIL: factors alone do not show the graph computes the model)."""
    from psoft_deploy.converters.genai import lora_input

    failed, errors, ratios = [], {}, {}
    for module, module_factors in factors.modules.items():
        names = [lora_input(module, factor) for factor in ("lora_A", "lora_B")]
        if any(name not in arrays or 0 in arrays[name].shape for name in names):
            failed.append(f"{module}: no LoRA factors in the export")
            continue
        lora_A, lora_B = (factor.double() for factor in module_factors.lora())
        stored = torch.tensor(arrays[names[1]]).double().T @ torch.tensor(arrays[names[0]]).double().T
        dtype = torch.tensor(arrays[names[0]][:0]).dtype
        exact = lora_B @ lora_A
        scale = torch.linalg.norm(exact).clamp_min(torch.finfo(torch.float64).tiny)
        rounded = lora_B.to(dtype).double() @ lora_A.to(dtype).double()
        bound = NOISE_FACTOR * max((torch.linalg.norm(rounded - exact) / scale).item(), torch.finfo(dtype).eps)
        errors[module] = (torch.linalg.norm(stored - exact) / scale).item()
        ratios[module] = errors[module] / bound
        if errors[module] > bound:
            failed.append(f"{module}: relative error {errors[module]:.2e} > bound {bound:.2e}")
    if isinstance(graph, str):
        failed.append(graph)
    elif graph["failed_checks"]:
        failed.append(f"the graph at rank 0 vs the base: {', '.join(graph['failed_checks'])}")
    return {
        "mode": "layerwise",
        "family": "causal-lm",
        "dtype": precision,
        "tolerance": f"each module's LoRA factors in the export reproduce the exact ΔW within {NOISE_FACTOR:g}× what "
                     "rounding them to the graph's float type costs, and "
                     + ("the graph runs (not run here)" if isinstance(graph, str) else graph["tolerance"]),
        "passed": not failed,
        "failed_checks": failed,
        "layers_checked": len(errors),
        "max_layer_relative_error": max(errors.values(), default=0.0),
        "worst_ratio_to_bound": max(ratios.values(), default=0.0),
        "graph_at_rank_zero": None if isinstance(graph, str) else graph,
    }


def lora_dtype(candidate_dir: Path) -> torch.dtype:
    """The dtype of a LoRA adapter's weights."""
    with open_safetensors(candidate_dir / ADAPTER_WEIGHTS) as handle:
        return torch_dtype(handle.get_slice(next(iter(handle.keys()))).get_dtype())


def onnx_dtype(candidate_dir: Path) -> torch.dtype:
    """The floating dtype of an exported graph's (first) output."""
    import numpy as np
    import onnxruntime

    from psoft_deploy.generate import FLOAT_TYPES

    session = onnxruntime.InferenceSession(str(candidate_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    first = session.get_outputs()[0]
    return torch.from_numpy(np.empty(0, FLOAT_TYPES.get(first.type, np.float32))).dtype


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
    passed = worst_gap <= TRUNCATION_GAP
    return {
        "mode": "truncated-lora",
        "dtype": "float32",
        "tolerance": f"each layer's relative error within {TRUNCATION_GAP:g} of the optimal rank-k error recorded "
                     "at export",
        "passed": passed,
        "failed_checks": [] if passed else [f"{worst_layer} is {worst_gap:.1e} off its recorded error"],
        "max_layer_relative_error": max(errors.values()),
        "max_gap_to_recorded_error": worst_gap,
        "worst_layer": worst_layer,
        "layers_checked": len(errors),
    }


class LayerChecks:
    """Adapted weights checked one layer at a time (the layerwise modes). A candidate weight W'
    is run on random inputs x against the float64 ``(W + ΔW) x`` from the reference layer; its
    relative error may be at most `NOISE_FACTOR` × that of ``W + ΔW`` rounded to the candidate's
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
        merged = _reference_merged_weight(PsoftLinear(base_layer, factors))
        probe = torch.randn(weight.shape[1], 8, generator=self.generator, dtype=torch.float64)
        exact = merged @ probe

        def error(candidate_weight: torch.Tensor) -> float:
            return (torch.linalg.norm(candidate_weight.double() @ probe - exact) / torch.linalg.norm(exact)).item()

        bound = NOISE_FACTOR * max(error(merged.to(self.dtype)), torch.finfo(self.dtype).eps / 2)
        actual = error(candidate)
        self.layers += 1
        self.indistinct += error(weight) <= bound
        if actual / bound >= self.worst_ratio:
            self.worst_ratio, self.worst_layer, self.worst_error = actual / bound, name, actual

    def report(self, failed: list[str], **metrics) -> dict:
        """The layerwise report, with ``failed`` checks of the caller's own added."""
        name = _name(self.dtype)
        if self.worst_ratio > 1:
            failed.insert(0, f"{self.worst_layer} is {self.worst_ratio:.3g}× its bound")
        if self.layers and self.indistinct == self.layers:
            failed.append(f"inconclusive: in {name} every adapted layer of the bare base is within its bound too")
        return {
            "mode": "layerwise",
            "dtype": name,
            "tolerance": (f"per adapted layer, relative error on random inputs ≤ {NOISE_FACTOR:g}× that of W + ΔW "
                          f"rounded to {name} (measured per layer in this run); the bare base must fail"),
            "passed": not failed,
            "failed_checks": failed,
            "max_layer_relative_error": self.worst_error,
            "worst_layer": self.worst_layer,
            "worst_ratio_to_bound": self.worst_ratio,
            "layers_checked": self.layers,
            "layers_where_the_bare_base_passes": self.indistinct,
            **metrics,
        }


def verify_layerwise(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path) -> dict:
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


def verify_lora_layerwise(base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path) -> dict:
    """Check a LoRA adapter layer by layer: ``W + scaling · lora_B lora_A`` (PEFT's scaling,
    ``rank_pattern`` and ``alpha_pattern`` included) by `LayerChecks`, for every module the PSOFT
    adapter adapts; a LoRA module the adapter does not adapt, or one it lacks, fails."""
    from peft.utils.other import get_pattern_key

    config = read_json(candidate_dir / ADAPTER_CONFIG)
    if config.get("use_dora"):
        raise UserError(f"{candidate_dir} is a DoRA adapter; its layers are not W + scaling·BA: verify it with "
                        "--verify-mode full")
    with open_safetensors(candidate_dir / ADAPTER_WEIGHTS) as handle:
        tensors = {key.removeprefix(PEFT_PREFIX): handle.get_tensor(key) for key in handle.keys()}
    lora_modules = {key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")}
    checks = LayerChecks(lora_dtype(candidate_dir))
    for name, module in factors.modules.items():
        if name not in lora_modules:
            continue
        lora_A, lora_B = tensors[f"{name}.lora_A.weight"].double(), tensors[f"{name}.lora_B.weight"].double()
        rank = config.get("rank_pattern", {}).get(get_pattern_key(config.get("rank_pattern", {}), name), config["r"])
        alpha = config.get("alpha_pattern", {}).get(get_pattern_key(config.get("alpha_pattern", {}), name),
                                                     config.get("lora_alpha", rank))
        scaling = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
        delta = scaling * (lora_B @ lora_A)
        weight = base.tensor(base_tensor_key(name))
        checks.check(name, weight, module, weight.double() + (delta.T if config.get("fan_in_fan_out") else delta))
    missing, extra = sorted(set(factors.modules) - lora_modules), sorted(lora_modules - set(factors.modules))
    failed = [f"{len(missing)} adapted modules missing from the LoRA, {len(extra)} extra"] if missing or extra else []
    return checks.report(failed, candidate="lora", modules_missing=missing[:10], modules_extra=extra[:10])


def parameter_count(checkpoint: BaseCheckpoint) -> int:
    """Number of stored parameters, from the safetensors headers alone."""
    total = 0
    for file in set(checkpoint.files.values()):
        with open_safetensors(file) as handle:
            for key in handle.keys():
                total += torch.Size(handle.get_slice(key).get_shape()).numel()
    return total


def verify_candidate(
    base: BaseCheckpoint, factors: AdapterFactors, candidate_dir: Path, *, mode: str = "auto", prompts=None
) -> dict:
    """Verify a merged model directory or a LoRA adapter directory (export-lora's or any PEFT
    LoRA; ``mode``: full, layerwise, or auto by size), an exported ONNX directory, or an
    ``.onnx_adapter`` file (run on the graph beside it)."""
    from psoft_deploy.converters.genai import is_genai_export

    candidate_dir = Path(candidate_dir)
    if candidate_dir.suffix == ".onnx_adapter":
        graph_dir = next((d for d in (candidate_dir.parent, candidate_dir.parent.parent) if (d / "model.onnx").is_file()),
                         None)
        if graph_dir is None:
            raise UserError(f"found no model.onnx next to {candidate_dir} or one directory up")
        if is_genai_export(graph_dir):
            return verify_genai(base, factors, graph_dir, prompts, adapter_file=candidate_dir, mode=mode)
        return verify_full(base, factors, graph_dir, prompts, kind="onnx", adapter_file=candidate_dir)
    if is_genai_export(candidate_dir):
        return verify_genai(base, factors, candidate_dir, prompts, mode=mode)
    if (candidate_dir / ADAPTER_CONFIG).is_file():
        config = read_json(candidate_dir / ADAPTER_CONFIG)
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise UserError(f"candidate {candidate_dir} is a {config.get('peft_type')} adapter; verify checks "
                            "conversions (a merged model, a LoRA adapter or an ONNX export)")
        if read_export_metadata(candidate_dir).get("exact") is False:
            return verify_truncated_lora(base, factors, candidate_dir)
        if not base.config or _resolve_mode(mode, base) == "layerwise":
            return verify_lora_layerwise(base, factors, candidate_dir)
        return verify_full(base, factors, candidate_dir, prompts, kind="lora")
    if (candidate_dir / "model.onnx").is_file():
        return verify_full(base, factors, candidate_dir, prompts, kind="onnx")
    if not base.config:  # not a transformers model: no forward to run, each weight is checked instead
        return verify_layerwise(base, factors, candidate_dir)
    if not (candidate_dir / "config.json").is_file():
        raise UserError(f"candidate {candidate_dir} is not a model directory (config.json), a LoRA adapter "
                        f"({ADAPTER_CONFIG}) or an ONNX export (model.onnx)")
    if _resolve_mode(mode, BaseCheckpoint(str(candidate_dir))) == "full":
        return verify_full(base, factors, candidate_dir, prompts)
    return verify_layerwise(base, factors, candidate_dir)


def _resolve_mode(mode: str, model: BaseCheckpoint) -> str:
    """``auto``: full up to `FULL_MODE_MAX_PARAMETERS`, layerwise above."""
    if mode != "auto":
        return mode
    return "full" if parameter_count(model) <= FULL_MODE_MAX_PARAMETERS else "layerwise"


def format_verification(report: dict) -> str:
    """One short line: PASS/FAIL, the key numbers and what failed (the rule and every number are in
    the report: ``--json``, ``--report``, ``psoft_verification.json``)."""
    if report["mode"] == "truncated-lora":
        numbers = (f"max layer relative error {report['max_layer_relative_error']:.2e} (optimal rank-k), "
                   f"largest gap to the recorded error {report['max_gap_to_recorded_error']:.1e}")
    elif report["mode"] == "full":
        bounds = report["bounds"]
        numbers = f"mean |Δ| {report['mean_abs_logits']:.2e} (≤ {bounds['mean_abs_logits']:.2e})"
        if "kl_divergence" in bounds:
            numbers += f", KL {report['kl_divergence']:.2e} (≤ {bounds['kl_divergence']:.2e})"
        numbers += f" over {report['positions']} positions"
        if report["bare_base"] is not None:
            numbers += f"; bare base {report['bare_base']['mean_abs_logits'] / bounds['mean_abs_logits']:.3g}× the bound"
        for kind, kept in report.get("behaviour", {}).get("kept", {}).items():
            numbers += f"; {kind} kept {kept['candidate']}/{kept['of']} (≥ {kept['least']:g})"
    elif report["mode"] == "layerwise":
        numbers = (f"max layer relative error {report['max_layer_relative_error']:.2e} "
                   f"({report['worst_ratio_to_bound']:.2g}× its bound) over {report['layers_checked']} layers")
    else:
        numbers = f"{report['modules_checked']} modules"
    verdict = "PASS" if report["passed"] else "FAIL"
    failed = f"; failed: {', '.join(report['failed_checks'])}" if report["failed_checks"] else ""
    return f"{verdict} ({report['mode']}, {report['dtype']}): {numbers}{failed}"

"""`psoft-deploy train`: trains on PsoftLinear through TRL's SFTTrainer, saves a PEFT adapter PEFT
reproduces, and factors every converter takes; chat models learn to stop, also when pad == EOS."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close_relative, input_ids, load_peft, run, torchrun
from safetensors.torch import load_file
from transformers import AutoTokenizer

from psoft_deploy.converters.pipeline import read_report
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import load_base_model, reference_model
from psoft_deploy.testing import (
    CHAT_TEMPLATE_WITH_GENERATION,
    build_chat_model,
    bundled_text,
    memorize_texts,
)

DATA = Path(__file__).parent / "data" / "tiny_text.txt"
SHORTEST = sorted(bundled_text(), key=len)
# Question: a sentence's first three words; answer: the rest of it; what a model that runs on says next.
CHAT = [(" ".join(line.split()[:3]), " ".join(line.split()[3:]), " ".join(SHORTEST[i + 4].split()[:3]))
        for i, line in enumerate(SHORTEST[:4])]


def train_args(base, output, *extra):
    return ["train", "--base_model_name_or_path", base, "--output_dir", output, "--data_path", DATA,
            "--max_length", 32, "--per_device_train_batch_size", 8, "--learning_rate", 2e-2, "--r", 8,
            "--psoft_alpha", 8, "--target_modules", "q_proj", "v_proj", "down_proj", "--logging_steps", 2, *extra]


def test_training_lowers_the_loss_and_peft_reproduces_the_adapter(tiny_base, tmp_path):
    base = tiny_base("llama")
    result = run(*train_args(base, tmp_path / "out", "--max_steps", 16, "--save_steps", 1000))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    history = summary["loss_history"]
    assert summary["steps"] == 16 and len(history) == 8
    assert sum(history[-2:]) < sum(history[:2]), history

    factors = load_factors(str(tmp_path / "out"), str(base))  # materialized: no SVD
    assert factors.adapter.format == "materialized" and factors.adapter.source["format"] == "peft"
    report = read_report(tmp_path / "out")  # published like every artifact: the factors read back
    assert report["passed"] and [check["mode"] for check in report["checks"]] == ["reread"], report
    ids = input_ids()
    with torch.no_grad():
        ours = reference_model(base, factors)(ids).logits
        peft = load_peft(base, tmp_path / "out")(ids).logits
        untrained = load_base_model(base)(ids).logits
    assert (ours - untrained).abs().max() > 1e-3
    assert_close_relative(peft, ours, 1e-5)

    for command in ("merge", "export-lora"):
        converted = run(command, "--base", base, "--adapter", tmp_path / "out", "--output", tmp_path / command)
        assert converted.exit_code == 0 and "verification: PASS" in converted.output, converted.output


def test_checkpoints_are_adapters_and_resuming_continues_the_same_run(tiny_base, tmp_path):
    base = tiny_base("llama")
    straight = run(*train_args(base, tmp_path / "straight", "--max_steps", 6, "--save_steps", 2))
    assert straight.exit_code == 0, straight.output
    checkpoint = tmp_path / "straight" / "checkpoints" / "checkpoint-4"
    assert [f.name for f in checkpoint.glob("*.safetensors")] == ["adapter_model.safetensors"], "no copy of the base"
    assert all(".psoft_R." in key for key in load_file(checkpoint / "adapter_model.safetensors"))
    with torch.no_grad():  # a checkpoint is a PEFT adapter as it stands
        mid_run = load_peft(base, checkpoint)(input_ids()).logits
        reference = reference_model(base, load_factors(str(checkpoint), str(base)))(input_ids()).logits
    assert_close_relative(mid_run, reference, 1e-5)

    for other_run in (["--target_modules", "q_proj", "v_proj"], ["--r", 4]):  # last option wins in argparse
        refused = run(*train_args(base, tmp_path / "other", "--max_steps", 6, "--resume_from_checkpoint", checkpoint,
                                  *other_run))
        assert refused.exit_code == 1 and "holds another adapter than this run's" in refused.output, refused.output
        assert "Traceback" not in refused.output and not (tmp_path / "other" / "adapter_model.safetensors").exists()

    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / "checkpoint-4")
    resumed = run(*train_args(base, tmp_path / "resumed", "--max_steps", 6, "--save_steps", 2,
                              "--resume_from_checkpoint", "latest"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "resumed" / "training_summary.json").read_text())["steps"] == 6
    expected, actual = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("straight", "resumed"))
    assert expected.keys() == actual.keys()
    for key in expected:  # steps 5 and 6 redone from the checkpoint: the same adapter as the run that went on
        assert_close_relative(actual[key], expected[key], rtol=8 * torch.finfo(torch.float32).eps)


@pytest.mark.slow
def test_quick_start_command_line(tmp_path):
    """The method's published quick start, with local paths for the hub names."""
    from psoft_deploy.testing import build_tiny_model

    build_tiny_model(tmp_path / "llama", "llama", hidden=128, heads=2)  # r=128 fits its 128×128 layers
    lines = DATA.read_text().splitlines()
    (tmp_path / "imdb.txt").write_text("\n".join(lines * 10) + "\n")  # 400 lines: 1% is 4 examples
    command = (f"psoft-deploy train --base_model_name_or_path {tmp_path / 'llama'} --output_dir "
               f"{tmp_path / 'outputs/psoft-llama3.2-3b-imdb'} --data_path {tmp_path / 'imdb.txt'} "
               '--dataset_split "train[:1%]" --max_length 128 --num_train_epochs 1 '
               "--per_device_train_batch_size 1 --gradient_accumulation_steps 8 --learning_rate 5e-4 "
               "--bits bf16 --r 128 --psoft_alpha 128 --target_modules q_proj v_proj")
    command = "umask 022; " + command.replace("psoft-deploy", f"{sys.executable} -m psoft_deploy", 1)
    process = subprocess.run(["bash", "-c", command],
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    output = tmp_path / "outputs/psoft-llama3.2-3b-imdb"
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["examples"] == 4 and summary["arguments"]["target_modules"] == ["q_proj", "v_proj"]
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 128 and config["psoft_alpha"] == 128 and config["peft_type"] == "PSOFT"
    assert isinstance(config["psoft_alpha"], int), "saved as the user gave it"
    meta = json.loads((output / "psoft_deploy.json").read_text())
    assert meta["svd"]["dtype"] == "bfloat16"
    written = [path for path in output.rglob("*") if path.is_file()]
    assert written and all(path.stat().st_mode & 0o044 == 0o044 for path in written), "readable by other accounts"


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """A tiny chat model whose pad token is its EOS (<|im_end|>) that knows CHAT's answers but mostly runs on
    after them (it memorized each answer followed by more words twice, and the answer alone once), as a base
    model does; with CHAT as 'messages' data. Returns (base, data)."""
    base = tmp_path_factory.mktemp("chat-base")
    model = build_chat_model(base, layers=2, logit_scale=1.0, chat_template=CHAT_TEMPLATE_WITH_GENERATION)
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    runs_on = [conversation(q, f"{a} {more}") for q, a, more in CHAT] * 2 + [conversation(q, a) for q, a, _ in CHAT]
    memorize_texts(model, tokenizer, [tokenizer.apply_chat_template(c, tokenize=False) for c in runs_on], steps=200,
                   add_eos=False)
    model.save_pretrained(base)
    data = tmp_path_factory.mktemp("chat-data") / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation(q, a)}) + "\n" for q, a, _ in CHAT * 4))
    return base, data


def eos_probability(model, tokenizer) -> float:
    """Mean P(<|im_end|>) right after each of CHAT's answers."""
    probabilities = []
    for question, answer, _ in CHAT:
        ids = list(tokenizer.apply_chat_template(conversation(question, answer), tokenize=True, return_dict=False))
        end = max(i for i, token in enumerate(ids) if token == tokenizer.eos_token_id)  # the answer's <|im_end|>
        with torch.no_grad():
            logits = model(torch.tensor([ids[:end]])).logits[0, -1]
        probabilities.append(logits.softmax(-1)[tokenizer.eos_token_id].item())
    return sum(probabilities) / len(probabilities)


@pytest.mark.slow
def test_a_chat_model_whose_pad_is_eos_learns_to_stop(chat_base, tmp_path):
    """The bug: a collator that leaves tokens equal to pad out of the loss never trains <|im_end|> when pad == EOS.
    Anchor: PEFT's own PSOFT layer trained by TRL's SFTTrainer on the same data and seed."""
    from datasets import load_dataset
    from peft import PsoftConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    base, data = chat_base
    options = {"max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 128}
    result = run("train", "--base_model_name_or_path", base, "--output_dir", tmp_path / "ours", "--data_path", data,
                 "--r", 8, "--psoft_alpha", 8, "--target_modules", "q_proj", "v_proj",
                 *[item for key, value in options.items() for item in (f"--{key}", value)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning: the pad token is the EOS")]
    assert len(warnings) == 1 and "still trained" in warnings[0], result.output
    assert json.loads((tmp_path / "ours" / "training_summary.json").read_text())["data_format"] == "messages"

    anchor = get_peft_model(load_base_model(base), PsoftConfig(r=8, psoft_alpha=8, target_modules=["q_proj", "v_proj"]))
    SFTTrainer(model=anchor, processing_class=AutoTokenizer.from_pretrained(base),
               train_dataset=load_dataset("json", data_files=str(data), split="train"),
               args=SFTConfig(output_dir=str(tmp_path / "anchor"), report_to="none", save_strategy="no",
                              gradient_checkpointing=False, bf16=False, disable_tqdm=True, **options)).train()

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ours")
    ours = load_peft(base, tmp_path / "ours")
    p_base, p_ours, p_anchor = (eos_probability(model, tokenizer) for model in (load_base_model(base), ours,
                                                                                anchor.eval()))
    assert p_base < 0.5 and p_ours > p_base + 0.3, (p_base, p_ours)
    assert p_ours >= p_anchor - 1e-3, (p_ours, p_anchor)  # the same layer math: equal up to rounding
    for question, _, _ in CHAT:  # greedy generation stops by itself
        prompt = tokenizer.apply_chat_template(conversation(question, "")[:1], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        generated = ours.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1]:]
        assert tokenizer.eos_token_id in generated.tolist(), tokenizer.decode(generated)


def loss_over(model, tokenizer, sequences: list[tuple[list[int], list[bool]]]) -> tuple[float, float]:
    """The model's mean next-token loss over the marked tokens of each sequence, and the same without any EOS."""
    total, count, total_no_eos, count_no_eos = 0.0, 0, 0.0, 0
    for ids, marked in sequences:
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]),
                                                       reduction="none")
        for token, loss, mark in zip(ids[1:], losses.tolist(), marked[1:]):
            if mark:
                total, count = total + loss, count + 1
                if token != tokenizer.eos_token_id:
                    total_no_eos, count_no_eos = total_no_eos + loss, count_no_eos + 1
    return total / count, total_no_eos / count_no_eos


@pytest.mark.slow
@pytest.mark.parametrize("data_format,flag", [("messages", None), ("messages", "--assistant_only_loss"),
                                              ("prompt-completion", None),
                                              ("prompt-completion", "--no-completion_only_loss"), ("text", None)])
def test_the_loss_covers_the_tokens_the_options_name_eos_included(data_format, flag, chat_base, tmp_path):
    """The first step's loss is the base's mean loss over exactly the trained tokens: every token, the assistant's
    turns (their <|im_end|> included), or the completion (TRL's default for prompt/completion data; EOS appended)."""
    base, _ = chat_base
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = tokenizer.eos_token
    if data_format == "messages":
        rows = [{"messages": conversation(q, a)} for q, a, _ in CHAT]
        sequences = []
        for row in rows:
            rendered = tokenizer.apply_chat_template(row["messages"], return_dict=True,
                                                     return_assistant_tokens_mask=True)
            sequences.append((rendered["input_ids"], [bool(m) if flag else True for m in rendered["assistant_masks"]]))
    elif data_format == "prompt-completion":
        rows = [{"prompt": q, "completion": f" {a}"} for q, a, _ in CHAT]
        sequences = []
        for row in rows:
            ids, prompt = (tokenizer(text)["input_ids"] for text in (row["prompt"] + row["completion"] + eos,
                                                                      row["prompt"]))
            assert ids[:len(prompt)] == prompt
            sequences.append((ids, [flag is not None or i >= len(prompt) for i in range(len(ids))]))
    else:
        rows = [{"text": f"{q} {a}"} for q, a, _ in CHAT]
        sequences = [(ids, [True] * len(ids)) for ids in (tokenizer(row["text"] + eos)["input_ids"] for row in rows)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected, without_eos = loss_over(load_base_model(base), tokenizer, sequences)
    assert abs(expected - without_eos) > 1e-3  # the check can tell whether EOS was trained

    result = run("train", "--base_model_name_or_path", base, "--output_dir", tmp_path / "out", "--data_path",
                 tmp_path / "data.jsonl", "--max_steps", 1, "--logging_steps", 1, "--per_device_train_batch_size",
                 len(rows), "--r", 4, "--psoft_alpha", 4, *([flag] if flag else []))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["data_format"] == data_format
    assert summary["first_loss"] == pytest.approx(expected, abs=1e-4), (summary["first_loss"], expected)


def test_packing_fills_each_sequence_with_several_examples(tiny_base, tmp_path):
    result = run(*train_args(tiny_base("llama"), tmp_path / "out", "--packing", "--max_length", 256,
                             "--per_device_train_batch_size", 1))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["examples"] == 40 and summary["sequences"] < 20 and summary["steps"] == summary["sequences"]


@pytest.mark.slow
def test_two_processes_train_the_adapter_of_one_with_twice_the_accumulation(tiny_base, tmp_path):
    base = tiny_base("llama")
    common = ["--max_steps", 5, "--per_device_train_batch_size", 2, "--save_steps", 1000]
    single = run(*train_args(base, tmp_path / "single", *common, "--gradient_accumulation_steps", 2))
    assert single.exit_code == 0, single.output
    # "--": torchrun's own parser would take --r for an abbreviation of its options
    process = torchrun("-m", "psoft_deploy", "--", *train_args(base, tmp_path / "two", *common,
                                                              "--gradient_accumulation_steps", 1))
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 5
    expected, actual = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("single", "two"))
    assert expected.keys() == actual.keys()
    assert max((actual[key] - expected[key]).abs().max().item() for key in expected) <= 1e-4
    assert any((value - (0 if key.endswith("weight") else 1)).abs().max() > 1e-2 for key, value in actual.items())
    assert sorted(path.name for path in (tmp_path / "two").iterdir() if path.name.startswith(".")) == []


@pytest.mark.slow
def test_ranks_that_derive_other_factors_are_refused(tmp_path):
    (tmp_path / "ranks.py").write_text("""
import torch, torch.distributed as dist
from types import SimpleNamespace
from psoft_deploy.core.errors import UserError
from psoft_deploy.train import check_ranks_agree

dist.init_process_group("gloo")
A, B = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), torch.randn(8, 4)
dist.broadcast(B, 0)
check_ranks_agree({"q_proj": SimpleNamespace(A=A, B=B)})
A[1] *= -1 if dist.get_rank() == 1 else 1  # another sign of one singular vector pair
B[:, 1] *= -1 if dist.get_rank() == 1 else 1
try:
    check_ranks_agree({"q_proj": SimpleNamespace(A=A, B=B)})
except UserError as error:
    print("refused:", error)
dist.destroy_process_group()  # gloo's threads otherwise may abort the interpreter at exit
""")
    process = torchrun(tmp_path / "ranks.py")
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count("derived different A, B") == 2, process.stdout  # on each rank


@pytest.mark.parametrize(
    "extra,data,fragment",
    [
        (["--target_modules", "q_proj", "nonexistent"], None, "nonexistent match no linear layer"),
        (["--r", "80"], None, "--r 80 exceeds the size of"),
        ([], "empty.txt", "holds no non-empty 'text' examples"),
        (["--dataset_text_field", "body"], None, "has no column 'body'"),
        (["--resume_from_checkpoint", "latest"], None, "no checkpoint in"),
        (["--resume_from_checkpoint", "no/such/checkpoint-9"], None, "holds no adapter_model.safetensors"),
        ([], "broken.parquet", "cannot read data"),
        ([], "missing.txt", "cannot read data"),
        ([], "notes.docx", "must be a .txt"),
        ([], "mydata.txt", "mydata.txt: no such file"),
        (["--r", "0"], None, "--r must be at least 1"),
        (["--psoft_alpha", "0"], None, "--psoft_alpha must be a positive number"),
        (["--psoft_dropout", "1"], None, "--psoft_dropout must be in [0, 1)"),
        (["--use_cayley_neumann", "--cayley_neumann_eps", "1.5"], None, "`cayley_neumann_eps` must be in (0, 1)"),
        (["--use_cayley_neumann", "--num_cayley_neumann_terms", "0"], None, "`num_cayley_neumann_terms` must be a"),
        (["--cayley_neumann_eps", "0.5"], None, "only used when `use_cayley_neumann=True`"),
        (["--psoft_svd_lowrank_niter", "4"], None, "only used when `psoft_svd='lowrank'`"),
        (["--max_length", "1"], None, "--max_length must be at least 2"),
        (["--assistant_only_loss"], None, "--assistant_only_loss needs chat data"),
        (["--completion_only_loss"], None, "--completion_only_loss needs 'prompt'/'completion' data"),
    ],
)
def test_bad_input_fails_before_training(extra, data, fragment, tiny_base, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "notes.docx").write_text("x")
    args = train_args(tiny_base("llama"), tmp_path / "out", *extra)
    if data:
        args[args.index("--data_path") + 1] = tmp_path / data
    if data == "missing.txt":
        args[args.index("--data_path") + 1] = "no/such/dataset-name"
    result = run(*args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and fragment in lines[-1] and "Traceback" not in result.output, lines
    assert not (tmp_path / "out").exists(), "nothing may be written when the input is bad"


@pytest.mark.parametrize("template,extra,fragment", [
    (None, [], "is chat data, but the tokenizer of"),
    ("ChatML without {% generation %}", ["--assistant_only_loss"], "needs a chat template that marks the assistant"),
])
def test_chat_data_needs_the_template_its_options_need(template, extra, fragment, tiny_base, tmp_path):
    if template:
        base = tmp_path / "chat"
        build_chat_model(base, layers=1)
    else:
        base = tiny_base("llama")  # its tokenizer has no chat template
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation(q, a)}) + "\n" for q, a, _ in CHAT))
    result = run("train", "--base_model_name_or_path", base, "--output_dir", tmp_path / "out", "--data_path", data,
                 "--r", 4, *extra)
    assert result.exit_code == 1 and fragment in result.output.strip().splitlines()[-1], result.output
    assert not (tmp_path / "out").exists()

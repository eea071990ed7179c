"""`psoft-deploy serve` with PSOFT adapters held as k×k cores over the base's shared basis, through a
real vLLM (CPU) over loopback HTTP.

One base; PSOFT adapters of different ranks and alphas, psoft_init and pissa_init, with and without
magnitude vectors (in the basis: served as cores); a low-rank-SVD PSOFT adapter and a plain LoRA
(outside it: exact LoRA); the bare base; an adapter dropped into the adapter root later, and an exact
LoRA posted to vLLM's load endpoint from inside the root (both held as cores; a server of cores only,
with no root and vLLM's own endpoint turned on by its variable, shows the latter). Every
greedy completion, in mixed batches with fewer LoRA slots than adapters (so slots pass between
cores and LoRAs), must equal transformers + PEFT in float32 and the same server run with
``--adapter-form lora``. At tensor parallelism 2 (a Llama and a Qwen2, every projection adapted),
each rank holds its shard of the basis, and the answers are PEFT's too.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import MAX_TOKENS, VARIANTS, complete, free_port, load_peft, make_peft_adapter, run, wait_for_serving
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer

from psoft_deploy.converters.verify.inputs import DEFAULT_PROMPTS
from psoft_deploy.core.model import load_base_model
from psoft_deploy.demo import MODEL_SIZES
from psoft_deploy.testing import build_tiny_model

PROMPTS = ["The river carries water", "A cat sleeps on the", "Snow covers the fields"]
ALL_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
# Fewer LoRA slots than served models: adapters of both forms take turns in the same slots.
VLLM_ARGS = ["--enforce-eager", "--max-num-seqs", "32", "--max-loras", "3"]
IN_BASIS, OUTSIDE = ("psoft", "pissa", "plain-r"), ("lowrank", "lora")


def greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def serve(work, form: str, adapters: dict, log_name: str, vllm_args=VLLM_ARGS):
    """serve with an adapter root (``work/root``); vLLM's log is ``work/vllm-LOG_NAME``."""
    port = free_port()
    log = open(work / log_name, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "psoft_deploy", "serve", "--base", str(work / "base"),
         *[arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")],
         "--adapter-root", str(work / "root"), "--adapter-form", form, "--port", str(port),
         "--cache-dir", str(work / "cache"), "--log-file", str(work / f"vllm-{log_name}"), "--", *vllm_args],
        stdout=log, stderr=subprocess.STDOUT,
    )
    wait_for_serving(process, work / log_name)
    return process, log, f"http://127.0.0.1:{port}"


def answers(url: str, names: list[str]) -> dict[str, list[list[int]]]:
    jobs = [(name, i) for name in names for i in range(len(PROMPTS))] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: complete(url, job[0], PROMPTS[job[1]]), jobs))
    got: dict[str, list] = {name: [None] * len(PROMPTS) for name in names}
    for (name, i), (status, body) in zip(jobs, results):
        assert status == 200, body
        tokens = body["choices"][0]["token_ids"]
        assert got[name][i] in (None, tokens), f"{name} answered prompt {i} two ways in one server"
        got[name][i] = tokens
    return got


def post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-shared")
    base = work / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    make_peft_adapter(base, work / "psoft", r=8, strength=3, target_modules=["q_proj", "v_proj", "down_proj"])
    make_peft_adapter(base, work / "pissa", r=4, psoft_alpha=16, seed=2, strength=3, ab_svd_init="pissa_init",
                      target_modules=ALL_LAYERS)
    make_peft_adapter(base, work / "plain-r", r=16, psoft_alpha=32, seed=3, strength=3, psoft_mag_a=False,
                      psoft_mag_b=False, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(base, work / "lowrank", r=8, seed=4, strength=3, psoft_svd="lowrank", random_seed=17,
                      target_modules=["q_proj", "v_proj"])
    lora = get_peft_model(load_base_model(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    lora.save_pretrained(work / "lora")
    (work / "root").mkdir()
    make_peft_adapter(base, work / "root" / "late", r=8, seed=6, strength=3, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(base, work / "posted", r=8, seed=7, strength=3, target_modules=["q_proj", "v_proj"])
    assert run("export-lora", "--base", str(base), "--adapter", str(work / "posted"), "--output",
               str(work / "root" / "posted-lora")).exit_code == 0  # the load endpoint reads inside the root only

    tokenizer = AutoTokenizer.from_pretrained(base)
    expected = {"base": [greedy(load_base_model(base), tokenizer, p) for p in PROMPTS]}
    for name in (*IN_BASIS, *OUTSIDE):
        expected[name] = [greedy(load_peft(base, work / name), tokenizer, p) for p in PROMPTS]
    expected["late"] = [greedy(load_peft(base, work / "root" / "late"), tokenizer, p) for p in PROMPTS]
    expected["posted"] = [greedy(load_peft(base, work / "posted"), tokenizer, p) for p in PROMPTS]
    assert len({json.dumps(v) for v in expected.values()}) == len(expected), "each model must answer differently"

    adapters = {name: work / name for name in (*IN_BASIS, *OUTSIDE)}
    names = [str(base), *adapters, "late", "posted"]
    results = {}
    for form in ("lora", "auto"):
        process, log, url = serve(work, form, adapters, f"serve-{form}.log")
        try:
            # An exact LoRA posted to the load endpoint (relative to the root): held as cores when it lies in the basis.
            post(f"{url}/v1/load_lora_adapter", {"lora_name": "posted", "lora_path": "posted-lora"})
            results[form] = answers(url, names)
        finally:
            stop(process, log)
    for form in results:
        results[form]["base"] = results[form].pop(str(base))
    return {"work": work, "expected": expected, "results": results}


@pytest.mark.slow
def test_cores_answer_as_peft_and_as_exact_lora_in_mixed_batches(served):
    expected, results = served["expected"], served["results"]
    for name, tokens in expected.items():
        assert results["auto"][name] == tokens, f"{name} through the shared basis"
        assert results["lora"][name] == tokens, f"{name} as exact LoRA"


@pytest.mark.slow
def test_serve_says_in_one_line_which_adapters_are_cores_and_serves_late_ones_as_cores(served):
    work = served["work"]
    lines = [line for line in (work / "serve-auto.log").read_text().splitlines() if "shared basis" in line]
    assert len(lines) == 1, lines
    assert "as cores: psoft, pissa, plain-r; exact LoRA: lowrank (residual" in lines[0] and "lora (residual" in lines[0]
    assert not any("shared basis" in line for line in (work / "serve-lora.log").read_text().splitlines())
    # The late and the posted adapter lie in the basis: the resolver and the load endpoint gave vLLM their
    # cores (a cores directory each).
    late_config = [json.loads(path.read_text()) for path in (work / "cache").glob("cores-*/adapter_config.json")]
    assert len([config for config in late_config if config["psoft_shared"] != "zero"]) == len(IN_BASIS) + 2


@pytest.mark.slow
def test_a_server_of_cores_only_answers_as_peft_and_takes_an_exact_lora_when_one_arrives(served, tmp_path):
    """No LoRA buffers while only cores are served; an exact LoRA loaded later gets them and answers as PEFT."""
    work = served["work"]
    adapters = {name: work / name for name in IN_BASIS}
    port = free_port()
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "psoft_deploy", "serve", "--base", str(work / "base"),
             *[arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")],
             "--port", str(port), "--cache-dir", str(work / "cache"), "--log-file", str(tmp_path / "vllm.log"),
             "--", *VLLM_ARGS],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        )
    try:
        wait_for_serving(process, tmp_path / "serve.log")
        url = f"http://127.0.0.1:{port}"
        post(f"{url}/v1/load_lora_adapter", {"lora_name": "lora", "lora_path": str(work / "lora")})
        # An exact LoRA that lies in the basis is held as cores, projected on load.
        post(f"{url}/v1/load_lora_adapter", {"lora_name": "posted", "lora_path": str(work / "root" / "posted-lora")})
        got = answers(url, [str(work / "base"), *IN_BASIS, "lora", "posted"])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
    got["base"] = got.pop(str(work / "base"))
    vllm_log = (tmp_path / "vllm.log").read_text()
    loads = [line for line in vllm_log.splitlines() if "loaded as" in line]
    assert got == {name: served["expected"][name] for name in ("base", *IN_BASIS, "lora", "posted")}, loads


@pytest.mark.slow
def test_a_server_with_only_an_adapter_root_serves_arriving_adapters_as_cores_from_r(served, tmp_path):
    """The basis covers the PSOFT adapters in the root at start; adapters dropped there later, or posted to
    the load endpoint, are cores straight from R (no LoRA conversion) where they lie in it, exact LoRA
    where they do not."""
    work = served["work"]
    root, cache = tmp_path / "root", tmp_path / "cache"
    root.mkdir()
    shutil.copytree(work / "psoft", root / "psoft")  # r 8 on q, v, down: the basis
    port = free_port()
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "psoft_deploy", "serve", "--base", str(work / "base"), "--adapter-root", str(root),
             "--port", str(port), "--cache-dir", str(cache), "--log-file", str(tmp_path / "vllm.log"),
             "--", "--enforce-eager", "--max-num-seqs", "32"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_serving(process, tmp_path / "serve.log")
        for name in ("late", "plain-r"):  # r 8 on q, v: in the basis; r 16: outside it
            shutil.copytree(work / "root" / name if name == "late" else work / name, root / name)
        shutil.copytree(work / "posted", root / "tenant" / "posted")  # a PSOFT adapter posted to the load endpoint
        post(f"http://127.0.0.1:{port}/v1/load_lora_adapter", {"lora_name": "posted", "lora_path": "tenant/posted"})
        got = answers(f"http://127.0.0.1:{port}", [str(work / "base"), "psoft", "late", "plain-r", "posted"])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
    got["base"] = got.pop(str(work / "base"))
    assert got == {name: served["expected"][name] for name in ("base", "psoft", "late", "plain-r", "posted")}
    said = (tmp_path / "serve.log").read_text()
    assert re.search(r"shared basis \(rank ≤ 8, \d+ modules\), as cores: none yet", said), said
    from_r = [path for path in cache.glob("cores-*/adapter_config.json")
              if json.loads(path.read_text())["psoft_shared"].startswith("cores from R")]
    assert len(from_r) == 3, from_r  # psoft, late and posted
    conversions = [path for path in cache.iterdir() if not path.name.startswith(("cores-", "basis-", "zero-"))]
    assert len(conversions) == 1, conversions  # plain-r's exact LoRA alone: psoft and late were never converted


def stop(process, log) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=90)
    log.close()


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """A Phi-3 (q/k/v and gate/up fused in the checkpoint itself) and three PSOFT adapters on every
    projection, with PEFT's greedy answers."""
    work = tmp_path_factory.mktemp("serve-phi3")
    base = work / "base"
    build_tiny_model(base, "phi3", hidden=256, heads=4, layers=2, vocab_size=384)
    (work / "root").mkdir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    expected = {"base": [greedy(load_base_model(base), tokenizer, p) for p in PROMPTS]}
    for seed, rank in enumerate((8, 16, 24)):
        name = f"r{rank}"
        make_peft_adapter(base, work / name, r=rank, psoft_alpha=2 * rank, seed=seed, strength=3,
                          target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
        expected[name] = [greedy(load_peft(base, work / name), tokenizer, p) for p in PROMPTS]
    assert len({json.dumps(v) for v in expected.values()}) == len(expected), "each model must answer differently"
    return work, expected


def served_answers(work, form, adapters, log_name, vllm_args=VLLM_ARGS):
    process, log, url = serve(work, form, adapters, log_name, vllm_args)
    try:
        got = answers(url, [str(work / "base"), *adapters])
    finally:
        stop(process, log)
    got["base"] = got.pop(str(work / "base"))
    return got


@pytest.mark.slow
def test_modules_fused_in_the_checkpoint_are_held_as_cores_and_answer_as_peft(phi3):
    work, expected = phi3
    adapters = {name: work / name for name in expected if name != "base"}
    assert served_answers(work, "auto", adapters, "serve-phi3.log") == expected  # serve's default form
    assert "as cores: r8, r16, r24" in (work / "serve-phi3.log").read_text()
    assert "served as exact LoRA" not in (work / "vllm-serve-phi3.log").read_text()  # every module held cores


@pytest.mark.slow
def test_a_module_whose_layer_holds_no_cores_gets_its_exact_lora_in_one_line(phi3):
    """vLLM's sharded LoRA layers (``--fully-sharded-loras``, here or in a vLLM config file) hold no
    cores: each adapter says so in one line and answers as PEFT through its exact LoRA; with
    ``--adapter-form shared`` the adapter is refused in one line."""
    work, expected = phi3
    adapters = {name: work / name for name in expected if name != "base"}
    sharded = [*VLLM_ARGS, "--fully-sharded-loras"]
    assert served_answers(work, "auto", adapters, "serve-sharded.log", sharded) == expected
    lines = [line for line in (work / "vllm-serve-sharded.log").read_text().splitlines()
             if "served as exact LoRA, their layers hold no cores" in line]
    assert len(lines) == len(adapters), lines  # one per adapter (none for the bare base's zero core)
    assert all("8 of 8 modules" in line and "ShardedLoRA, which psoft-deploy does not extend" in line for line in lines)
    said = [line for line in (work / "serve-sharded.log").read_text().splitlines() if "their layers hold no cores" in line]
    assert len(said) == len(adapters) and all(line.startswith("psoft-deploy: warning: ") for line in said), said

    port = free_port()
    refused = subprocess.run(
        [sys.executable, "-m", "psoft_deploy", "serve", "--base", str(work / "base"), "--adapter", f"r8={work / 'r8'}",
         "--adapter-form", "shared", "--port", str(port), "--cache-dir", str(work / "cache"),
         "--log-file", str(work / "vllm-refused.log"), "--", *sharded],
        capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "cannot be held as a core here" in refused.stderr and "ShardedLoRA" in refused.stderr, refused.stderr[-3000:]


EVERY_PROJECTION = [*ALL_LAYERS, "down_proj"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def every_projection(request, tmp_path_factory):
    """A base (head size 64, two KV heads: one per rank at tensor parallelism 2; trained on verify's prompts,
    since the random tiny Qwen2's tied embeddings echo the prompt whatever the adapter), two PSOFT adapters
    on every projection in the basis and a low-rank-SVD one outside it, with PEFT's greedy answers."""
    work = tmp_path_factory.mktemp(f"serve-{request.param}")
    base = work / "base"
    build_tiny_model(base, request.param, memorize=DEFAULT_PROMPTS, **MODEL_SIZES)
    (work / "root").mkdir()
    adapters = {"psoft": {"r": 8}, "pissa": {"r": 4, **VARIANTS["pissa"]}, "lowrank": {"r": 8, **VARIANTS["lowrank"]}}
    tokenizer = AutoTokenizer.from_pretrained(base)
    expected = {"base": [greedy(load_base_model(base), tokenizer, p) for p in PROMPTS]}
    for seed, (name, config) in enumerate(adapters.items()):
        make_peft_adapter(base, work / name, seed=seed, strength=3, target_modules=EVERY_PROJECTION, **config)
        expected[name] = [greedy(load_peft(base, work / name), tokenizer, p) for p in PROMPTS]
    assert len({json.dumps(v) for v in expected.values()}) == len(expected), "each model must answer differently"
    return work, expected


@pytest.mark.slow
def test_cores_at_tensor_parallelism_2_answer_as_peft_beside_an_exact_lora(every_projection, monkeypatch):
    """Column-parallel q/k/v and gate/up (each rank its output rows of U) and row-parallel o and down
    (its input rows of V, summed by the layer's all-reduce); serve says the cores are held at TP 2."""
    work, expected = every_projection
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # a core per rank on this one-NUMA-node machine
    adapters = {name: work / name for name in expected if name != "base"}
    got = served_answers(work, "auto", adapters, "serve-tp2.log", [*VLLM_ARGS, "--tensor-parallel-size", "2"])
    assert got == expected
    said = (work / "serve-tp2.log").read_text()
    assert "as cores: psoft, pissa; exact LoRA: lowrank (residual" in said, said
    assert said.count("psoft-deploy: cores held at tensor parallelism 2") == 1, said
    assert "served as exact LoRA" not in (work / "vllm-serve-tp2.log").read_text()  # every module held cores

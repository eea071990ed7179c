"""`psoft-deploy serve` against what one user or one restart must not break (issues 24, 32): a prompt
beyond the model's vocabulary, stops that leave none of vLLM's shared memory behind, stops during
start-up, a port given after `--`, a port already taken and a base without a tokenizer. Real vLLM
(CPU) servers over the demo's tiny Llama."""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest
from helpers import complete, free_port, healthy, make_peft_adapter, run, wait_for_serving

from psoft_deploy.demo import MODEL_SIZES
from psoft_deploy.testing import build_tiny_model, build_tokenizer, bundled_text

VLLM_ARGS = ["--enforce-eager", "--max-num-seqs", "8"]


def start_serve(base, work, port, *vllm_args, wait=True):
    """``psoft-deploy serve`` of ``base`` alone (an empty adapter root) on ``port``; returns it and its
    output file, once serving (with ``wait``)."""
    (work / "root").mkdir(exist_ok=True)
    stderr = work / f"serve-{port}.log"
    with open(stderr, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "psoft_deploy", "serve", "--base", str(base), "--adapter-root", str(work / "root"),
             "--port", str(port), "--cache-dir", str(work / "cache"), "--", *VLLM_ARGS, *vllm_args],
            stdout=output, stderr=subprocess.STDOUT,
        )
    if wait:
        wait_for_serving(process, stderr)
    return process, stderr


def stop(process, signum=signal.SIGINT) -> int:
    """Ctrl-C (or ``signum``) serve; its exit status (the wait is a hang guard, not a measure)."""
    process.send_signal(signum)
    return process.wait(timeout=120)


def vllm_processes(process) -> list[psutil.Process]:
    """The processes serve started (vLLM's server, engine and helpers)."""
    return psutil.Process(process.pid).children(recursive=True)


def shared_memory_of(processes) -> set[str]:
    """The /dev/shm files ``processes`` map now (their shared memory and semaphores), from /proc."""
    mapped = set()
    for each in processes:
        try:
            lines = open(f"/proc/{each.pid}/maps").read().splitlines()
        except OSError:
            continue
        mapped |= {fields[5] for fields in map(str.split, lines) if len(fields) == 6 and fields[5].startswith("/dev/shm/")}
    return mapped


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.mark.slow
def test_a_prompt_beyond_the_models_vocabulary_gets_400_and_the_engine_stays_up(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)  # 384 embeddings
    tokenizer = build_tokenizer(base, bundled_text(), vocab_size=420, chat=True)  # 420 tokens
    assert max(tokenizer("mountain")["input_ids"]) >= 384
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, log = start_serve(base, tmp_path, port)
    try:
        assert "the tokenizer has 420 tokens, the model 384" in log.read_text()
        model = str(base)
        status, body = complete(url, model, "The mountain river")
        assert status == 400 and "beyond the model's vocabulary of 384 tokens" in body["error"]["message"], body
        status, body = post(f"{url}/v1/completions", {"model": model, "prompt": [[5, 6, 400]], "max_tokens": 2})
        assert status == 400, body
        chat = {"model": model, "messages": [{"role": "user", "content": "mountain"}], "max_tokens": 2}
        status, body = post(f"{url}/v1/chat/completions", chat)
        assert status == 400 and body["error"]["param"] == "messages", body
        status, body = complete(url, model, "The river carries water")
        assert status == 200 and len(body["choices"][0]["token_ids"]) > 0, body
        status, body = post(f"{url}/v1/chat/completions", chat | {"messages": [{"role": "user", "content": "snow"}]})
        assert status == 200, body
        assert healthy(url)
    finally:
        assert stop(process) == 0


@pytest.mark.slow
def test_three_stops_leave_none_of_vllms_shared_memory(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    port = free_port()
    for cycle in range(3):
        process, log = start_serve(base, tmp_path, port)
        assert complete(f"http://127.0.0.1:{port}", str(base), "The river")[0] == 200
        segments = shared_memory_of(vllm_processes(process))
        assert segments, "vLLM's processes share memory through /dev/shm"
        assert stop(process) == 0
        assert not [path for path in segments if os.path.exists(path)], f"cycle {cycle}: {log.read_text()[-3000:]}"
    vllm_log = tmp_path / f"vllm-{port}.log"  # beside the cache directory, named in the serving line
    assert f"vLLM log: {vllm_log}" in log.read_text()
    assert "force killing" not in vllm_log.read_text()  # stopped by its own graceful shutdown


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_start_up_says_so_and_stops_vllm(tmp_path, signum):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    port = free_port()
    process, log = start_serve(base, tmp_path, port, wait=False)
    vllm_log = tmp_path / f"vllm-{port}.log"
    try:
        while not (vllm_log.exists() and vllm_log.stat().st_size):  # vLLM has started and not yet answered
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
        vllm = vllm_processes(process)
        segments = shared_memory_of(vllm)
        assert stop(process, signum) == 1
    finally:
        if process.poll() is None:
            process.kill()
    assert "psoft-deploy: serving on" not in log.read_text()
    assert log.read_text().splitlines()[-1] == "Error: stopped during start-up, before vLLM answered"
    gone, alive = psutil.wait_procs(vllm, timeout=30)
    assert not alive, "serve stops all of vLLM's processes"
    assert not [path for path in segments if os.path.exists(path)]


@pytest.mark.slow
def test_a_stop_while_adapters_are_prepared_says_so_before_vllm_starts(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    make_peft_adapter(base, tmp_path / "adapter", r=8, target_modules=["q_proj", "v_proj"])
    port = free_port()
    with open(tmp_path / "serve.log", "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "psoft_deploy", "serve", "--base", str(base), "--adapter",
             f"a={tmp_path / 'adapter'}", "--port", str(port), "--cache-dir", str(tmp_path / "cache")],
            stdout=output, stderr=subprocess.STDOUT)
    try:
        while "preparing adapter a" not in (tmp_path / "serve.log").read_text():  # then converted, then vLLM
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        assert stop(process, signal.SIGTERM) == 1
    finally:
        if process.poll() is None:
            process.kill()
    lines = (tmp_path / "serve.log").read_text().splitlines()
    assert lines[-1] == "Error: stopped during start-up, before vLLM started" and "Traceback" not in lines, lines
    assert not (tmp_path / f"vllm-{port}.log").exists()


@pytest.mark.slow
def test_a_port_given_to_vllm_after_the_separator_is_where_serve_waits(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    ours, vllms = free_port(), free_port()
    process, log = start_serve(base, tmp_path, ours, "--port", str(vllms))
    try:
        assert f"serving on http://127.0.0.1:{vllms}/v1" in log.read_text()
        assert healthy(f"http://127.0.0.1:{vllms}") and not healthy(f"http://127.0.0.1:{ours}")
        assert complete(f"http://127.0.0.1:{vllms}", str(base), "The river")[0] == 200
    finally:
        assert stop(process) == 0


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_port_another_server_holds_is_refused_in_one_line_before_vllm_starts(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", **MODEL_SIZES)
    other = http.server.HTTPServer(("127.0.0.1", 0), Health)
    port = other.server_address[1]
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        assert healthy(f"http://127.0.0.1:{port}")
        result = run("serve", "--base", base, "--adapter-root", tmp_path, "--port", port, "--cache-dir",
                     tmp_path / "cache")
        after_separator = run("serve", "--base", base, "--adapter-root", tmp_path, "--port", free_port(),
                              "--cache-dir", tmp_path / "cache", "--", "--port", port)
    finally:
        other.shutdown()
    for refused in (result, after_separator):
        assert refused.exit_code == 1
        assert refused.output.splitlines() == [
            f"Error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another port with --port"]
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("vllm-*.log")), "refused before vLLM started"


def test_a_base_without_tokenizer_is_refused_in_one_line_before_vllm_starts(tmp_path):
    base = tmp_path / "base"
    build_tiny_model(base, "llama", with_tokenizer=False, **MODEL_SIZES)
    result = run("serve", "--base", base, "--adapter-root", tmp_path, "--port", free_port(), "--cache-dir",
                 tmp_path / "cache")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot load the tokenizer of {base} (transformers: "), lines
    assert lines[0].endswith("serve needs the base's tokenizer files beside its weights, or one passed with "
                             "-- --tokenizer DIR")
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("vllm-*.log")), "refused before vLLM started"
